"""Where the time of one streamed N = 1 request goes, per token: engine step, forward build,
sampling, waiting for the device, hand-off to the event loop, detokenization, stop strings,
SSE framing, and what the client sees; and on the way to its first token: HTTP, chat template,
hand-off to the engine, the prompt's step, back to the loop, to the client (FIRST_STAGES).

The server runs in this process (`create_app` under uvicorn in a thread) with timers wrapped
around the functions that do each part; the client is a subprocess that streams the response
over a socket and stamps each event with the same monotonic clock (`time.perf_counter` is
CLOCK_MONOTONIC on Linux, shared by processes). Each configuration (sampled: temperature 0.7
with a seed, or greedy; asynchronous decode on or off) gets its own server, a warm-up request,
then --runs requests of --tokens tokens (ignore_eos, one stop string that never matches, so the
matcher runs on every token). Timers nest (a step contains its forward build and sampling); the
table says which. Functions that a revision does not have are simply not timed, so the same
script profiles an older checkout (`--root`).

    .venv/bin/python benchmarks/profile_request.py --label after
    .venv/bin/python benchmarks/profile_request.py --root /tmp/base --label before
    .venv/bin/python benchmarks/profile_request.py --compare before after   # profile_request.md

benchmarks/profile_request.sh runs both revisions in turns, config by config (a shared machine's
load drifts: side by side, not one after the other).

Writes benchmarks/results/profile_request_<label>.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

ENGINE_SPANS = [  # (key, module, attribute path, what it is)
    ("engine.step", "mlx_loom.engine.core", "EngineCore.step", "one EngineCore.step call (contains the rows below)"),
    ("engine.forward_build", "mlx_loom.worker.runner", "ModelRunner.execute", "build the forward graph (lazy)"),
    ("engine.sample_build", "mlx_loom.engine.core", "sample_on_device", "build the sampling graph (lazy)"),
    ("engine.launch", "mlx.core", "async_eval", "mx.async_eval: start the graph (on the CPU backend it returns "
                                                "only after most of the graph ran)"),
    ("engine.read", "mlx_loom.engine.core", "read", "read a launched step's tokens: the device wait + unpack"),
    ("engine.sample_sync", "mlx_loom.engine.core", "sample", "synchronous sampling: build + wait + unpack"),
    ("engine.apply", "mlx_loom.engine.core", "EngineCore._apply", "tokens into requests: stops, finishes, outputs"),
    ("engine.stats", "mlx_loom.engine.core", "EngineCore.stats", "engine stats snapshot after each step"),
]
LOOP_SPANS = [
    ("loop.dispatch", "mlx_loom.engine.client", "EngineClient._dispatch", "a step's outputs to the request queues"),
    ("loop.detokenize", "mlx_loom.models.tokenizer", "IncrementalDetokenizer.feed", "incremental detokenization"),
    ("loop.stop_strings", "mlx_loom.server.stop", "StopMatcher.feed", "stop-string matching"),
    ("loop.sse_chunk", "mlx_loom.server.routes.chat", "_chunk", "build the chunk and frame the SSE event"),
]


class Timers:
    def __init__(self) -> None:
        self.spans: dict[str, list[float]] = defaultdict(list)
        self.hops: list[float] = []  # emit (engine thread) -> dispatch (loop) latency, s
        self.first: dict[str, float] = {}  # first-token stage -> when the request first got there
        self.enabled = False

    def reset(self) -> None:
        self.spans.clear()
        self.hops.clear()
        self.first.clear()

    def stamp(self, stage: str) -> None:
        if self.enabled:
            self.first.setdefault(stage, time.perf_counter())


TIMERS = Timers()


def _wrap(key: str, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        if not TIMERS.enabled:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMERS.spans[key].append(time.perf_counter() - t0)
    return timed


class _Stamped(list):
    t_emit = 0.0


FIRST_STAGES = [  # (stamp, the step that ends there): one request's way to its first token, in order
    ("route", "HTTP, routing and body validation (request sent -> chat route entered)"),
    ("rendered", "chat template + tokenization (in a worker thread)"),
    ("added", "hand-off to the engine thread (EngineCore.add)"),
    ("stepped", "the engine step that computes the prompt and samples its first token"),
    ("dispatched", "engine thread -> event loop (the step's outputs dispatched)"),
    ("client", "detokenize, SSE framing, socket, the client parsing the event"),
]


def _instrument_first_token() -> None:
    """Stamp each FIRST_STAGES point the first time the profiled request reaches it."""
    from mlx_loom.engine.client import EngineClient
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.server.routes import chat

    render, add, step, dispatch = chat.render_chat, EngineCore.add, EngineCore.step, EngineClient._dispatch

    async def stamped_render(*args, **kwargs):
        TIMERS.stamp("route")
        try:
            return await render(*args, **kwargs)
        finally:
            TIMERS.stamp("rendered")

    def stamped_add(self, msg):
        TIMERS.stamp("added")
        return add(self, msg)

    def stamped_step(self):
        out = step(self)
        if out and "added" in TIMERS.first:
            TIMERS.stamp("stepped")
        return out

    def stamped_dispatch(self, outputs):
        TIMERS.stamp("dispatched")
        return dispatch(self, outputs)

    chat.render_chat, EngineCore.add, EngineCore.step = stamped_render, stamped_add, stamped_step
    EngineClient._dispatch = stamped_dispatch


def instrument() -> list[str]:
    """Wrap every span's function that this revision has; the keys wrapped."""
    import importlib

    wrapped = []
    for key, module, path, _ in ENGINE_SPANS + LOOP_SPANS:
        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is None or not hasattr(owner, name):
            continue
        setattr(owner, name, _wrap(key, getattr(owner, name)))
        wrapped.append(key)
    from mlx_loom.engine.client import EngineClient

    emit, dispatch = EngineClient._emit_threadsafe, EngineClient._dispatch

    def stamped_emit(self, outputs):
        stamped = _Stamped(outputs)
        stamped.t_emit = time.perf_counter()
        return emit(self, stamped)

    def stamped_dispatch(self, outputs):
        if TIMERS.enabled and isinstance(outputs, _Stamped):
            TIMERS.hops.append(time.perf_counter() - outputs.t_emit)
        return dispatch(self, outputs)

    EngineClient._emit_threadsafe, EngineClient._dispatch = stamped_emit, stamped_dispatch
    try:
        _instrument_first_token()
    except (ImportError, AttributeError):  # an older revision without these names: no first-token rows
        pass
    return wrapped


