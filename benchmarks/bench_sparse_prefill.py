"""Sparse (MInference) vs dense prefill on the CPU: one layer's chunk attention and the whole model.

1. Attention of one 512-query chunk over L keys (H=9, HKV=3, D=64, random q/k/v), dense vs the
   shipped per-head config (its layers averaged), next to the cost model's estimated ratio:
   where sparse stops paying is what mlx_loom/kernels/sparse_patterns.MAX_RATIO / MIN_KV_LEN encode.
2. Whole-model chunked prefill of N tokens (chunk 512, as the engine), dense vs sparse with the
   engine's thresholds ("auto": dense for chunks that should_use_sparse rejects) and, for short
   prompts, sparse forced on every chunk whose budget does not cover all keys ("forced").
Runs are interleaved (dense, sparse, dense, ...) after a warm-up; medians; ratios = dense / sparse.

    .venv/bin/python benchmarks/bench_sparse_prefill.py [--lengths 1024 2048 4096 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_loom.kernels  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from _common import machine, median, write_results  # noqa: E402
from mlx_loom.kernels.model_prefill import dense_attention, prefill, sparse_attention  # noqa: E402
from mlx_loom.kernels.sparse_patterns import (MAX_RATIO, MIN_KV_LEN, estimated_compute_ratio, load_config,  # noqa: E402
                                     shipped_config_path)
from mlx_loom.kernels.sparse_prefill import dense_prefill_attention, sparse_prefill_attention  # noqa: E402

CHUNK = 512
KERNEL_LENGTHS = (1024, 1536, 2048, 3072, 4096, 6144, 8192)


def _time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return median(ts)


def kernel_sweep(config, repeats: int) -> list[dict]:
    layers = range(0, config.num_layers, max(1, config.num_layers // 6))
    rows = []
    for L in KERNEL_LENGTHS:
        off = L - CHUNK
        q, k, v = (mx.random.normal(s) for s in ((1, 9, CHUNK, 64), (1, 3, L, 64), (1, 3, L, 64)))
        mx.eval(q, k, v)
        dense = _time(lambda: dense_prefill_attention(q, k, v, off, 0.125), repeats)
        sparse = median([_time(lambda: sparse_prefill_attention(q, k, v, off, 0.125, config.layer(i)), repeats)
                         for i in layers])
        est = median([estimated_compute_ratio(config.layer(i), CHUNK, L) for i in layers])
        rows.append({"kv_len": L, "dense_ms": 1e3 * dense, "sparse_ms": 1e3 * sparse,
                     "time_ratio": sparse / dense, "estimated_ratio": est})
        print(rows[-1], flush=True)
    return rows


def _prefill_seconds(model, tokens, attention) -> float:
    t0 = time.perf_counter()
    for _ in prefill(model, tokens, CHUNK, attention):
        pass
    return time.perf_counter() - t0


def model_sweep(lm, config, lengths, repeats: int) -> list[dict]:
    from mlx_loom.kernels.calibration import calibration_tokens

    ids = calibration_tokens(lm.tokenizer, max(lengths), skip=8192)
    modes = {"dense": dense_attention, "auto": sparse_attention(config),
             "forced": sparse_attention(config, min_kv_len=0, max_ratio=float("inf"))}
    for att in modes.values():  # warm-up
        _prefill_seconds(lm.model, ids[:1024], att)
    rows = []
    for n in lengths:
        names = ["dense", "auto"] + (["forced"] if n <= 2048 else [])
        times = {m: [] for m in names}
        for _ in range(repeats):
            for m in names:
                times[m].append(_prefill_seconds(lm.model, ids[:n], modes[m]))
        row = {"tokens": n, **{f"{m}_s": median(t) for m, t in times.items()}}
        for m in names[1:]:
            row[f"{m}_speedup"] = row["dense_s"] / row[f"{m}_s"]
        row["dense_tok_s"] = n / row["dense_s"]
        rows.append(row)
        print(row, flush=True)
    return rows


def _markdown(kern: list[dict], model: list[dict], meta: dict) -> str:
    lines = [f"# Sparse prefill vs dense ({meta['model']}, chunk {CHUNK}, {meta['machine']['cpus']} CPUs)", "",
             f"Config `{meta['config']}`; engine thresholds MIN_KV_LEN={MIN_KV_LEN}, MAX_RATIO={MAX_RATIO}. "
             f"Medians of {meta['repeats']} interleaved runs after a warm-up; a shared machine (±15%).",
             f"Backend: {meta['backend']}", "",
             "## One layer, one 512-query chunk over L keys", "",
             "| L | dense ms | sparse ms | time ratio | estimated ratio |", "|---|---|---|---|---|"]
    for r in kern:
        lines.append(f"| {r['kv_len']} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['estimated_ratio']:.2f} |")
    lines += ["", "## Whole-model prefill", "",
              "| tokens | dense s | sparse (auto) s | speedup | sparse (forced) s | speedup |",
              "|---|---|---|---|---|---|"]
    for r in model:
        forced = f"{r['forced_s']:.2f} | {r['forced_speedup']:.2f}x" if "forced_s" in r else "- | -"
        auto = f"{r['auto_s']:.2f} | {r['auto_speedup']:.2f}x"
        lines.append(f"| {r['tokens']} | {r['dense_s']:.2f} | {auto} | {forced} |")
    lines += ["", f"auto runs the dense code for every chunk over fewer than {MIN_KV_LEN} keys (all of a "
              f"{MIN_KV_LEN // 2}-token prompt), so its ratio there is timing noise; forced shows what sparse "
              "costs where its budget covers most keys."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from mlx_loom.models.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel-repeats", type=int, default=5)
    ap.add_argument("--config", default=None)
    ap.add_argument("--no-model", action="store_true", help="only the one-layer sweep")
    ap.add_argument("--name", default="bench_sparse_prefill")
    args = ap.parse_args(argv)
    lm = load_model(None)
    path = args.config or shipped_config_path(lm.name)
    config = load_config(path, lm.num_heads)
    kern = kernel_sweep(config, args.kernel_repeats)
    model = [] if args.no_model else model_sweep(lm, config, args.lengths, args.repeats)
    from mlx_loom.models.loader import describe_backend

    meta = {"model": lm.name, "config": Path(path).name, "repeats": args.repeats, "machine": machine(),
            "backend": describe_backend()}
    js, md = write_results(args.name, {"meta": meta, "kernel": kern, "model": model}, _markdown(kern, model, meta))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
