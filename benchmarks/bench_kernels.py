"""Quantized matmul kernels on the CPU: native (mlx_loom/kernels/native) vs mx.quantized_matmul vs float32.

Per projection shape of the default model (SmolLM2-135M: in -> out) and rows M in {1, 8, 32, 64}:
  - native:  mlx_loom.kernels.native affine_qmm (MLX custom primitive, 4-bit group 32 = the GGUF Q4_1 layout)
  - mx.qmm:  mx.quantized_matmul(transpose=True), MLX's own CPU kernel, same 4-bit weights
  - f32:     x @ W.T on the dequantized float32 weights (what the server runs today), with
             OpenBLAS preloaded the way mlx_loom/kernels/ does it
OpenBLAS's worker threads spin for a while after each GEMM and then compete for the same 2
cores, so each native measurement starts after a 0.3 s pause. Timing: each eval runs CALLS independent products (distinct x) so per-eval dispatch cost is
amortized the way it is inside a model step; median of the repeats after warm-up, per call.
GB/s = weight bytes read per call (packed weights + scales + biases, or float32 weights) / time.
A single matrix fits in L2/L3, so its M=1 figure is a cache-resident one; the model sweep (every
weight matrix of the 30 layers plus the tied 8-bit lm_head, M=1, ~100 MB 4-bit / 540 MB float32)
is the DRAM-bound decode figure.

    .venv/bin/python benchmarks/bench_kernels.py [--repeats 15] [--no-sweep]
    .venv/bin/python benchmarks/bench_kernels.py --prefill   # M = 256 / 512 / 1024 (prefill chunks), -> bench_kernels_prefill
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

from _common import machine, write_results  # noqa: E402
from mlx_loom.kernels import qmm  # noqa: E402
from mlx_loom.kernels import blas  # noqa: E402
from mlx_loom.models.loader import _dequantize  # noqa: E402  (the loader's float32 dequantization)

# (name, in K, out N, bits): the default model's projections; its lm_head is tied to the Q8_0
# token embedding, so it is measured both as 4-bit (the target) and as shipped (8-bit).
SHAPES = [
    ("q_proj/o_proj 576x576", 576, 576, 4),
    ("k_proj/v_proj 576x192", 576, 192, 4),
    ("gate/up 576x1536", 576, 1536, 4),
    ("down 1536x576", 1536, 576, 4),
    ("lm_head 576x49152", 576, 49152, 4),
    ("lm_head 576x49152 (8-bit, as shipped)", 576, 49152, 8),
]
ROWS = [1, 8, 32, 64]
GS = 32


def _time_per_call(make_out, calls: int, repeats: int, budget_s: float) -> float:
    """Median seconds per call; make_out(i) builds the i-th lazy product."""
    mx.eval([make_out(i) for i in range(calls)])  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([make_out(i) for i in range(calls)])
        times.append((time.perf_counter() - t0) / calls)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def bench_shape(name, K, N, bits, repeats, with_mlx_qmm, rows_m=ROWS):
    key = mx.random.key(N + K)
    W = mx.random.normal((N, K), key=key) * 0.05
    w, s, b = mx.quantize(W, group_size=GS, bits=bits)
    Wf = mx.dequantize(w, s, b, group_size=GS, bits=bits).astype(mx.float32)
    mx.eval(w, s, b, Wf)
    qbytes, fbytes = w.nbytes + s.nbytes + b.nbytes, Wf.nbytes
    rows = []
    for M in rows_m:
        calls = 8 if N * M <= 200_000 else 2
        xs = [mx.random.normal((M, K), key=mx.random.key(i)) for i in range(calls)]
        mx.eval(xs)
        flop = 2 * M * N * K
        time.sleep(0.3)  # let OpenBLAS's spinning threads (from the previous f32 run) park first
        t_nat = _time_per_call(lambda i: qmm.affine_qmm(xs[i], w, s, b, GS, bits), calls, repeats, 5.0)
        t_f32 = _time_per_call(lambda i: xs[i] @ Wf.T, calls, repeats, 5.0)
        # float32 BLAS on the quantized weights as stored: dequantized for each call (no f32 copy kept)
        t_deq = _time_per_call(lambda i: xs[i] @ _dequantize(w, s, b, bits).T, calls, repeats, 5.0)
        t_mxq = None
        if with_mlx_qmm:
            t_mxq = _time_per_call(
                lambda i: mx.quantized_matmul(xs[i], w, s, b, transpose=True, group_size=GS, bits=bits),
                1, 3 if N * M > 100_000 else repeats, 3.0)
        row = {
            "shape": name, "K": K, "N": N, "bits": bits, "M": M,
            "native_us": t_nat * 1e6, "native_GBps": qbytes / t_nat / 1e9, "native_GFLOPs": flop / t_nat / 1e9,
            "f32_us": t_f32 * 1e6, "f32_GBps": fbytes / t_f32 / 1e9, "f32_GFLOPs": flop / t_f32 / 1e9,
            "mx_qmm_us": t_mxq * 1e6 if t_mxq else None,
            "mx_qmm_GBps": qbytes / t_mxq / 1e9 if t_mxq else None,
            "speedup_vs_mx_qmm": t_mxq / t_nat if t_mxq else None,
            "speedup_vs_f32": t_f32 / t_nat,
            "deq_f32_us": t_deq * 1e6, "speedup_vs_deq_f32": t_deq / t_nat,
        }
        rows.append(row)
        print(f"{name:40s} M={M:3d}  native {row['native_us']:9.1f} us {row['native_GBps']:6.1f} GB/s "
              f"{row['native_GFLOPs']:6.1f} GF/s | mx.qmm {row['mx_qmm_us'] or float('nan'):10.1f} us | "
              f"f32 {row['f32_us']:9.1f} us {row['f32_GBps']:6.1f} GB/s", flush=True)
    return rows


def model_sweep(repeats: int) -> dict:
    """M=1 over every weight matrix of the model (distinct buffers, far beyond the L3)."""
    layer = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    mats = []
    for layer_i in range(30):
        for j, (K, N) in enumerate(layer):
            W = mx.random.normal((N, K), key=mx.random.key(1000 + 10 * layer_i + j)) * 0.05
            mats.append((K, 4, *mx.quantize(W, group_size=GS, bits=4)))
    W = mx.random.normal((49152, 576), key=mx.random.key(7)) * 0.05
    mats.append((576, 8, *mx.quantize(W, group_size=GS, bits=8)))
    mx.eval([m[2:] for m in mats])
    fmats = [mx.dequantize(w, s, b, group_size=GS, bits=bits) for _, bits, w, s, b in mats]
    mx.eval(fmats)
    xs = {K: mx.random.normal((1, K), key=mx.random.key(K)) for K in (576, 1536)}
    mx.eval(list(xs.values()))
    qbytes = sum(w.nbytes + s.nbytes + b.nbytes for _, _, w, s, b in mats)
    fbytes = sum(f.nbytes for f in fmats)

    def run(fn):
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    time.sleep(0.3)
    native_sweep = lambda: [qmm.affine_qmm(xs[K], w, s, b, GS, bits) for K, bits, w, s, b in mats]  # noqa: E731
    t_nat = run(native_sweep)
    by_isa = {}  # every SIMD kernel family this CPU runs (the default is the first)
    if qmm.native_available():
        from mlx_loom.kernels.native import _loom_native as native
        default = native.kernel_isa()
        try:
            for isa in native.kernel_isas():
                if isa != "scalar":
                    native.set_kernel_isa(isa)
                    by_isa[isa] = run(native_sweep) * 1e3
        finally:
            native.set_kernel_isa(default)
    t_f32 = run(lambda: [xs[m[0]] @ f.T for m, f in zip(mats, fmats)])
    out = {"matrices": len(mats), "quantized_MB": qbytes / 1e6, "f32_MB": fbytes / 1e6,
           "native_ms": t_nat * 1e3, "native_GBps": qbytes / t_nat / 1e9, "native_ms_by_isa": by_isa,
           "f32_ms": t_f32 * 1e3, "f32_GBps": fbytes / t_f32 / 1e9, "speedup_vs_f32": t_f32 / t_nat}
    print(f"model sweep M=1: native {out['native_ms']:.2f} ms ({out['native_GBps']:.1f} GB/s over "
          f"{out['quantized_MB']:.0f} MB) | f32 {out['f32_ms']:.2f} ms ({out['f32_GBps']:.1f} GB/s over "
          f"{out['f32_MB']:.0f} MB)", flush=True)
    return out


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def markdown(rows, sweep, meta) -> str:
    lines = [
        "# bench_kernels: quantized matmul on the CPU",
        "",
        f"{meta['describe']}; BLAS: {meta['blas']}; mlx {meta['mlx']}; {meta['machine']['cpus']} CPUs, "
        f"{meta['machine']['platform']}, {meta['machine']['date']}.",
        "GB/s = weight bytes per call / time (quantized: packed + scales + biases; f32: float32 W). "
        "Single matrices are cache-resident; the sweep row is the DRAM-bound decode figure. "
        "dequant+f32: the quantized weights dequantized to float32 in each call, then BLAS (what using "
        "BLAS costs when no float32 copy of the model is kept).",
        "",
        "| shape (in x out) | bits | M | native us | native GB/s | native GFLOP/s | mx.qmm us | "
        "f32 us | f32 GB/s | f32 GFLOP/s | x vs mx.qmm | x vs f32 | dequant+f32 us | x vs dequant+f32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['bits']} | {r['M']} | {r['native_us']:.1f} | {r['native_GBps']:.1f} | "
            f"{r['native_GFLOPs']:.1f} | {_fmt(r['mx_qmm_us'])} | {r['f32_us']:.1f} | {r['f32_GBps']:.1f} | "
            f"{r['f32_GFLOPs']:.1f} | {_fmt(r['speedup_vs_mx_qmm'])} | {r['speedup_vs_f32']:.2f} | "
            f"{r['deq_f32_us']:.1f} | {r['speedup_vs_deq_f32']:.2f} |")
    if sweep:
        lines += [
            "",
            f"Model sweep, M=1 ({sweep['matrices']} matrices: 30 layers x 7 projections 4-bit + tied lm_head "
            "8-bit): native "
            f"{sweep['native_ms']:.2f} ms/token at {sweep['native_GBps']:.1f} GB/s over {sweep['quantized_MB']:.0f} MB; "
            f"float32 OpenBLAS {sweep['f32_ms']:.2f} ms/token at {sweep['f32_GBps']:.1f} GB/s over "
            f"{sweep['f32_MB']:.0f} MB ({sweep['speedup_vs_f32']:.2f}x).",
        ]
        if sweep.get("native_ms_by_isa"):
            lines.append("Native sweep per kernel family on this CPU (ms/token): " + ", ".join(
                f"{isa} {ms:.2f}" for isa, ms in sweep["native_ms_by_isa"].items()) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-mlx-qmm", action="store_true", help="skip mx.quantized_matmul (slow: ~0.5 GB/s)")
    ap.add_argument("--prefill", action="store_true",
                    help="prefill chunk sizes M = 256/512/1024 on the layer projections (no lm_head, mx.qmm or sweep)")
    args = ap.parse_args()
    shapes, rows_m, name = SHAPES, ROWS, "bench_kernels"
    if args.prefill:
        shapes, rows_m, name = [s for s in SHAPES if "lm_head" not in s[0]], [256, 512, 1024], "bench_kernels_prefill"
        args.no_mlx_qmm = args.no_sweep = True
    if not qmm.native_available():
        print(f"warning: {qmm.describe()}: 'native' below is the reference path", file=sys.stderr)
    meta = {"describe": qmm.describe(), "blas": blas.loaded_path() or "mlx bundled", "mlx": mx.__version__,
            "machine": machine(), "repeats": args.repeats}
    print(meta["describe"], "| BLAS:", meta["blas"], flush=True)
    rows = []
    for shape, K, N, bits in shapes:
        rows += bench_shape(shape, K, N, bits, args.repeats, not args.no_mlx_qmm, rows_m)
    sweep = None if args.no_sweep else model_sweep(max(5, args.repeats // 2))
    md = markdown(rows, sweep, meta)
    js, mdp = write_results(name, {"meta": meta, "rows": rows, "model_sweep": sweep}, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
