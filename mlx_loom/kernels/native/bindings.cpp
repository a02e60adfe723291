// Python module mlx_loom.kernels.native._loom_native (nanobind, shared "mlx" domain so mx.array crosses).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "activation.h"
#include "attention.h"
#include "decode_layer.h"
#include "rope_norm.h"
#include "sample.h"

#include "lowp.h"
#include "qmm.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_loom_native, m) {
  nb::module_::import_("mlx.core");  // registers mx.array with the shared type registry
  m.doc() = "mlx-loom native CPU kernels (MLX C++ extension)";

  m.def(
      "affine_qmm",
      [](const mlx::core::array& x,
         const mlx::core::array& w,
         const mlx::core::array& scales,
         const mlx::core::array& biases,
         int group_size,
         int bits) {
        return loom::affine_qmm(x, w, scales, biases, group_size, bits, mlx::core::Device(mlx::core::Device::cpu));
      },
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "group_size"_a = 32,
      "bits"_a = 4,
      "x @ dequantize(w, scales, biases).T on the CPU stream (MLX affine layout, transpose=True).\n\n"
      "x float32 [..., K]; w uint32 [N, K*bits/32]; scales, biases float32 [N, K/group_size];\n"
      "bits 4 or 8; group_size 32, 64 or 128. Returns float32 [..., N] (lazy, like any MLX op).");
  m.def(
      "half_matmul",
      [](const mlx::core::array& x, const mlx::core::array& w) {
        return loom::half_matmul(x, w, mlx::core::Device(mlx::core::Device::cpu));
      },
      "x"_a, "w"_a,
      "x float32 [..., K] @ w.T for w float16 / bfloat16 [N, K], read as stored (float32 accumulation).\n"
      "Returns float32 [..., N].");
  m.def(
      "fp4_matmul",
      [](const mlx::core::array& x, const mlx::core::array& w, const mlx::core::array& scales, const std::string& mode) {
        return loom::fp4_matmul(x, w, scales, mode, mlx::core::Device(mlx::core::Device::cpu));
      },
      "x"_a, "w"_a, "scales"_a, "mode"_a = "mxfp4",
      "x float32 [..., K] @ dequantize(w, scales, mode).T: mx.quantized_matmul's mxfp4 / nvfp4 contract\n"
      "(w uint32 [N, K/8], scales uint8 [N, K/group], transpose=True). Returns float32 [..., N].");
  m.def(
      "decode_layer",
      [](const mlx::core::array& h,
         const std::vector<mlx::core::array>& weights,
         const mlx::core::array& k_pool,
         const mlx::core::array& v_pool,
         const mlx::core::array& slots,
         const mlx::core::array& positions,
         const mlx::core::array& block_tables,
         const mlx::core::array& inv_freq,
         int n_heads,
         int n_kv_heads,
         int head_dim,
         float eps,
         float attn_scale,
         bool rope_traditional,
         float qk_eps) {
        loom::DecodeLayerSpec spec{n_heads, n_kv_heads, head_dim, eps, attn_scale, rope_traditional, qk_eps};
        return loom::decode_layer(h, weights, k_pool, v_pool, slots, positions, block_tables, inv_freq, spec,
                                  mlx::core::Device(mlx::core::Device::cpu));
      },
      "h"_a, "weights"_a, "k_pool"_a, "v_pool"_a, "slots"_a, "positions"_a, "block_tables"_a, "inv_freq"_a,
      "n_heads"_a, "n_kv_heads"_a, "head_dim"_a, "eps"_a, "attn_scale"_a, "rope_traditional"_a, "qk_eps"_a = 0.f,
      "One llama decoder layer for decode rows (see mlx_loom/kernels/decode_layer.py for the contract).\n"
      "Returns h_out; the new tokens' k, v are written into k_pool / v_pool in place when it runs.");
  m.def(
      "paged_attention",
      [](const mlx::core::array& q,
         const mlx::core::array& k_pool,
         const mlx::core::array& v_pool,
         const mlx::core::array& block_tables,
         const mlx::core::array& q_pos,
         float scale) {
        return loom::paged_attention(q, k_pool, v_pool, block_tables, q_pos, scale,
                                     mlx::core::Device(mlx::core::Device::cpu));
      },
      "q"_a, "k_pool"_a, "v_pool"_a, "block_tables"_a, "q_pos"_a, "scale"_a,
      "Causal attention of q [B, LQ, H, D] over paged k_pool / v_pool [HKV, NB, BS, D] (float32,\n"
      "D % 16 == 0): query (b, i) sees keys 0..q_pos[b, i] through block_tables[b]. Returns [B, LQ, H, D].");
  m.def(
      "sparse_tile_attention",
      [](const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& v, const mlx::core::array& kv,
         const mlx::core::array& blocks, const mlx::core::array& block_ok, const mlx::core::array& columns, int shift,
         int base, float scale) {
        return loom::sparse_tile_attention(q, k, v, kv, blocks, block_ok, columns, shift, base, scale,
                                           mlx::core::Device(mlx::core::Device::cpu));
      },
      "q"_a, "k"_a, "v"_a, "kv"_a, "blocks"_a, "block_ok"_a, "columns"_a, "shift"_a, "base"_a, "scale"_a,
      "Sparse prefill tiles (contract: mlx_loom/kernels/sparse_prefill.py tile_attention). q [Hs, NQ*64, D],\n"
      "k, v [HKV, NK*64, D] float32; kv [Hs], blocks [Hs, NQ, NB], columns [Hs, NC] int32; block_ok bool.");
  m.def(
      "last_tile_probs",
      [](const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& kv, int shift, int first_row,
         float scale) {
        return loom::last_tile_probs(q, k, kv, shift, first_row, scale, mlx::core::Device(mlx::core::Device::cpu));
      },
      "q"_a, "k"_a, "kv"_a, "shift"_a, "first_row"_a, "scale"_a,
      "Causal softmax of the last query tile q [Hs, 64, D] over k [HKV, NK*64, D] (keys >= shift; rows below\n"
      "first_row are 0): the vertical-slash index estimate of mlx_loom/kernels/sparse_prefill.py. -> [Hs, 64, NK*64].");
  m.def(
      "silu_mul",
      [](const mlx::core::array& gate, const mlx::core::array& up) {
        return loom::silu_mul(gate, up, mlx::core::Device(mlx::core::Device::cpu));
      },
      "gate"_a, "up"_a, "silu(gate) * up elementwise (float32 arrays of one shape).");
  m.def(
      "rms_norm",
      [](const mlx::core::array& x, const mlx::core::array& w, float eps) {
        return loom::rms_norm(x, w, eps, mlx::core::Device(mlx::core::Device::cpu));
      },
      "x"_a, "w"_a, "eps"_a, "x * rsqrt(mean(x^2, -1) + eps) * w (x float32 [..., DM], w float32 [DM]).");
  m.def(
      "rope",
      [](const mlx::core::array& x, const mlx::core::array& positions, const mlx::core::array& inv_freq,
         bool traditional) {
        return loom::rope(x, positions, inv_freq, traditional, mlx::core::Device(mlx::core::Device::cpu));
      },
      "x"_a, "positions"_a, "inv_freq"_a, "traditional"_a,
      "RoPE of x float32 [T, heads, D], row t at positions[t] (int32 [T]); inv_freq float32 [D/2].");
  m.def(
      "inverse_cdf_sample",
      [](const mlx::core::array& x, const mlx::core::array& scale, const mlx::core::array& min_p,
         const mlx::core::array& u) {
        return loom::inverse_cdf_sample(x, scale, min_p, u, mlx::core::Device(mlx::core::Device::cpu));
      },
      "x"_a, "scale"_a, "min_p"_a, "u"_a,
      "One token per row of x float32 [S, V] by inverse CDF: the first index whose running sum of\n"
      "p = 2^((x - max x) * scale) (p < min_p zeroed) exceeds u * sum(p). scale, min_p, u float32 [S].\n"
      "Returns int32 [S] (lazy).");
  m.def("kernel_isa", &loom::kernel_isa, "Kernel family in use: 'avx512', 'avx2', 'neon' or 'scalar'.");
  m.def("kernel_isas", &loom::kernel_isas, "Kernel families this CPU can run, fastest first.");
  m.def("set_kernel_isa", &loom::set_kernel_isa, "isa"_a, "Switch the kernel family (one of kernel_isas()).");
  m.def("num_threads", &loom::num_threads, "Threads per call (the MLX stream thread included).");
  m.def("set_num_threads", &loom::set_num_threads, "n"_a, "Threads per call; 0 restores the default.");
}
