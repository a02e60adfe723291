"""One model over 2 ranks (tensor parallel, mlx.launch ring backend on loopback) vs one process.

Measures, on one random-weight qwen3 checkpoint (float32, even head counts so 2 ranks split them):
per-rank resident weight memory (the parameters each rank holds after mlx-lm's shard(); target
<= 0.6x one process), peak RSS per rank, throughput at N = 1 and N = 32 concurrent requests (the
same prompts, --new-tokens greedy tokens each, prefill included, one warm-up batch then one timed
batch), and the step channel's cost: frames, int32 bytes each rank contributes per step, seconds
spent in those all_sums. The model's own collectives (two all_sums of [tokens, hidden] float32 per
layer under tensor parallel) are reported as computed from the shape. One process runs twice: its
default path (flattened llama + fused native decode) and the generic path the group runs
(MLX_LOOM_GENERIC_FORWARD=1), so the distribution cost is read against the same forward.

Two ranks on this 2-core machine share the cores (and every all_sum crosses loopback), so the
group is not expected to be faster here; on two Macs each rank has its own machine.

    .venv/bin/python benchmarks/bench_distributed.py            # writes results/bench_distributed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from _common import chat_prompts, machine, peak_rss_mb, run_batch, write_results  # noqa: E402

SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 64, "intermediate_size": 2816, "vocab_size": 16384, "max_position_embeddings": 4096}
CKPT = ROOT / "benchmarks" / ".cache" / "qwen3-tp-bench-f32"
BATCHES = (1, 32)


def checkpoint() -> Path:
    if not (CKPT / "model.safetensors").exists():
        import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
        from tiny_archs import make_tiny_arch_dir

        make_tiny_arch_dir(CKPT, "qwen3", overrides=SHAPE)
    return CKPT


def _config(parallel: str | None, new_tokens: int):
    from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig

    return EngineConfig(model=str(CKPT), cache=CacheConfig(block_size=16, num_blocks=32 * 40 + 64),
                        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512),
                        warmup=False, parallel=parallel, group_timeout_s=3600.0)  # a shared host is slow


def _weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _all_sum_latency(reps: int = 50) -> dict:
    """Median seconds of one evaluated all_sum on this group: a step frame, and the [T, hidden]
    float32 the model sums twice per layer at T = 1 and 32 (every rank runs this in step)."""
    import statistics
    import time

    import mlx.core as mx

    group = mx.distributed.init()
    out = {}
    for name, shape, dtype in (("frame_2KB", (512,), mx.int32), ("hidden_T1", (1, SHAPE["hidden_size"]), mx.float32),
                               ("hidden_T32", (32, SHAPE["hidden_size"]), mx.float32)):
        x, times = mx.zeros(shape, dtype=dtype), []
        for _ in range(reps):
            t0 = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=group, stream=mx.cpu))
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def worker(out: str, new_tokens: int) -> None:
    """One process, or one rank of the group (rank 0 drives, the others follow)."""
    import mlx_loom.kernels  # noqa: F401
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.engine.follower import run_follower
    from mlx_loom.sched.params import SamplingParams
    from mlx_loom.server.settings import launched_rank

    rank = launched_rank()
    cfg = _config("tensor" if rank is not None else None, new_tokens)
    latency = _all_sum_latency() if rank is not None else None
    if rank:
        steps = run_follower(cfg)
        Path(f"{out}.rank{rank}").write_text(json.dumps({"rank": rank, "steps": steps, "peak_rss_mb": peak_rss_mb()}))
        return
    core = EngineCore(cfg)
    core.begin_serving(lambda reason: print("stalled:", reason, flush=True))
    tok = core.info.tokenizer
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    result = {"path": core.runner.path, "weight_bytes": _weight_bytes(core.runner.model), "batches": {},
              "all_sum_latency_s": latency}
    for n in BATCHES:
        run_batch(core, chat_prompts(tok, n, 0), params, f"warm{n}")
        before = core.stats().group
        timed = run_batch(core, chat_prompts(tok, n, 1), params, f"run{n}")
        after = core.stats().group
        entry = {"seconds": timed.seconds, "tok_s": n * new_tokens / timed.seconds, "prompt_tokens": timed.prompt_tokens}
        if after is not None:
            entry["channel"] = {k: after["channel"][k] - before["channel"][k] for k in after["channel"]}
        result["batches"][str(n)] = entry
    if core.group is not None:
        result["group"] = core.group.describe()
        core.close()
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out).write_text(json.dumps(result))


def _run(cmd: list[str], env: dict) -> None:
    subprocess.run(cmd, env=env, check=True, timeout=3600)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench_distributed")
    ap.add_argument("--rank-blas-threads", type=int, default=1,
                    help="OPENBLAS_NUM_THREADS of each rank (both share this host's cores; 0: BLAS default)")
    ap.add_argument("--reuse-one", action="store_true", help="keep the one-process results of the last run")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.new_tokens)
    checkpoint()
    tmp = ROOT / "benchmarks" / ".cache" / "bench_distributed"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    me = [sys.executable, str(Path(__file__).resolve()), "--new-tokens", str(args.new_tokens), "--worker"]
    if not args.reuse_one:
        _run([*me, str(tmp / "one.json")], env)
        _run([*me, str(tmp / "one_generic.json")], {**env, "MLX_LOOM_GENERIC_FORWARD": "1"})
    launcher = Path(sys.executable).with_name("mlx.launch")
    threads = ["--env", f"OPENBLAS_NUM_THREADS={args.rank_blas_threads}"] if args.rank_blas_threads else []
    _run([str(launcher), "--backend", "ring", "-n", "2", *threads, "--python", sys.executable, *me[1:],
          str(tmp / "two.json")], env)
    one, generic, two = (json.loads((tmp / f).read_text()) for f in ("one.json", "one_generic.json", "two.json"))
    two["rank1"] = json.loads((tmp / "two.json.rank1").read_text())
    payload = {"machine": machine(), "shape": SHAPE, "new_tokens": args.new_tokens,
               "rank_blas_threads": args.rank_blas_threads or "default", "one_process": one,
               "one_process_generic": generic, "two_ranks": two, **_derived(one, generic, two)}
    write_results(args.out, payload, _markdown(payload))


def _derived(one: dict, generic: dict, two: dict) -> dict:
    h, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    per_batch = {}
    for n in map(str, BATCHES):
        ch = two["batches"][n]["channel"]
        per_batch[n] = {"tok_s_vs_one": two["batches"][n]["tok_s"] / one["batches"][n]["tok_s"],
                        "tok_s_vs_one_generic": two["batches"][n]["tok_s"] / generic["batches"][n]["tok_s"],
                        "channel_bytes_per_step": ch["bytes"] / max(1, ch["frames"]),
                        "channel_ms_per_step": 1000 * ch["seconds"] / max(1, ch["frames"]),
                        "channel_share_of_time": ch["seconds"] / two["batches"][n]["seconds"],
                        "model_all_sum_bytes_per_decode_step": 2 * layers * int(n) * h * 4}
    return {"weight_ratio_rank0": two["weight_bytes"] / one["weight_bytes"], "per_batch": per_batch}


def _markdown(p: dict) -> str:
    one, gen, two = p["one_process"], p["one_process_generic"], p["two_ranks"]
    mb = 2**20
    lines = [
        "# bench_distributed: one model over 2 ranks (tensor parallel, ring on loopback) vs one process",
        "",
        f"Machine: {p['machine']['platform']}, {p['machine']['cpus']} CPUs (shared by both ranks), "
        f"{p['machine']['date']}; each rank OPENBLAS_NUM_THREADS={p['rank_blas_threads']}, one process "
        f"the default. Model: random qwen3, float32, {p['shape']}. {p['new_tokens']} greedy tokens "
        "per request, prefill included; one warm-up batch, one timed batch.",
        "",
        "| | one process | one process, generic path | 2 ranks (rank 0) |",
        "|---|---|---|---|",
        f"| resident weights | {one['weight_bytes'] / mb:.0f} MB | {gen['weight_bytes'] / mb:.0f} MB | "
        f"{two['weight_bytes'] / mb:.0f} MB ({p['weight_ratio_rank0']:.2f}x) |",
        f"| peak RSS | {one['peak_rss_mb']:.0f} MB | {gen['peak_rss_mb']:.0f} MB | {two['peak_rss_mb']:.0f} MB "
        f"(rank 1: {two['rank1']['peak_rss_mb']:.0f} MB) |",
    ]
    for n in map(str, BATCHES):
        lines.append(f"| tok/s at N={n} | {one['batches'][n]['tok_s']:.1f} | {gen['batches'][n]['tok_s']:.1f} | "
                     f"{two['batches'][n]['tok_s']:.1f} ({p['per_batch'][n]['tok_s_vs_one']:.2f}x; "
                     f"{p['per_batch'][n]['tok_s_vs_one_generic']:.2f}x generic) |")
    lines += ["", "Step channel (rank 0 -> every rank, int32 frames by all_sum):", "",
              "| N | frames | bytes per step | ms per step | share of the batch's time | model all_sum bytes per decode step |",
              "|---|---|---|---|---|---|"]
    for n in map(str, BATCHES):
        d, ch = p["per_batch"][n], two["batches"][n]["channel"]
        lines.append(f"| {n} | {ch['frames']} | {d['channel_bytes_per_step']:.0f} | {d['channel_ms_per_step']:.2f} | "
                     f"{100 * d['channel_share_of_time']:.1f}% | {d['model_all_sum_bytes_per_decode_step']} |")
    lat = two.get("all_sum_latency_s") or {}
    if lat:
        lines += ["", "One evaluated all_sum on this group (median of 50, both ranks idle otherwise): "
                  + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in lat.items())
                  + f". A decode step runs {2 * SHAPE['num_hidden_layers']} of the model's own plus one frame."]
    lines += ["", f"Forward on the group: {two['path']}; one process: {one['path']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
