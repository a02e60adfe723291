// decode_layer: one llama decoder layer for decode rows (one new token per row) as a single
// MLX primitive. Same contract as mlx_loom/kernels/decode_layer.py's decode_layer_reference.
//
// A decode step of a small model is dominated by dispatching ~30 tiny MLX ops per layer (norms,
// RoPE, KV scatter, the paged gather, softmax, adds), not by arithmetic: fused, a layer is one
// task on the MLX CPU stream whose matmuls run on the native affine kernels.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace loom {

namespace mx = mlx::core;

struct DecodeLayerSpec {
  int n_heads;     // H
  int n_kv_heads;  // HKV
  int head_dim;    // D
  float eps;       // RMSNorm epsilon
  float attn_scale;
  bool rope_traditional;  // rotate (2i, 2i+1) pairs instead of (i, i + D/2)
  float qk_eps = 0.f;     // eps of the per-head q/k RMSNorms (qwen3), when their weights are given
};

// h [T, DM] float32 residual stream, one decode token per row.
// weights: attn_norm [DM], ffn_norm [DM], then (w, scales, biases) for q, k, v, o, gate, up, down
//   in MLX's affine layout (uint32 packed, float32 scales/biases; bits 4 or 8, group 32/64/128);
//   optionally then q_norm [D], k_norm [D] float32: per-head RMSNorms of q and k before RoPE (qwen3).
// k_pool, v_pool [HKV, NB, BS, D] float32; slots [T] int32 (flat page * BS + offset of the new
// token); positions [T] int32; block_tables [T, MB] int32 (row t's keys 0..positions[t] live in
// its first pages); inv_freq [D/2] float32 RoPE inverse frequencies (any position scale folded in).
// Returns h_out [T, DM]. The new tokens' k, v are written into k_pool / v_pool IN PLACE when the
// layer runs (see decode_layer.cpp for why): callers must hold no lazy reader of older pool contents.
mx::array decode_layer(
    const mx::array& h,
    const std::vector<mx::array>& weights,
    const mx::array& k_pool,
    const mx::array& v_pool,
    const mx::array& slots,
    const mx::array& positions,
    const mx::array& block_tables,
    const mx::array& inv_freq,
    const DecodeLayerSpec& spec,
    mx::StreamOrDevice s = {});

class DecodeLayer : public mx::UnaryPrimitive {
 public:
  DecodeLayer(mx::Stream stream, DecodeLayerSpec spec) : mx::UnaryPrimitive(stream), spec_(spec) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "DecodeLayer";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  DecodeLayerSpec spec_;
};

}  // namespace loom
