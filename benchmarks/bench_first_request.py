"""The first request after start-up: what the warm-up before ready buys.

Each run is a fresh process: load the model, (mlx-loom) run the self-check and, for "mlx-loom",
the warm-up that runs before /health says 200; then time the first request and a second one (new
chat prompts, --new-tokens greedy tokens, EOS ignored): time to first token and total. Systems:
"mlx-loom" (warm-up on, as served), "mlx-loom-no-warmup" (`--no-warmup`), "mlx-lm"
(`mlx_lm.generate.generate_step` straight after loading: it has no warm-up; MLX's and mlx-lm's own
modules, so quantized layers on mx.quantized_matmul). Medians over
--repeats processes. On a GPU backend the first request otherwise pays kernel JIT compilation.

    .venv/bin/python benchmarks/bench_first_request.py [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import chat_prompts, machine, median, write_results  # noqa: E402

SYSTEMS = ("mlx-loom", "mlx-loom-no-warmup", "mlx-lm")


def run_loom(args, warmup: bool) -> dict:
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.sched.config import EngineConfig
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.engine.messages import AddRequest
    from mlx_loom.models.loader import describe_backend, load_model
    from mlx_loom.sched.params import SamplingParams

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    core = EngineCore(EngineConfig(model=args.model), loaded)
    load_s = time.perf_counter() - t0
    warm_s = core.warm_up().seconds if warmup else 0.0
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    prompts = chat_prompts(loaded.tokenizer, 2, args.run)

    def request(i: int) -> tuple[float, float]:
        core.add(AddRequest(f"r{i}", tuple(prompts[i]), params))
        t0, ttft, produced = time.perf_counter(), None, 0
        while core.has_unfinished():
            produced += sum(len(o.new_token_ids) for o in core.step())
            if produced and ttft is None:
                ttft = time.perf_counter() - t0
        assert produced == args.new_tokens, produced
        return ttft, time.perf_counter() - t0

    (ttft1, total1), (ttft2, total2) = request(0), request(1)
    return {"load_s": load_s, "warmup_s": warm_s, "first_ttft_s": ttft1, "first_total_s": total1,
            "second_ttft_s": ttft2, "second_total_s": total2, "prompt_tokens": [len(p) for p in prompts],
            "backend": f"{describe_backend()}; forward: {core.runner.path}"}


def run_mlx_lm(args) -> dict:
    import mlx_loom.kernels  # noqa: F401
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_loom.models.routing import unroute_model
    from mlx_loom.models.loader import describe_backend, load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    unroute_model(loaded.model)  # the peer runs MLX's and mlx-lm's own modules, not our kernels
    load_s = time.perf_counter() - t0
    prompts = chat_prompts(loaded.tokenizer, 2, args.run)

    def request(i: int) -> tuple[float, float]:
        t0, ttft, n = time.perf_counter(), None, 0
        for _ in generate_step(mx.array(prompts[i]), loaded.model, max_tokens=args.new_tokens):
            n += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
        mx.synchronize()
        assert n == args.new_tokens, n
        return ttft, time.perf_counter() - t0

    (ttft1, total1), (ttft2, total2) = request(0), request(1)
    return {"load_s": load_s, "warmup_s": 0.0, "first_ttft_s": ttft1, "first_total_s": total1,
            "second_ttft_s": ttft2, "second_total_s": total2, "prompt_tokens": [len(p) for p in prompts],
            "backend": f"{describe_backend()}; mlx-lm generate_step"}


KEYS = ("load_s", "warmup_s", "first_ttft_s", "first_total_s", "second_ttft_s", "second_total_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded default model)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per system")
    ap.add_argument("--out", default="bench_first_request")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        data = run_mlx_lm(args) if args.worker == "mlx-lm" else run_loom(args, args.worker == "mlx-loom")
        print(json.dumps(data))
        return
    rows = []
    for run in range(args.repeats):  # systems interleaved, so drift on the machine hits all of them
        for system in args.systems:
            cmd = [sys.executable, __file__, "--worker", system, "--new-tokens", str(args.new_tokens),
                   "--run", str(run), *(["--model", args.model] if args.model else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            rows.append({"system": system, "run": run, **json.loads(out)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {s: {k: median([r[k] for r in rows if r["system"] == s]) for k in KEYS} for s in args.systems}
    meta = machine()
    backend = {s: next(r["backend"] for r in rows if r["system"] == s) for s in args.systems}
    lines = ["# bench_first_request: the first request after start-up", "",
             f"Model: {args.model or 'default (SmolLM2-135M-Instruct Q4_1 GGUF)'}. Each run a fresh process; "
             f"{args.new_tokens} greedy tokens per request, new chat prompts; medians of {args.repeats} processes. "
             f"Machine: {meta['platform']}, {meta['cpus']} CPUs, {meta['date']}.", "",
             "| system | load s | warm-up s | 1st TTFT ms | 1st total ms | 2nd TTFT ms | 2nd total ms | "
             "1st / 2nd total |", "|---|---|---|---|---|---|---|---|"]
    for s, m in summary.items():
        lines.append(f"| {s} | {m['load_s']:.2f} | {m['warmup_s']:.2f} | {1e3 * m['first_ttft_s']:.0f} | "
                     f"{1e3 * m['first_total_s']:.0f} | {1e3 * m['second_ttft_s']:.0f} | "
                     f"{1e3 * m['second_total_s']:.0f} | {m['first_total_s'] / m['second_total_s']:.2f} |")
    lines += ["", "Backends: " + "; ".join(f"{s}: {b}" for s, b in backend.items())]
    js, md = write_results(args.out, {"machine": meta, "model": args.model, "new_tokens": args.new_tokens,
                                      "repeats": args.repeats, "summary": summary, "backend": backend,
                                      "results": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
