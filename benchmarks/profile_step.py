"""Where one N = 1 decode step's time goes on the CPU (engine alone, the default GGUF).

Part 1, the engine: one request decoding --tokens tokens through EngineCore.step (pipelined),
with host timers around each piece the step runs (graph build, sampling build, async_eval,
the read that waits for the device). Part 2, the device: the same decode step rebuilt from the
last step's rows and evaluated piece by piece (embedding + the fused layers, each layer, the
head, sampling), each piece's inputs evaluated first, so each time is that piece alone. A layer
evaluated alone repeats with its weights warm in the cache: the 30-layer chain (weights from DRAM)
is the layers' real cost. "async_eval returns after" (nothing in flight) against the engine's
async_eval (step t+1 launched while t runs) shows whether launching overlaps the running step.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_step.py --out profile_step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_loom.kernels  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from _common import chat_prompts, write_results  # noqa: E402


class Timers:
    """Wall-clock ms per named piece, per call."""

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.ms.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
        return timed

    def median(self, name: str, skip: int = 8) -> float | None:
        v = self.ms.get(name, [])[skip:]
        return statistics.median(v) if v else None


def engine_part(core, prompt: list[int], params, tokens: int) -> tuple[dict, dict]:
    """Per-step host timings of one request; returns (medians, the last decode step's execute args)."""
    from mlx_loom.engine import core as core_mod
    from mlx_loom.engine.messages import AddRequest

    t = Timers()
    last: dict = {}
    runner = core.runner
    orig_exec = runner.execute

    def execute(rows, toks=None):
        last.update(rows=rows, tokens=toks)
        return orig_exec(rows, toks)

    patches = {"sample_on_device": core_mod.sample_on_device, "read": core_mod.read}
    runner.execute = t.wrap("execute", execute)
    core_mod.sample_on_device = t.wrap("sample_on_device", patches["sample_on_device"])
    core_mod.read = t.wrap("read", patches["read"])
    orig_async = core_mod.mx.async_eval
    core_mod.mx.async_eval = t.wrap("async_eval", orig_async)
    try:
        core.add(AddRequest("prof", tuple(prompt), params))
        steps = []
        while core.has_unfinished():
            t0 = time.perf_counter()
            core.step()
            steps.append((time.perf_counter() - t0) * 1e3)
    finally:
        runner.execute = orig_exec
        core_mod.sample_on_device, core_mod.read = patches["sample_on_device"], patches["read"]
        core_mod.mx.async_eval = orig_async
    steady = steps[8:-2]
    out = {"engine: EngineCore.step ms": statistics.median(steady), "engine: tok/s": 1e3 / statistics.median(steady)}
    for name in ("execute", "sample_on_device", "async_eval", "read"):
        out[f"engine: {name} ms (per step)"] = t.median(name)
    return out, last


def device_part(core, last: dict, params, reps: int) -> dict:
    """Each piece of the step alone (inputs evaluated first), median ms over reps."""
    from mlx_loom.kernels import decode_layer as fused
    from mlx_loom.sample.sampler import sample_on_device
    from mlx_loom.worker.runner import build_decode_batch

    runner = core.runner
    rows = last["rows"]
    d = build_decode_batch(rows, runner.block_size)
    mx.eval(d.tokens, d.slots, d.positions, d.block_tables)
    inner = runner.model.model

    def clock(fn) -> float:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    def layers(h):
        for i, (w, spec, inv) in enumerate(runner.fused_layers):
            h, runner.k_pools[i], runner.v_pools[i] = fused.decode_layer(
                h, w, runner.k_pools[i], runner.v_pools[i], d.slots, d.positions, d.block_tables, inv, spec)
        return h

    out = {}
    h0 = inner.embed_tokens(d.tokens)
    mx.eval(h0)
    out["embedding ms"] = clock(lambda: mx.eval(inner.embed_tokens(d.tokens)))
    out["30 fused layers, one graph ms"] = clock(lambda: mx.eval(layers(h0)))
    per = []
    for i, (w, spec, inv) in enumerate(runner.fused_layers):
        per.append(clock(lambda: mx.eval(fused.decode_layer(
            h0, w, runner.k_pools[i], runner.v_pools[i], d.slots, d.positions, d.block_tables, inv, spec)[0])))
    out["one layer alone (weights warm), median ms"] = statistics.median(per)
    out["sum of layers alone (weights warm) ms"] = sum(per)
    hn = inner.norm(h0)
    mx.eval(hn)
    out["final norm ms"] = clock(lambda: mx.eval(inner.norm(h0)))
    out["head (tied 8-bit embedding) ms"] = clock(lambda: mx.eval(runner._logits(hn)))
    logits = runner._logits(hn)
    mx.eval(logits)
    rows_s = _sampling_rows(core, rows, params)
    out["sampling ms"] = clock(lambda: mx.eval(*sample_on_device(logits, rows_s).arrays()))
    out["build step graph (lazy) ms"] = clock(lambda: runner.execute(rows, None))

    def whole():
        lg, _ = runner.execute(rows, None)
        mx.eval(*sample_on_device(lg, rows_s).arrays())
    out["build + evaluate the whole step, synchronous ms"] = clock(whole)

    def async_return():  # how long mx.async_eval takes to return, then the rest of the wait
        lg, _ = runner.execute(rows, None)
        arrs = sample_on_device(lg, rows_s).arrays()
        t0 = time.perf_counter()
        mx.async_eval(*arrs)
        t1 = time.perf_counter()
        mx.eval(*arrs)
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
    pairs = [async_return() for _ in range(reps)]
    out["async_eval returns after ms"] = statistics.median(p[0] for p in pairs)
    out["then waiting for the rest ms"] = statistics.median(p[1] for p in pairs)
    runner.discard_derived()
    return out


def _sampling_rows(core, rows, params):
    from mlx_loom.sample.sampler import SamplingRow
    return [SamplingRow(params, (), (), params.seed or 0) for _ in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="profile_step")
    ap.add_argument("--sync", action="store_true", help="async_decode off: each step read before the next")
    ap.add_argument("--engine-only", action="store_true", help="skip the piece-by-piece device part")
    args = ap.parse_args()
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.kernels import qmm
    from mlx_loom.models.loader import default_model_path, describe_backend, load_model
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
    from mlx_loom.sched.params import SamplingParams

    loaded = load_model(default_model_path())
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256),
                          scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512),
                          async_decode=not args.sync)
    core = EngineCore(config, loaded)
    prompt = chat_prompts(loaded.tokenizer, 1)[0]
    modes = {"greedy": SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True),
             "sampled (T=0.7, seed)": SamplingParams(max_tokens=args.tokens, temperature=0.7, seed=1, ignore_eos=True)}
    table: dict[str, dict] = {}
    for mode, params in modes.items():
        engine, last = engine_part(core, prompt, params, args.tokens)
        engine, last = engine_part(core, prompt, params, args.tokens)  # the first ran warm-up work
        table[mode] = {**engine, **({} if args.engine_only else device_part(core, last, params, args.reps))}
    info = {"backend": describe_backend(), "path": core.runner.path, "native_threads": qmm.native_module().num_threads(), "tokens": args.tokens, "reps": args.reps,
            "async_decode": not args.sync}
    write_results(args.out, {"info": info, "rows": table}, _markdown(info, table))


def _markdown(info: dict, table: dict) -> str:
    modes = list(table)
    keys = list(table[modes[0]])
    lines = ["# One N = 1 decode step, piece by piece (benchmarks/profile_step.py)", "",
             f"Backend: {info['backend']}; path: {info['path']}; native threads: {info['native_threads']}; "
             f"{info['tokens']} tokens per request, device pieces median of {info['reps']}.", "",
             "| ms (median) | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for k in keys:
        vals = [table[m].get(k) for m in modes]
        lines.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
