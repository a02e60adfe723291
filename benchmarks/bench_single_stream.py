"""One stream, decode-bound: mlx-loom's engine vs mlx-lm's own `generate_step` loop (CPU proxy).

The host-overhead proxy from the pipelining issue: a random-weight llama with many narrow layers
(16 layers, hidden 256, 4/2 heads of 64, MLP 1024, vocab 4096, float32, tied), where per-step
Python and graph building weigh as much as the math, as on a GPU. N=1, --new-tokens greedy tokens
(EOS ignored), a new chat prompt per timed run and no prefix cache on any system, median of --repeats runs after a warm-up, each
system in its own process. Systems: "mlx-loom-ops" (layers as separate MLX ops:
MLX_LOOM_NATIVE_DECODE=0, the path GPU backends take), "mlx-loom-ops-sync" (the same with
asynchronous decode steps off: each step's tokens read before the next is built), "mlx-loom"
(default: the fused native decode layer where it applies), "mlx-lm" (`mlx_lm.generate.generate_step`, which builds step t+1
while step t runs; MLX's and mlx-lm's own modules: the loader's switches to our kernels are undone).

    .venv/bin/python benchmarks/bench_single_stream.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import chat_prompts, machine, median, write_results  # noqa: E402

SYSTEMS = ("mlx-loom-ops", "mlx-loom-ops-sync", "mlx-loom", "mlx-lm")
SHAPE = dict(vocab_size=4096, hidden_size=256, num_layers=16, num_heads=4, num_kv_heads=2, intermediate_size=1024,
             max_position_embeddings=4096)
CKPT = ROOT / "benchmarks" / ".cache" / "proxy-llama-16x256"


def checkpoint() -> Path:
    if not (CKPT / "model.safetensors").exists():
        import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
        from tiny_model import make_tiny_llama_dir

        make_tiny_llama_dir(CKPT, seed=0, **SHAPE)
    return CKPT


def run_loom(args, async_decode: bool) -> dict:
    import mlx_loom.kernels  # noqa: F401
    from mlx_loom.sched.config import CacheConfig, EngineConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.engine.messages import AddRequest
    from mlx_loom.models.loader import describe_backend, load_model
    from mlx_loom.sched.params import SamplingParams

    loaded = load_model(str(checkpoint()))
    # Prefix caching off: generate_step starts every prompt cold, so every system does.
    core = EngineCore(EngineConfig(cache=CacheConfig(enable_prefix_caching=False), async_decode=async_decode), loaded)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def once(run: int) -> float:
        (prompt,) = chat_prompts(loaded.tokenizer, 1, run)
        core.add(AddRequest(f"r{run}", tuple(prompt), params))
        t0 = time.perf_counter()
        produced = 0
        while core.has_unfinished():
            produced += sum(len(o.new_token_ids) for o in core.step())
        assert produced == args.new_tokens, produced
        return time.perf_counter() - t0

    once(0)
    return {"times_s": [once(r) for r in range(1, args.repeats + 1)],
            "backend": f"{describe_backend()}; forward: {core.runner.path}",
            "async_decode": async_decode, "pipelined_steps": core.pipelined_steps}


def run_mlx_lm(args) -> dict:
    import mlx_loom.kernels  # noqa: F401
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_loom.models.routing import unroute_model
    from mlx_loom.models.loader import describe_backend, load_model

    loaded = load_model(str(checkpoint()))
    unroute_model(loaded.model)  # the peer runs MLX's and mlx-lm's own modules, not our kernels

    def once(run: int) -> float:
        (prompt,) = chat_prompts(loaded.tokenizer, 1, run)
        t0 = time.perf_counter()
        n = 0
        for _ in generate_step(mx.array(prompt), loaded.model, max_tokens=args.new_tokens):
            n += 1
        mx.synchronize()
        assert n == args.new_tokens, n
        return time.perf_counter() - t0

    once(0)
    return {"times_s": [once(r) for r in range(1, args.repeats + 1)],
            "backend": f"{describe_backend()}; mlx-lm generate_step"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_single_stream")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_mlx_lm(args) if args.worker == "mlx-lm"
                         else run_loom(args, async_decode=not args.worker.endswith("-sync"))))
        return
    checkpoint()
    rows = []
    for system in args.systems:
        env = {**os.environ, **({"MLX_LOOM_NATIVE_DECODE": "0"} if system.startswith("mlx-loom-ops") else {})}
        cmd = [sys.executable, __file__, "--worker", system, "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)]
        data = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1])
        tps = args.new_tokens / median(data["times_s"])
        rows.append({"system": system, "tok_s": tps, **data})
        print(json.dumps(rows[-1]), flush=True)
    peer = next((r["tok_s"] for r in rows if r["system"] == "mlx-lm"), None)
    meta = machine()
    lines = ["# bench_single_stream: one stream on a narrow 16-layer random llama (host-overhead proxy)", "",
             f"{SHAPE}, float32. N=1, {args.new_tokens} greedy tokens (EOS ignored), new prompt per run, "
             "prefix caching off (generate_step has none), "
             f"median of {args.repeats} after a warm-up; each system in its own process. "
             f"Machine: {meta['platform']}, {meta['cpus']} CPUs, {meta['date']}.", "",
             "| system | tok/s | vs mlx-lm generate_step | backend |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tok_s'] / peer:.2f}x" if peer else "-"
        lines.append(f"| {r['system']} | {r['tok_s']:.1f} | {ratio} | {r['backend']} |")
    js, md = write_results(args.out, {"machine": meta, "shape": SHAPE, "new_tokens": args.new_tokens,
                                      "repeats": args.repeats, "results": rows}, "\n".join(lines) + "\n")
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
