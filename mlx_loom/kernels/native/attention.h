// paged_attention: causal attention of query rows over paged K/V as one MLX primitive (CPU).
// Same contract as mlx_loom/kernels/reference.py's paged_attention_reference, with q and the
// output laid out [B, LQ, H, D] (the runner's token-major layout: no transposes).
//
// MLX's CPU path gathers a row's pages into dense K/V, builds an [LQ, L] mask and the full score
// matrix; this runs tiled over the pages with an online softmax instead (attention_tile.h).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace loom {

namespace mx = mlx::core;

// q [B, LQ, H, D] float32; k_pool, v_pool [HKV, NB, BS, D] float32; block_tables [B, MB] int32;
// q_pos [B, LQ] int32 absolute positions (keys 0..q_pos visible); D a multiple of 16.
// Returns [B, LQ, H, D]. Positions and page ids are clamped into the tables / pool (memory safety;
// the runner never passes values outside them).
mx::array paged_attention(
    const mx::array& q,
    const mx::array& k_pool,
    const mx::array& v_pool,
    const mx::array& block_tables,
    const mx::array& q_pos,
    float scale,
    mx::StreamOrDevice s = {});

class PagedAttention : public mx::UnaryPrimitive {
 public:
  PagedAttention(mx::Stream stream, float scale) : mx::UnaryPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "PagedAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return static_cast<const PagedAttention&>(other).scale_ == scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
};

}  // namespace loom
