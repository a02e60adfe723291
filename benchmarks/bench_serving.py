"""Serving load generator for any OpenAI-compatible server (streaming chat completions).

Closed loop (--concurrency N...): N workers, each sending its next request as soon as its
previous one finishes, for a fixed number of requests per N (clamp(2N, --min-requests,
--max-requests) unless --num-requests). Open loop (--request-rate R...): Poisson arrivals at R
requests/s, a bounded count, no cap on requests in flight.

Every request is a streaming chat completion (httpx, stream=True) of a varied prompt (the
questions of benchmarks/_common.py after one shared system prompt, each request numbered so that no
two requests of a whole run, warm-up and levels included, share more than the template and the
system prompt: every server meets the same cold prefix cache), max_tokens 64, sampled
(temperature 0.7, a seed per request: what chat clients send) and greedy (temperature 0) as
separate passes (--sampling), `stream_options.include_usage` where the server takes it (else output tokens = content
chunks), `ignore_eos` only where the server honours it (--eos-policy auto probes: a short-answer
prompt must then run to max_tokens). Output tokens are always the server's actual counts.

Per run: request throughput, output tok/s, TTFT / TPOT / ITL / end-to-end latency (mean,
median, p99), error count, and with --pid the peak RSS of the server's process tree (psutil,
sampled every 0.1 s during the run) plus the kernel's VmHWM of the server process.

TTFT: request sent -> first chunk with content. ITL: gaps between content chunks. TPOT per
request: (e2e - TTFT) / (output tokens - 1). Throughputs use the run's wall time (first send
to last finish).

    .venv/bin/python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --concurrency 1 8
    .venv/bin/python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 --request-rate 2 --num-requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, SYSTEM_PROMPT, chat_messages, machine  # noqa: E402

PARIS_PROMPT = "What is the capital of France?"
SAMPLING = {"sampled": {"temperature": 0.7}, "greedy": {"temperature": 0.0}}
"""How each pass samples; a sampled request also carries seed = SEED_BASE + its prompt index."""
SEED_BASE = 1000


# -- one request --

@dataclass
class Target:
    """One server under test and how to talk to it."""
    base_url: str
    name: str = "server"
    model: str | None = None  # the "model" field sent; None: omitted
    pid: int | None = None  # server process, for RSS
    include_usage: bool = True
    extra_body: dict = field(default_factory=dict)  # e.g. {"ignore_eos": true}
    request_timeout_s: float = 600.0
    sampling: str = "greedy"  # a key of SAMPLING


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    output_tokens: int = 0
    usage_tokens: int | None = None  # completion_tokens from usage, when the server sent it
    content_chunks: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    itls: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None
    index: int | None = None  # which prompt of its run (send_indexed)

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def payload(target: Target, messages: list[dict], max_tokens: int, index: int = 0) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, **SAMPLING[target.sampling]}
    if target.sampling != "greedy":
        body["seed"] = SEED_BASE + index
    if target.model is not None:
        body["model"] = target.model
    if target.include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(target.extra_body)
    return body


async def send_indexed(client: httpx.AsyncClient, target: Target, index: int, run: int,
                       max_tokens: int) -> RequestResult:
    """The index-th request of a run (benchmarks/_common.chat_messages), its index kept."""
    res = await send(client, target, chat_messages(index, run), max_tokens, index=index)
    res.index = index
    return res


async def send(client: httpx.AsyncClient, target: Target, messages: list[dict], max_tokens: int,
               keep_text: bool = False, index: int = 0) -> RequestResult:
    """One streaming chat completion, timed chunk by chunk."""
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    last = None
    parts = []
    try:
        async with client.stream("POST", target.base_url + "/v1/chat/completions",
                                 json=payload(target, messages, max_tokens, index),
                                 timeout=target.request_timeout_s) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body[:300]}"
                res.end = time.perf_counter()
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    break
                usage = chunk.get("usage")
                if usage:
                    res.usage_tokens = usage.get("completion_tokens")
                    res.prompt_tokens = usage.get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        res.content_chunks += 1
                        if res.ttft is None:
                            res.ttft = now - start
                        else:
                            res.itls.append(now - last)
                        last = now
                        if keep_text:
                            parts.append(content)
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
        res.end = time.perf_counter()
        res.output_tokens = res.usage_tokens if res.usage_tokens is not None else res.content_chunks
        res.ok = res.error is None and res.ttft is not None
        if res.error is None and res.ttft is None:
            res.error = "no content in the stream"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.end = time.perf_counter()
        res.error = f"{type(e).__name__}: {e}"[:300]
    res.text = "".join(parts)
    return res


# -- server RSS --

class RssMonitor:
    """Peak RSS of a process tree, sampled in a thread; plus the root's VmHWM at stop()."""

    def __init__(self, pid: int | None, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> float | None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.is_set():
            mb = self._sample()
            if mb is not None:
                self.peak_mb = max(self.peak_mb or 0.0, mb)
            self._stop.wait(self.interval)

    def start(self) -> RssMonitor:
        if self.pid:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict:
        if self._thread:
            self._stop.set()
            self._thread.join()
        return {"peak_rss_mb": self.peak_mb, "vm_hwm_mb": vm_hwm_mb(self.pid)}


def vm_hwm_mb(pid: int | None) -> float | None:
    """The kernel's peak RSS of one process since it started (Linux /proc)."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# -- runs --

def _stats(xs: list[float], scale: float = 1000.0) -> dict:
    """mean / median / p99 (ms by default); None when empty."""
    if not xs:
        return {"mean": None, "median": None, "p99": None}
    ys = sorted(x * scale for x in xs)
    k = (len(ys) - 1) * 0.99  # linear interpolation, as numpy.percentile
    lo, hi = math.floor(k), math.ceil(k)
    p99 = ys[lo] + (ys[hi] - ys[lo]) * (k - lo)
    return {"mean": statistics.fmean(ys), "median": statistics.median(ys), "p99": p99}


def summarize(results: list[RequestResult], started: float, *, mode: str, level: float,
              num_requests: int, cancelled: int, rss: dict, truncated: bool) -> dict:
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    end = max((r.end for r in results), default=started)
    wall = max(end - started, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "mode": mode,
        "sampling": None,  # set by run_levels
        "concurrency" if mode == "closed" else "request_rate": level,
        "num_requests": num_requests,
        "completed": len(ok),
        "errors": len(errors) + cancelled,
        "cancelled_at_time_limit": cancelled,
        "truncated_by_time_limit": truncated,
        "duration_s": wall,
        "request_throughput": len(ok) / wall,
        "output_tok_s": out_tokens / wall,
        "total_output_tokens": out_tokens,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "mean_prompt_tokens": statistics.fmean(pt) if (pt := [r.prompt_tokens for r in ok
                                                               if r.prompt_tokens is not None]) else None,
        "prompt_tokens_by_request": {r.index: r.prompt_tokens for r in ok
                                     if r.index is not None and r.prompt_tokens is not None},
        "requests_at_max_tokens": sum(r.finish_reason == "length" for r in ok),
        "usage_reported": sum(r.usage_tokens is not None for r in ok),
        "ttft_ms": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itls]),
        "e2e_ms": _stats([r.e2e for r in ok]),
        **rss,
        "error_samples": sorted({r.error for r in errors if r.error})[:5],
    }
    return summary


def requests_for(n: int, min_requests: int, max_requests: int) -> int:
    """clamp(2N, min_requests, max_requests), and never fewer than N (one per worker)."""
    return min(max(2 * n, min_requests), max(max_requests, n))


async def run_closed(target: Target, n: int, num_requests: int, max_tokens: int, time_limit_s: float,
                     run: int = 1) -> dict:
    """N workers; each sends its next request when its previous one finishes."""
    results: list[RequestResult] = []
    state = {"next": 0, "stop": False, "in_flight": 0}
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    rss = RssMonitor(target.pid).start()
    async with httpx.AsyncClient(limits=limits, timeout=target.request_timeout_s) as client:
        started = time.perf_counter()
        deadline = started + time_limit_s

        async def worker() -> None:
            while not state["stop"] and state["next"] < num_requests and time.perf_counter() < deadline:
                i = state["next"]
                state["next"] += 1
                state["in_flight"] += 1
                try:
                    results.append(await send_indexed(client, target, i, run, max_tokens))
                finally:
                    state["in_flight"] -= 1

        tasks = [asyncio.create_task(worker()) for _ in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        truncated = bool(pending) or state["next"] < num_requests
        cancelled = 0
        if pending:  # past the limit: no new requests; a grace period for those in flight
            state["stop"] = True
            done, pending = await asyncio.wait(pending, timeout=min(60.0, time_limit_s))
            cancelled = state["in_flight"] if pending else 0
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return summarize(results, started, mode="closed", level=n, num_requests=num_requests,
                     cancelled=cancelled, rss=rss.stop(), truncated=truncated)


async def run_open(target: Target, rate: float, num_requests: int, max_tokens: int, time_limit_s: float,
                   run: int = 1, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s; every arrival is sent at once."""
    results: list[RequestResult] = []
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    rss = RssMonitor(target.pid).start()
    async with httpx.AsyncClient(limits=limits, timeout=target.request_timeout_s) as client:
        started = time.perf_counter()
        tasks = []
        t_next = started
        for i in range(num_requests):
            if t_next - started > time_limit_s:
                break
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            tasks.append(asyncio.create_task(send_indexed(client, target, i, run, max_tokens)))
            t_next += rng.expovariate(rate)
        remaining = max(1.0, started + time_limit_s + 60.0 - time.perf_counter())
        done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        results = [t.result() for t in done]
    summary = summarize(results, started, mode="open", level=rate, num_requests=num_requests,
                        cancelled=len(pending), rss=rss.stop(),
                        truncated=len(tasks) < num_requests or bool(pending))
    return summary


# -- capabilities --

async def _probe(target: Target, max_tokens: int, extra: dict, include_usage: bool,
                 prompt: str = PARIS_PROMPT) -> RequestResult:
    t = Target(**{**asdict(target), "extra_body": {**target.extra_body, **extra},
                  "include_usage": include_usage, "request_timeout_s": 300.0})
    async with httpx.AsyncClient() as client:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return await send(client, t, messages, max_tokens, keep_text=True)


def probe_prompt_tokens(target: Target, prompt: str = PARIS_PROMPT) -> int | None:
    """usage.prompt_tokens of a non-streaming request (for servers whose streams carry no usage)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    body = {"messages": messages, "max_tokens": 1, "temperature": 0.0}
    if target.model is not None:
        body["model"] = target.model
    try:
        r = httpx.post(target.base_url + "/v1/chat/completions", json=body, timeout=300)
        return r.json()["usage"]["prompt_tokens"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def served_model(base_url: str) -> str | None:
    """The first id GET /v1/models lists (None if the server does not say)."""
    try:
        data = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10).json().get("data") or []
        return data[0]["id"] if data else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def detect(target: Target, eos_policy: str = "auto", max_tokens: int = 32,
           eos_token_ids: tuple[int, ...] = (0, 2)) -> dict:
    """Check the server answers (greedy, "Paris"), whether it takes stream_options.include_usage
    and whether it honours ignore_eos; configures `target` accordingly and returns the findings."""
    info: dict = {}
    base = asyncio.run(_probe(target, max_tokens, {}, True))
    if not base.ok and base.error and base.error.startswith("HTTP 4"):
        info["stream_options_error"] = base.error
        target.include_usage = False
        base = asyncio.run(_probe(target, max_tokens, {}, False))
    if not base.ok:
        raise RuntimeError(f"{target.name}: probe request failed: {base.error}")
    target.include_usage = target.include_usage and base.usage_tokens is not None
    info["include_usage"] = target.include_usage
    info["paris_answer"] = base.text
    info["paris_prompt_tokens"] = base.prompt_tokens if base.prompt_tokens is not None else probe_prompt_tokens(target)
    info["paris_ok"] = "paris" in base.text.lower()
    info["natural_tokens"] = base.output_tokens
    info["ignore_eos"] = False
    info["ignore_eos_honoured"] = "not tried"
    if eos_policy == "auto":
        # Honoured: a prompt whose greedy answer ends before max_tokens runs to max_tokens with it.
        # Some builds' greedy answer to the Paris prompt runs on; then a second, shorter prompt.
        natural = base
        for prompt in (PARIS_PROMPT, "Reply with the single word OK."):
            if prompt != PARIS_PROMPT:
                natural = asyncio.run(_probe(target, max_tokens, {}, target.include_usage, prompt))
            probe = asyncio.run(_probe(target, max_tokens, {"ignore_eos": True}, target.include_usage, prompt))
            info["ignore_eos_probe"] = {"prompt": prompt, "natural_tokens": natural.output_tokens,
                                        "ok": probe.ok, "tokens": probe.output_tokens, "error": probe.error}
            if not probe.ok:  # rejected: never sent
                info["ignore_eos_honoured"] = "rejected"
                break
            if natural.ok and natural.output_tokens < max_tokens:
                info["ignore_eos_honoured"] = "yes" if probe.output_tokens == max_tokens else "no"
                break
            info["ignore_eos_honoured"] = "unknown"
        # Sent where honoured, or accepted but untestable (then harmless: the server may ignore it).
        if info["ignore_eos_honoured"] in ("yes", "unknown"):
            target.extra_body["ignore_eos"] = True
            info["ignore_eos"] = True
    elif eos_policy == "logit-bias":
        # Equal work everywhere: ban the end tokens through OpenAI's logit_bias (every server here
        # takes it); each request then runs to max_tokens.
        bias = {str(i): -100.0 for i in eos_token_ids}
        probe = asyncio.run(_probe(target, max_tokens, {"logit_bias": bias}, target.include_usage))
        info["logit_bias_probe"] = {"ok": probe.ok, "tokens": probe.output_tokens, "error": probe.error}
        if not probe.ok:
            raise RuntimeError(f"{target.name}: logit_bias rejected: {probe.error}")
        target.extra_body["logit_bias"] = bias
        info["logit_bias"] = bias
    return info


# -- plot --

def plot(runs_by_server: dict[str, list[dict]], path: Path, title: str) -> Path | None:
    """Output tok/s, median and p99 end-to-end latency and median TTFT versus concurrency."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    levels: set[int] = set()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, runs in runs_by_server.items():
        runs = sorted((r for r in runs if r.get("mode") == "closed" and r["completed"]),
                      key=lambda r: r["concurrency"])
        if not runs:
            continue
        xs = [r["concurrency"] for r in runs]
        levels.update(xs)
        (line,) = axes[0].plot(xs, [r["output_tok_s"] for r in runs], "o-", label=name)
        axes[1].plot(xs, [r["e2e_ms"]["median"] / 1000 for r in runs], "o-", color=line.get_color(),
                     label=f"{name} median")
        axes[1].plot(xs, [r["e2e_ms"]["p99"] / 1000 for r in runs], "x--", color=line.get_color(),
                     label=f"{name} p99")
        axes[2].plot(xs, [r["ttft_ms"]["median"] / 1000 for r in runs], "o-", color=line.get_color(),
                     label=f"{name} median")
    for ax, ylabel in zip(axes, ("output tok/s", "end-to-end latency (s)", "TTFT (s)")):
        ax.set_xscale("log")
        ax.set_xticks(sorted(levels))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[1:]:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt_run(r: dict) -> str:
    level = f"N={r['concurrency']}" if r["mode"] == "closed" else f"rate={r['request_rate']}/s"
    level = f"{r.get('sampling') or ''} {level}".strip()
    rss = f"  peak RSS {r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else ""
    med = lambda k: r[k]["median"] or float("nan")  # noqa: E731
    return (f"{level:10s} {r['completed']:4d} ok {r['errors']:3d} err  {r['request_throughput']:6.2f} req/s "
            f"{r['output_tok_s']:8.1f} tok/s  TTFT {med('ttft_ms'):8.0f} ms  TPOT {med('tpot_ms'):6.0f} ms  "
            f"e2e {med('e2e_ms'):8.0f} ms  out/req {r['mean_output_tokens'] or 0:.1f}{rss}")


def run_levels(target: Target, *, concurrency: list[int], rates: list[float], max_tokens: int,
               min_requests: int, max_requests: int, num_requests: int | None, time_limit_s: float,
               warmup: int, log=print, sampling: tuple[str, ...] = ("greedy",)) -> list[dict]:
    """Warm-up, then for each sampling pass every closed-loop level and every open-loop rate against
    one server (each run records its pass in run["sampling"])."""
    runs = []
    per_pass = len(concurrency) + len(rates)  # run numbers per pass: a later pass sends no prompt an earlier one did
    for i, mode in enumerate(sampling):
        runs += _run_pass(replace(target, sampling=mode), concurrency=concurrency, rates=rates,
                          max_tokens=max_tokens, min_requests=min_requests, max_requests=max_requests,
                          num_requests=num_requests, time_limit_s=time_limit_s, warmup=warmup if i == 0 else 0,
                          log=log, first_run=1 + i * per_pass)
    return runs


def _run_pass(target: Target, *, concurrency: list[int], rates: list[float], max_tokens: int,
              min_requests: int, max_requests: int, num_requests: int | None, time_limit_s: float,
              warmup: int, log=print, first_run: int = 1) -> list[dict]:
    if warmup:
        asyncio.run(run_closed(target, min(warmup, 4), warmup, max_tokens, time_limit_s, run=0))
    runs = []
    for level, n in enumerate(concurrency, first_run):  # each level its own run number: new prompts
        count = num_requests or requests_for(n, min_requests, max_requests)
        r = asyncio.run(run_closed(target, n, count, max_tokens, time_limit_s, run=level))
        r["sampling"] = target.sampling
        log(f"{target.name:16s} {fmt_run(r)}")
        runs.append(r)
    for level, rate in enumerate(rates, first_run + len(concurrency)):
        count = num_requests or max_requests
        r = asyncio.run(run_open(target, rate, count, max_tokens, time_limit_s, run=level))
        r["sampling"] = target.sampling
        log(f"{target.name:16s} {fmt_run(r)}")
        runs.append(r)
    return runs


def add_load_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--concurrency", type=int, nargs="*", default=None, help="closed-loop levels (default 1 8 32 100)")
    ap.add_argument("--request-rate", type=float, nargs="*", default=[], help="open-loop Poisson rates, requests/s")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sampling", nargs="+", choices=list(SAMPLING), default=["sampled", "greedy"],
                    help="passes, in order: sampled (temperature 0.7, seeded per request) and/or greedy")
    ap.add_argument("--num-requests", type=int, default=None,
                    help="requests per level (default: clamp(2N, --min-requests, --max-requests); "
                         "open loop: --max-requests)")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--max-requests", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="seconds per level: no new requests after it, in-flight ones get a grace period")
    ap.add_argument("--warmup", type=int, default=4, help="warm-up requests before the first level (0: none)")
    ap.add_argument("--eos-policy", choices=["auto", "natural", "logit-bias"], default="auto",
                    help="auto: send ignore_eos where the server honours it; natural: never; logit-bias: "
                         "ban --eos-token-ids with logit_bias -100 on every server (equal work)")
    ap.add_argument("--eos-token-ids", type=int, nargs="+", default=[0, 2],
                    help="end tokens for --eos-policy logit-bias (default: SmolLM2's <|endoftext|> <|im_end|>)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help='"model" field to send (default: first id of GET /v1/models)')
    ap.add_argument("--name", default=None, help="label for this server (default: the URL)")
    ap.add_argument("--pid", type=int, default=None, help="server process id, for peak RSS")
    ap.add_argument("--out", default=None, help="write benchmarks/results/<OUT>.json and .png")
    add_load_arguments(ap)
    args = ap.parse_args()
    if args.concurrency is None:
        args.concurrency = [] if args.request_rate else [1, 8, 32, 100]
    model = args.model or served_model(args.base_url)
    target = Target(args.base_url.rstrip("/"), name=args.name or args.base_url, model=model, pid=args.pid)
    info = detect(target, args.eos_policy, eos_token_ids=tuple(args.eos_token_ids))
    print(f"{target.name}: model={model!r} usage={info['include_usage']} ignore_eos={info['ignore_eos_honoured']} "
          f"paris={info['paris_ok']} ({info['paris_answer']!r})", flush=True)
    runs = run_levels(target, concurrency=args.concurrency, rates=args.request_rate, max_tokens=args.max_tokens,
                      min_requests=args.min_requests, max_requests=args.max_requests,
                      num_requests=args.num_requests, time_limit_s=args.time_limit, warmup=args.warmup,
                      log=lambda s: print(s, flush=True), sampling=tuple(args.sampling))
    if args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        js = RESULTS / f"{args.out}.json"
        js.write_text(json.dumps({"machine": machine(), "args": vars(args), "target": asdict(target),
                                  "probe": info, "runs": runs}, indent=2) + "\n")
        png = plot({f"{target.name} {m}": [r for r in runs if r["sampling"] == m] for m in args.sampling},
                   RESULTS / f"{args.out}.png", f"bench_serving: {target.name}")
        print(f"wrote {js}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
