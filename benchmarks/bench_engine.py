"""Offline engine throughput: mlx-loom's EngineCore vs mlx-lm's BatchGenerator.

Both run the same loaded model (the default SmolLM2-135M, float32 on the CPU) on the same
device with the same prompts: N varied chat prompts, exactly --new-tokens greedy tokens each
(EOS ignored so both do the same work). Each (system, N) runs in its own subprocess so peak
RSS is per configuration; each does one warm-up run, then --repeats timed runs (median).

    .venv/bin/python benchmarks/bench_engine.py                # N = 1 8 32 100
    .venv/bin/python benchmarks/bench_engine.py --batch 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import chat_prompts, machine, median, peak_rss_mb, write_results  # noqa: E402


def run_loom(model_path, n: int, new_tokens: int, repeats: int) -> dict:
    import scheduler  # noqa: F401  (OpenBLAS before mlx)
    from scheduler.config import CacheConfig, EngineConfig, SchedulerConfig
    from scheduler.engine_core import EngineCore
    from scheduler.messages import AddRequest
    from scheduler.model import describe_backend, load_model
    from scheduler.params import SamplingParams

    loaded = load_model(model_path)
    prompts = chat_prompts(loaded.tokenizer, n)
    blocks_per_req = -(-(max(map(len, prompts)) + new_tokens) // 16)
    # Room for the batch plus prefix-cache slack; memory grows with N like any KV cache.
    config = EngineConfig(
        cache=CacheConfig(block_size=16, num_blocks=n * blocks_per_req + 64),
        scheduler=SchedulerConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=max(512, n)),
    )
    core = EngineCore(config, loaded)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def once(tag: str) -> float:
        for i, p in enumerate(prompts):
            core.add(AddRequest(f"{tag}-{i}", tuple(p), params))
        t0 = time.perf_counter()
        produced = 0
        while core.has_unfinished():
            produced += sum(len(o.new_token_ids) for o in core.step())
        dt = time.perf_counter() - t0
        assert produced == n * new_tokens, (produced, n * new_tokens)
        return dt

    once("warm")
    times = [once(f"run{r}") for r in range(repeats)]
    return {"times_s": times, "backend": describe_backend(), "num_blocks": config.cache.num_blocks}


def run_mlx_lm(model_path, n: int, new_tokens: int, repeats: int) -> dict:
    import scheduler  # noqa: F401
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from scheduler.model import describe_backend, load_model

    loaded = load_model(model_path)
    prompts = chat_prompts(loaded.tokenizer, n)

    def once() -> float:
        # Decode the whole batch at once (its best case); prefill in its default groups of 8.
        gen = BatchGenerator(loaded.model, max_tokens=new_tokens, completion_batch_size=max(n, 1))
        gen.insert(prompts, [new_tokens] * n)
        t0 = time.perf_counter()
        produced = 0
        while responses := gen.next_generated():
            produced += len(responses)
        mx.synchronize()
        dt = time.perf_counter() - t0
        gen.close()
        assert produced == n * new_tokens, (produced, n * new_tokens)
        return dt

    once()
    times = [once() for _ in range(repeats)]
    return {"times_s": times, "backend": describe_backend(), "completion_batch_size": max(n, 1),
            "prefill_batch_size": 8}


def child(args) -> None:
    fn = run_loom if args.system == "mlx-loom" else run_mlx_lm
    res = fn(args.model, args.batch[0], args.new_tokens, args.repeats)
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


def measure(system: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--batch", str(n), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{system} N={n} failed:\n{out.stderr[-3000:]}")
    res = json.loads(line[7:])
    t = median(res["times_s"])
    res.update(system=system, batch=n, median_s=t, tok_per_s=n * args.new_tokens / t)
    print(f"{system:9s} N={n:<4d} {res['tok_per_s']:8.1f} tok/s  peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return res


def report(rows: list[dict], args) -> str:
    by = {(r["system"], r["batch"]): r for r in rows}
    lines = [
        "# bench_engine: offline throughput, mlx-loom EngineCore vs mlx-lm BatchGenerator",
        "",
        f"Model: {args.model or 'default SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)'}; "
        f"{args.new_tokens} greedy new tokens per request (EOS ignored), varied chat prompts; "
        f"median of {args.repeats} runs after a warm-up; each cell its own process.",
        f"Backend: {rows[0].get('backend', '?')}",
        "",
        "| N | mlx-loom tok/s | mlx-lm tok/s | ratio | mlx-loom peak RSS MB | mlx-lm peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.batch:
        a, b = by.get(("mlx-loom", n)), by.get(("mlx-lm", n))
        if not a or not b:
            continue
        lines.append(f"| {n} | {a['tok_per_s']:.1f} | {b['tok_per_s']:.1f} | {a['tok_per_s'] / b['tok_per_s']:.2f}x "
                     f"| {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 100])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="GGUF file or mlx-lm directory (default: embedded model)")
    ap.add_argument("--systems", nargs="+", default=["mlx-loom", "mlx-lm"])
    ap.add_argument("--child", choices=["mlx-loom", "mlx-lm"], dest="system", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench_engine")
    args = ap.parse_args()
    if args.system:
        return child(args)
    rows = [measure(s, n, args) for n in args.batch for s in args.systems]
    md = report(rows, args)
    js, mdp = write_results(args.out, {"machine": machine(), "args": vars(args), "rows": rows}, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