# ---------------------------------------------------------------------------- client (subprocess)


def client_main(port: int, body: str) -> None:
    """Stream one request; print {"sent", "first_byte", "events": [times of content events]}."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    events, usage = [], None
    while True:
        line = resp.fp.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now = time.perf_counter()
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            events.append(now)
    print(json.dumps({"sent": sent, "events": events, "usage": usage}))


def _request_body(sampled: bool, tokens: int, run: int) -> str:
    sys.path.insert(0, str(HERE))
    from _common import chat_messages

    body = {"messages": chat_messages(run % 12, run), "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "stop": ["\n\nQ:"], "stream_options": {"include_usage": True}}
    body.update({"temperature": 0.7, "seed": 1234 + run} if sampled else {"temperature": 0.0})
    return json.dumps(body)


def _client(port: int, body: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--client", str(port)], input=body, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------- server (this process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_config(sampled: bool, async_decode: bool, tokens: int, runs: int) -> dict:
    import uvicorn
    import httpx

    from mlx_loom.engine.client import EngineClient
    from mlx_loom.server.app import create_app
    from mlx_loom.server.settings import Settings

    settings = Settings(log_level="warning")
    client = EngineClient(replace(settings.engine_config(), async_decode=async_decode))
    app = create_app(settings, client=client)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError("server did not become ready")
    _client(port, _request_body(sampled, tokens, 99))  # warm-up
    per_run = []
    for r in range(runs):
        TIMERS.reset()
        TIMERS.enabled = True
        got = _client(port, _request_body(sampled, tokens, r))
        TIMERS.enabled = False
        per_run.append(_summarize(got, dict(TIMERS.spans), list(TIMERS.hops), dict(TIMERS.first)))
    server.should_exit = True
    thread.join(60)
    return {"sampled": sampled, "async_decode": async_decode, "runs": per_run, "summary": _median_runs(per_run)}


def _first_token_ms(got: dict, first: dict[str, float]) -> dict[str, float]:
    """ms spent in each FIRST_STAGES step (only when every stage was stamped, in order)."""
    if not got["events"]:
        return {}
    times = [got["sent"]] + [first.get(k) for k, _ in FIRST_STAGES[:-1]] + [got["events"][0]]
    if None in times or any(b < a for a, b in zip(times, times[1:])):
        return {}
    return {k: 1e3 * (b - a) for (k, _), a, b in zip(FIRST_STAGES, times, times[1:])}


def _summarize(got: dict, spans: dict[str, list[float]], hops: list[float], first: dict[str, float]) -> dict:
    ev = got["events"]
    n = got["usage"]["completion_tokens"] if got.get("usage") else len(ev)
    gaps = [b - a for a, b in zip(ev, ev[1:])]
    out = {"tokens": n, "events": len(ev), "ttft_ms": 1e3 * (ev[0] - got["sent"]) if ev else None,
           "decode_tok_s": (len(ev) - 1) / (ev[-1] - ev[0]) if len(ev) > 1 else None,
           "gap_ms_p50": 1e3 * statistics.median(gaps) if gaps else None,
           "hop_ms_p50": 1e3 * statistics.median(hops) if hops else None,
           "per_token_ms": {k: 1e3 * sum(v) / max(n, 1) for k, v in spans.items()},
           "first_token_ms": _first_token_ms(got, first),
           "calls": {k: len(v) for k, v in spans.items()}}
    return out


def _median_runs(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r["per_token_ms"]}
    med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) else None  # noqa: E731
    return {"ttft_ms": med([r["ttft_ms"] for r in runs]), "decode_tok_s": med([r["decode_tok_s"] for r in runs]),
            "gap_ms_p50": med([r["gap_ms_p50"] for r in runs]), "hop_ms_p50": med([r["hop_ms_p50"] for r in runs]),
            "per_token_ms": {k: med([r["per_token_ms"].get(k, 0.0) for r in runs]) for k in sorted(keys)},
            "first_token_ms": {k: med([r.get("first_token_ms", {}).get(k) for r in runs]) for k, _ in FIRST_STAGES}}


# ---------------------------------------------------------------------------- report


def _describe(key: str) -> str:
    for k, _, path, what in ENGINE_SPANS + LOOP_SPANS:
        if k == key:
            return f"`{path}`: {what}"
    return key


def _config_name(c: dict) -> str:
    return f"{'sampled (T=0.7, seed)' if c['sampled'] else 'greedy'}, async_decode {'on' if c['async_decode'] else 'off'}"


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        lines.append(f"## {res['label']} ({res['revision']})\n")
        lines.append(f"Backend: {res['backend']}. {res['tokens']} tokens per request, median of {res['runs']} runs.\n")
        names = [_config_name(c) for c in res["configs"]]
        lines.append("| per token | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for row, key in [("client: decode tok/s", "decode_tok_s"), ("client: gap between events, p50 ms", "gap_ms_p50"),
                         ("client: TTFT ms", "ttft_ms"), ("engine thread -> loop hop, p50 ms", "hop_ms_p50")]:
            lines.append(f"| {row} | " + " | ".join(_fmt(c["summary"][key]) for c in res["configs"]) + " |")
        keys = [k for k, *_ in ENGINE_SPANS + LOOP_SPANS if any(k in c["summary"]["per_token_ms"] for c in res["configs"])]
        for key in keys:
            lines.append(f"| {_describe(key)} ms | " + " | ".join(_fmt(c["summary"]["per_token_ms"].get(key))
                                                                 for c in res["configs"]) + " |")
        if any(c["summary"].get("first_token_ms", {}).get(k) is not None for c in res["configs"] for k, _ in FIRST_STAGES):
            lines.append("| **first token** (ms per stage, request sent -> first content event) |" + " |" * len(names))
            for key, what in FIRST_STAGES:
                lines.append(f"| first token: {what} ms | " + " | ".join(
                    _fmt(c["summary"].get("first_token_ms", {}).get(key)) for c in res["configs"]) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _revision(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=True).stdout.strip()[:90]
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="after")
    ap.add_argument("--root", default=str(HERE.parent), help="checkout whose mlx_loom is profiled")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--configs", default="sampled-async,sampled-sync,greedy-async",
                    help="comma list of {sampled,greedy}-{async,sync}")
    ap.add_argument("--append", action="store_true", help="add these configs to the label's earlier results")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs="+", help="labels of earlier runs: write profile_request.md from them")
    args = ap.parse_args()
    if args.client:
        return client_main(args.client, sys.stdin.read())
    if args.compare:
        results = [json.loads((RESULTS / f"profile_request_{label}.json").read_text()) for label in args.compare]
        (RESULTS / "profile_request.md").write_text(
            "# One streamed N = 1 request, per token (benchmarks/profile_request.py)\n\n" + markdown(results))
        return
    sys.path.insert(0, args.root)
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.models.loader import describe_backend

    wrapped = instrument()
    configs = []
    # A first server in this process ran ~10-15% slower per token than the ones after it, whichever
    # configuration it had (greedy first: 106 tok/s, then sampled 117): one thrown away evens them out.
    first = args.configs.split(",")[0].split("-")
    profile_config(first[0] == "sampled", first[1] == "async", args.tokens, 1)
    for name in args.configs.split(","):
        kind, mode = name.split("-")
        configs.append(profile_config(kind == "sampled", mode == "async", args.tokens, args.runs))
        print(_config_name(configs[-1]), json.dumps(configs[-1]["summary"]), flush=True)
    res = {"label": args.label, "revision": _revision(Path(args.root)), "backend": describe_backend(),
           "tokens": args.tokens, "runs": args.runs, "timed": wrapped, "configs": configs}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"profile_request_{args.label}.json"
    if args.append and path.exists():  # configs run in turns with another revision's, one file per label
        res["configs"] = json.loads(path.read_text())["configs"] + configs
    path.write_text(json.dumps(res, indent=1))
    (RESULTS / f"profile_request_{args.label}.md").write_text(markdown([res]))


if __name__ == "__main__":
    main()
