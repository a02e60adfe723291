"""The lowp kernels (mlx_loom/kernels/lowp.py) one matrix-vector product at a time (decode, M = 1) and
at M = 4 (a verification row with 3 drafts), against what ran before: float32 BLAS on the widened
weight (a 16-bit checkpoint's old CPU path), MLX's own float16 matmul and MXFP4 quantized matmul, and
the native affine 4-bit kernel for scale. GB/s = weight bytes read per call / time (fastest of
--repeats after a warm-up: other work on the machine only ever adds time). Every kernel family this
CPU runs. Writes benchmarks/results/bench_lowp_kernels.{json,md}.

    .venv/bin/python benchmarks/bench_lowp_kernels.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_results  # noqa: E402

# SmolLM2-135M's projections (gate/up 576 -> 1536, down 1536 -> 576), its tied head, and a 2048 square.
SHAPES = [(1536, 576), (576, 1536), (49152, 576), (2048, 2048)]


def fastest(fn, repeats: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best


def cases(N: int, K: int, M: int):
    """(name, fn, weight bytes) for one shape."""
    import mlx.core as mx

    from mlx_loom.kernels.qmm import native_module

    n = native_module()
    x = mx.random.normal((M, K), key=mx.random.key(0))
    W = mx.random.normal((N, K), key=mx.random.key(1))
    wh, wb = W.astype(mx.float16), W.astype(mx.bfloat16)
    wq, s = mx.quantize(W, mode="mxfp4")
    aw, asc, ab = mx.quantize(W, bits=4, group_size=32)
    mx.eval(W, wh, wb, wq, s, aw, asc, ab)
    fp4_bytes, half_bytes = wq.nbytes + s.nbytes, wh.nbytes
    return [
        ("float32 BLAS (widened 16-bit)", lambda: x @ W.T, W.nbytes, False),
        ("float16 MLX matmul", lambda: x @ wh.T, half_bytes, True),
        ("float16 native", lambda: n.half_matmul(x, wh), half_bytes, False),
        ("bfloat16 native", lambda: n.half_matmul(x, wb), half_bytes, False),
        ("mxfp4 MLX quantized_matmul", lambda: mx.quantized_matmul(x, wq, s, None, True, 32, 4, mode="mxfp4"),
         fp4_bytes, True),
        ("mxfp4 native", lambda: n.fp4_matmul(x, wq, s, "mxfp4"), fp4_bytes, False),
        ("affine 4-bit native", lambda: n.affine_qmm(x, aw, asc, ab, 32, 4), aw.nbytes + asc.nbytes + ab.nbytes, False),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()

    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.kernels.qmm import native_module
    from mlx_loom.models.loader import describe_backend

    n = native_module()
    default_isa = n.kernel_isa()
    rows = []
    for isa in n.kernel_isas():
        n.set_kernel_isa(isa)
        for M in args.rows:
            for N, K in SHAPES:
                for name, fn, nbytes, slow in cases(N, K, M):
                    if slow and isa != n.kernel_isas()[0]:
                        continue  # MLX's own kernels do not depend on our family
                    t = fastest(fn, max(3, args.repeats // 10) if slow else args.repeats)
                    rows.append({"isa": isa, "M": M, "N": N, "K": K, "kernel": name, "us": t * 1e6,
                                 "weight_bytes": nbytes, "GB_per_s": nbytes / t / 1e9})
                    print(f"{isa:7s} M={M} {N}x{K} {name:32s} {t * 1e6:9.1f} us {nbytes / t / 1e9:6.2f} GB/s", flush=True)
    n.set_kernel_isa(default_isa)
    load = os.getloadavg()
    lines = ["# bench_lowp_kernels: 16-bit and MXFP4 matmuls (native lowp kernels vs what ran before)", "",
             f"Fastest of {args.repeats} calls (MLX's own slow kernels: of {max(3, args.repeats // 10)}); "
             "GB/s = weight bytes per call / time. N x K = output x input features.", "",
             "| family | M | N x K | kernel | us | GB/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['isa']} | {r['M']} | {r['N']}x{r['K']} | {r['kernel']} | {r['us']:.1f} | {r['GB_per_s']:.2f} |"
              for r in rows]
    lines += ["", f"Backend: {describe_backend()}", "",
              f"Load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on "
              f"{os.cpu_count()} CPUs (shared machine)."]
    js, md = write_results("bench_lowp_kernels", {"machine": machine(), "load_average": load, "rows": rows},
                           "\n".join(lines) + "\n")
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
