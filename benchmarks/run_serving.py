"""Serving benchmark: mlx-loom against mlx_lm.server and llama.cpp servers, same model, one at a time.

Each server is started on 127.0.0.1 on a free port in its own process group, waited for
(health check with a timeout), probed (greedy "capital of France" must mention Paris; whether
it takes stream_options.include_usage and honours ignore_eos), warmed up, then driven by
benchmarks/bench_serving.py's closed loop at each concurrency N (and open loop at each
--request-rate), and stopped (the whole process group; also on errors and Ctrl-C).

Servers (all on the default SmolLM2-135M-Instruct unless --gguf):
  mlx-loom          `mlx-loom serve` (GGUF 4/8-bit on the native CPU kernels when built, else float32)
  mlx_lm.server     mlx-lm's server on the same float32 weights converted once to an mlx-lm
                    directory (benchmarks/.cache), through benchmarks/mlx_lm_server.py, which
                    preloads the same OpenBLAS before mlx
  llama-cpp-python  `python -m llama_cpp.server` (Q4_1 GGUF as is; one request at a time: the
                    Python server serialises generation on one llama context)
  llama-server      llama.cpp's native server (continuous batching over --parallel slots), when
                    built with `bash benchmarks/build_llama_server.sh` (or --llama-server-bin)

    .venv/bin/python benchmarks/run_serving.py                 # N = 1 8 32 100, every server
    .venv/bin/python benchmarks/run_serving.py --quick         # N = 1 8, few requests
    .venv/bin/python benchmarks/run_serving.py --servers mlx-loom llama-server --concurrency 8 32

Writes benchmarks/results/bench_serving.{json,md,png} (--quick: bench_serving_quick.*), server
logs under benchmarks/.cache/logs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, machine  # noqa: E402
from bench_serving import (Target, add_load_arguments, detect, plot, requests_for, run_levels,  # noqa: E402
                           served_model)

CACHE = HERE / ".cache"
ALL_SERVERS = ["mlx-loom", "mlx_lm.server", "llama-cpp-python", "llama-server"]
LOOM_VARIANTS = ["mlx-loom-sync", "mlx-loom-base"]
"""A/B variants, never run by default: mlx-loom with --no-async-decode (every step synchronous), and
mlx-loom from another checkout (--loom-base-root, e.g. a worktree of the previous commit)."""
VENV_BIN = Path(sys.executable).parent


def _loom_defaults_note() -> str:
    sys.path.insert(0, str(ROOT))
    from mlx_loom.sched.config import CacheConfig, SchedulerConfig  # pure Python, no mlx

    return (f"other settings at their defaults (kv-cache-memory-gb {CacheConfig.kv_cache_memory_gb}, "
            f"max-num-batched-tokens {SchedulerConfig.max_num_batched_tokens}, prefix caching on)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    name: str
    cmd: list[str]
    port: int
    health_path: str  # 200 once the model is loaded
    model: str | None = None  # "model" field to send; None: first id of GET /v1/models
    settings: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# -- process management --

_LIVE: dict[int, subprocess.Popen] = {}


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after grace_s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)
    _LIVE.pop(proc.pid, None)


@atexit.register
def _kill_all() -> None:
    for proc in list(_LIVE.values()):
        _kill_group(proc, grace_s=5.0)


def _on_sigterm(signum, frame):  # turn SIGTERM/SIGHUP into SystemExit so `finally` blocks run
    raise SystemExit(128 + signum)


class RunningServer:
    """Start a server in its own session/process group; wait until healthy; always stop it."""

    def __init__(self, spec: ServerSpec, log_dir: Path, start_timeout_s: float) -> None:
        self.spec, self.start_timeout_s = spec, start_timeout_s
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{spec.name}.log"
        self.proc: subprocess.Popen | None = None
        self.load_s: float | None = None

    def __enter__(self) -> RunningServer:
        log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.spec.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.env})
        log.close()
        _LIVE[self.proc.pid] = self.proc
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.load_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self) -> None:
        deadline = time.time() + self.start_timeout_s
        url = self.spec.base_url + self.spec.health_path
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.spec.name} not healthy after {self.start_timeout_s:.0f} s; log tail:\n"
                           f"{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _kill_group(self.proc)


# -- server specs --

def default_gguf() -> str:
    sys.path.insert(0, str(ROOT))
    from mlx_loom.models.loader import default_model_path  # no mlx import

    return default_model_path()


def find_llama_server(explicit: str | None) -> str | None:
    for cand in (explicit, CACHE / "llama-server" / "bin" / "llama-server", shutil.which("llama-server")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def _git_head(root) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def make_spec(name: str, args, gguf: str) -> ServerSpec | None:
    port = free_port()
    host = ["--host", "127.0.0.1", "--port", str(port)]
    threads = str(args.threads)
    max_n = max(args.concurrency or [1])
    if name.startswith("mlx-loom"):
        extra = ["--max-num-seqs", str(args.loom_max_num_seqs), "--log-level", "warning"]
        if args.gguf:
            extra += ["--model", gguf]
        extra += shlex.split(args.loom_args) + (["--no-async-decode"] if name == "mlx-loom-sync" else [])
        root = ROOT
        if name == "mlx-loom-base":
            if not args.loom_base_root:
                print("mlx-loom-base needs --loom-base-root: skipped", file=sys.stderr)
                return None
            root = Path(args.loom_base_root).resolve()
        # The checkout's own mlx_loom first on the path (not whichever one the venv installed).
        boot = f"import sys; sys.path.insert(0, {str(root)!r}); from mlx_loom.server.cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", boot, "serve", *host, *extra]
        return ServerSpec(name, cmd, port, "/health", settings={
            "max_num_seqs": args.loom_max_num_seqs, "extra_args": " ".join(extra[4:]),
            "weights": "GGUF 4/8-bit on the native CPU kernels when built (else float32)",
            "code": f"{root} ({_git_head(root)})", "note": _loom_defaults_note()})
    if name == "mlx_lm.server":
        from mlx_lm_server import convert, default_out_dir

        model_dir = convert(default_out_dir(args.gguf), args.gguf)
        cmd = [sys.executable, str(HERE / "mlx_lm_server.py"), "serve", "--model", str(model_dir), *host,
               "--decode-concurrency", str(args.mlx_lm_decode_concurrency),
               "--prompt-concurrency", str(args.mlx_lm_prompt_concurrency), "--log-level", "WARNING"]
        return ServerSpec(name, cmd, port, "/health", model="default_model", settings={
            "decode_concurrency": args.mlx_lm_decode_concurrency,
            "prompt_concurrency": args.mlx_lm_prompt_concurrency,
            "weights": f"float32 mlx-lm directory {model_dir.name} converted by benchmarks/mlx_lm_server.py",
            "blas": "system OpenBLAS preloaded RTLD_GLOBAL before mlx (mlx_loom/kernels/blas.py)"})
    if name == "llama-cpp-python":
        try:
            import llama_cpp
        except ImportError:
            print("llama-cpp-python not installed (pip install -e '.[bench]'): skipped", file=sys.stderr)
            return None
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, *host,
               "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "2048",
               "--n_batch", "512", "--interrupt_requests", "False", "--verbose", "False"]
        return ServerSpec(name, cmd, port, "/v1/models", settings={
            "version": llama_cpp.__version__, "n_threads": args.threads, "n_ctx": 2048,
            "n_batch": 512, "interrupt_requests": False, "verbose": False,
            "note": "llama-cpp-python's server has no parallel slots: it serves one request at a time "
                    "(requests queue on a lock); interrupt_requests=False so a new request does not cut "
                    "the streaming one short (its default True would); weights Q4_1 as in the GGUF"})
    if name == "llama-server":
        binary = find_llama_server(args.llama_server_bin)
        if binary is None:
            print("llama-server binary not found (bash benchmarks/build_llama_server.sh, or --llama-server-bin): "
                  "skipped", file=sys.stderr)
            return None
        slots = args.llama_parallel or max(max_n, 1)
        ctx = max(2048, slots * args.llama_ctx_per_seq)
        cmd = [binary, "--model", gguf, *host, "--threads", threads, "--threads-batch", threads,
               "--parallel", str(slots), "--ctx-size", str(ctx), "--kv-unified", "--cont-batching",
               "--batch-size", "512", "--no-webui", "--jinja"]
        return ServerSpec(name, cmd, port, "/health", settings={
            "binary": binary, "parallel": slots, "ctx_size": ctx, "threads": args.threads,
            "kv_unified": True, "cont_batching": True, "batch_size": 512, "jinja": True,
            "note": "llama.cpp's native server: continuous batching over --parallel slots, Q4_1 weights "
                    "as in the GGUF, f16 KV cache; --jinja renders the GGUF's own chat template (as mlx-loom "
                    "does), not a built-in one"})
    raise ValueError(name)


# -- one server --

def backend_of(spec: ServerSpec) -> str:
    """What the server actually runs on: mlx-loom says so itself (/v1/engine/stats); llama-server
    prints its build; for the Python peers, the installed versions."""
    from importlib.metadata import version

    if spec.name.startswith("mlx-loom"):
        return httpx.get(spec.base_url + "/v1/engine/stats", timeout=30).json()["backend"]
    if spec.name == "llama-server":
        out = subprocess.run([spec.cmd[0], "--version"], capture_output=True, text=True, timeout=60)
        return " ".join((out.stdout + out.stderr).split())[-300:]
    if spec.name == "mlx_lm.server":
        return f"mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, CPU, float32 weights, OpenBLAS preloaded"
    return f"llama-cpp-python {version('llama_cpp_python')} (its bundled llama.cpp), CPU"


def bench_server(spec: ServerSpec, args, log_dir: Path) -> dict:
    print(f"\n== {spec.name}: {' '.join(spec.cmd)}", flush=True)
    record: dict = {"name": spec.name, "command": spec.cmd, "settings": spec.settings}
    with RunningServer(spec, log_dir, args.start_timeout) as srv:
        record["load_s"] = srv.load_s
        record["backend"] = backend_of(spec)
        print(f"{spec.name}: backend {record['backend']}", flush=True)
        model = spec.model or served_model(spec.base_url)
        target = Target(spec.base_url, name=spec.name, model=model, pid=srv.proc.pid)
        record["probe"] = detect(target, args.eos_policy, eos_token_ids=tuple(args.eos_token_ids))
        p = record["probe"]
        print(f"{spec.name}: ready in {srv.load_s:.1f} s; model={model!r} usage={p['include_usage']} "
              f"ignore_eos={p['ignore_eos_honoured']} paris={p['paris_ok']} ({p['paris_answer']!r})", flush=True)
        if not p["paris_ok"]:
            print(f"WARNING: {spec.name} did not mention Paris", file=sys.stderr)
        print(f"{spec.name}: Paris probe prompt tokens {p.get('paris_prompt_tokens')}", flush=True)
        record["target"] = {k: v for k, v in asdict(target).items() if k not in ("pid",)}
        record["runs"] = run_levels(target, concurrency=args.concurrency, rates=args.request_rate,
                                    max_tokens=args.max_tokens, min_requests=args.min_requests,
                                    max_requests=args.max_requests, num_requests=args.num_requests,
                                    time_limit_s=args.time_limit, warmup=args.warmup,
                                    log=lambda s: print(s, flush=True), sampling=tuple(args.sampling))
        if srv.proc.poll() is not None:
            record["crashed"] = f"exited with {srv.proc.returncode}"
    return record


# -- report --

def _f(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def report(records: list[dict], args) -> str:
    ok = [r for r in records if r.get("runs")]
    names = [r["name"] for r in ok]
    modes = list(dict.fromkeys(run.get("sampling") or "greedy" for r in ok for run in r["runs"]))
    by = {(r["name"], run.get("sampling") or "greedy", run["concurrency"]): run
          for r in ok for run in r["runs"] if run["mode"] == "closed"}
    lines = [
        "# bench_serving: streaming chat completions over HTTP, closed loop",
        "",
        f"Model: {args.gguf or 'default SmolLM2-135M-Instruct (GGUF Q4_1)'}; max_tokens {args.max_tokens}, "
        f"passes: {', '.join(modes)} (sampled: temperature 0.7 with a seed per request; greedy: temperature 0), "
        f"varied prompts (benchmarks/_common.py questions after one shared system prompt, every "
        f"request of the whole run new, so each server meets the same cold prefix cache); "
        f"N workers each sending its next request when the previous finishes; requests per N: "
        + (str(args.num_requests) if args.num_requests else f"clamp(2N, {args.min_requests}, {args.max_requests})")
        + f"; time limit {args.time_limit:.0f} s per N; {args.warmup} warm-up requests per server. "
        "Output tokens are the servers' own counts (usage, else content chunks); "
        f"end-of-sequence policy: {args.eos_policy} (see each server below and out tok/req). "
        "Every server on 127.0.0.1, one at a time, on this machine's CPUs.",
        f"Machine: {machine()['platform']}, {machine()['cpus']} CPUs, {machine()['date']}.",
        "",
    ]
    if args.quick:
        lines += ["**Smoke run (--quick): few requests, not a measurement to compare or quote.**", ""]
    if not ok:
        return "\n".join(lines + ["No server produced results."]) + "\n"
    head = "| N | " + " | ".join(f"{n} tok/s" for n in names)
    others = [n for n in names if n != "mlx-loom"] if "mlx-loom" in names else []
    head += "".join(f" | mlx-loom / {n}" for n in others)
    head += " | " + " | ".join(f"{n} peak RSS MB" for n in names) + " |"
    for mode in modes:
        lines += [f"**{mode}**: output tokens per second (ratios are mlx-loom's output tok/s over the other "
                  "server's):", "", head, "|" + "---|" * (1 + len(names) + len(others) + len(names))]
        for n in args.concurrency:
            row = [str(n)]
            row += [_f(by.get((s, mode, n), {}).get("output_tok_s")) for s in names]
            loom = by.get(("mlx-loom", mode, n), {}).get("output_tok_s")
            for o in others:
                other = by.get((o, mode, n), {}).get("output_tok_s")
                row.append(f"{loom / other:.2f}x" if loom and other else "-")
            row += [_f(by.get((s, mode, n), {}).get("peak_rss_mb"), ".0f") for s in names]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    probe = ", ".join(f"{r['name']} {r['probe'].get('paris_prompt_tokens')}" for r in ok)
    lines += ["", "Mean prompt tokens per request (the servers' own usage counts; the same prompts must count "
              "alike on every server, request by request, else the run fails; means differ where a server "
              "failed some requests; '-': the server's streams carry no usage, its count of the probe prompt "
              f"is checked instead). Probe prompt tokens: {probe}.", "",
              "| N | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for n in args.concurrency:
        lines.append(f"| {n} | " + " | ".join(_f(by.get((s, modes[0], n), {}).get("mean_prompt_tokens"), ".2f")
                                              for s in names) + " |")
    problems = same_work(records)
    lines += ["", "Same work: " + ("every server counted the same prompt tokens." if not problems else
                                   "**FAILED**: " + "; ".join(problems))]
    lines += ["", "Peak RSS: the server's process tree, sampled every 0.1 s during that N's run.", "",
              "Latency (ms; median / p99) and request-level detail:", "",
              "| server | pass | N | req/s | out tok/req | TTFT | TPOT | ITL | end-to-end | errors |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda d: f"{_f(d['median'], '.0f')} / {_f(d['p99'], '.0f')}"  # noqa: E731
    for r in ok:
        for run in r["runs"]:
            level = run.get("concurrency", f"rate {run.get('request_rate')}/s")
            trunc = " (time limit)" if run["truncated_by_time_limit"] else ""
            lines.append(f"| {r['name']} | {run.get('sampling') or 'greedy'} | {level}{trunc} | "
                         f"{run['request_throughput']:.2f} | "
                         f"{_f(run['mean_output_tokens'])} | {ms(run['ttft_ms'])} | {ms(run['tpot_ms'])} | "
                         f"{ms(run['itl_ms'])} | {ms(run['e2e_ms'])} | {run['errors']} |")
    lines += ["", "Servers:", ""]
    for r in records:
        if not r.get("runs"):
            lines.append(f"- {r['name']}: not run ({r.get('error', 'skipped')})")
            continue
        p = r["probe"]
        lines.append(f"- **{r['name']}**: `{' '.join(_short(c) for c in r['command'])}`; "
                     f"backend: {r.get('backend', '?')}; "
                     + "; ".join(f"{k}={v}" for k, v in r["settings"].items())
                     + (f"; logit_bias {p['logit_bias']} on every request" if p.get("logit_bias") else
                        f"; ignore_eos: {'sent' if p['ignore_eos'] else 'not sent'} (honoured: {p['ignore_eos_honoured']})")
                     + f"; usage in stream: {'yes' if p['include_usage'] else 'no (content chunks counted)'}"
                     + f"; greedy Paris check: {'ok' if p['paris_ok'] else 'FAILED, answered ' + repr(p['paris_answer'][:60])}"
                     + (f"; CRASHED: {r['crashed']}" if r.get("crashed") else ""))
    return "\n".join(lines) + "\n"


def same_work(records: list[dict]) -> list[str]:
    """Mismatches in prompt tokens between servers (empty: every server got the same prompts).
    The same prompts through the same GGUF's template and tokenizer must count alike. The probe
    (non-streaming where a server's streams carry no usage) must be counted by every server; the
    levels are compared request by request (the same prompt index of the same level) between the
    servers that report usage in their streams; requests that failed on a server are left out."""
    ok = [r for r in records if r.get("runs")]
    problems = []
    probe = {r["name"]: r["probe"].get("paris_prompt_tokens") for r in ok}
    if len(set(probe.values())) > 1 or None in probe.values():
        problems.append(f"probe prompt tokens differ or are unknown: {probe}")
    levels: dict = {}
    for r in ok:
        for run in r["runs"]:
            counts = run.get("prompt_tokens_by_request") or {}
            level = (run.get("sampling") or "greedy", run.get("concurrency", run.get("request_rate")))
            levels.setdefault(level, {})[r["name"]] = counts
    for level, by in levels.items():
        per_request: dict = {}
        for name, counts in by.items():
            for index, n in counts.items():
                per_request.setdefault(index, {})[name] = n
        differ = {i: c for i, c in per_request.items() if len(set(c.values())) > 1}
        if differ:
            i, c = next(iter(differ.items()))
            problems.append(f"{level[0]} N={level[1]}: {len(differ)} requests counted differently, e.g. request {i}: {c}")
    return problems


def _short(part: str) -> str:
    p = str(part)
    for base, label in ((str(ROOT) + "/", ""), (str(Path.home()), "~")):
        p = p.replace(base, label)
    return p if len(p) < 80 else "…/" + Path(p).name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", nargs="+", choices=ALL_SERVERS + LOOM_VARIANTS, default=ALL_SERVERS)
    ap.add_argument("--loom-base-root", default=None, help="checkout run as mlx-loom-base (A/B against it)")
    ap.add_argument("--gguf", default=None, help="GGUF model for every server (default: embedded SmolLM2-135M)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N = 1 8, 8 requests per N (4 at N=1), 60 s per N, 2 warm-up requests")
    ap.add_argument("--out", default=None, help="results name (default bench_serving, --quick: bench_serving_quick)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for a server to be healthy")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    ap.add_argument("--loom-max-num-seqs", type=int, default=128)
    ap.add_argument("--loom-args", default="", help="extra `mlx-loom serve` options, e.g. '--kv-cache-memory-gb 0.5'")
    ap.add_argument("--mlx-lm-decode-concurrency", type=int, default=128)
    ap.add_argument("--mlx-lm-prompt-concurrency", type=int, default=8)
    ap.add_argument("--llama-server-bin", default=None)
    ap.add_argument("--llama-parallel", type=int, default=None, help="llama-server slots (default: max N)")
    ap.add_argument("--llama-ctx-per-seq", type=int, default=256,
                    help="llama-server: KV tokens per slot (--ctx-size = slots x this, one unified KV buffer)")
    add_load_arguments(ap)
    args = ap.parse_args()
    if args.quick:
        args.concurrency = args.concurrency or [1, 8]
        args.min_requests, args.max_requests = min(args.min_requests, 4), min(args.max_requests, 8)
        args.time_limit = min(args.time_limit, 60.0)
        args.warmup = min(args.warmup, 2)
    args.concurrency = [1, 8, 32, 100] if args.concurrency is None else args.concurrency
    out = args.out or ("bench_serving_quick" if args.quick else "bench_serving")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    gguf = args.gguf or default_gguf()
    counts = {n: args.num_requests or requests_for(n, args.min_requests, args.max_requests) for n in args.concurrency}
    print(f"servers {args.servers}; N {args.concurrency}; requests per N {counts}; max_tokens {args.max_tokens}; "
          f"time limit {args.time_limit:.0f} s per N", flush=True)
    log_dir = CACHE / "logs"
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    records: list[dict] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md, png = (RESULTS / f"{out}.{ext}" for ext in ("json", "md", "png"))

    def save() -> None:
        js.write_text(json.dumps({"machine": machine(), "args": vars(args), "servers": records,
                                  "same_work_problems": same_work(records)}, indent=2) + "\n")
        md.write_text(report(records, args))
        drawn = plot({f"{r['name']} {m}": [x for x in r["runs"] if x.get("sampling") == m]
                      for r in records if r.get("runs") for m in args.sampling}, png,
                     f"bench_serving: streaming chat, max_tokens {args.max_tokens}, {machine()['cpus']} CPUs")
        if drawn is None:  # no matplotlib: an older run's plot must not sit beside these numbers
            png.unlink(missing_ok=True)

    try:
        for name in args.servers:
            spec = make_spec(name, args, gguf)
            if spec is None:
                records.append({"name": name, "error": "not available (see stderr)"})
                continue
            try:
                records.append(bench_server(spec, args, log_dir))
            except (RuntimeError, TimeoutError, httpx.HTTPError, OSError) as e:
                print(f"{name} FAILED: {e}", file=sys.stderr)
                records.append({"name": name, "command": spec.cmd, "settings": spec.settings, "error": str(e)[:2000]})
            save()
    finally:
        _kill_all()
    save()
    print("\n" + md.read_text())
    print("wrote " + ", ".join(str(p) for p in (js, md, png) if p.exists()))
    if problems := same_work(records):
        sys.exit("run_serving: the servers did not get the same work: " + "; ".join(problems))


if __name__ == "__main__":
    main()
