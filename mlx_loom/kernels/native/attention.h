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

// Sparse prefill tiles: the contract of mlx_loom/kernels/sparse_prefill.py's tile_attention (see
// vec_kernels.h SparseArgs for the layout). q [Hs, NQ*64, D] (unscaled), k, v [HKV, NK*64, D],
// kv [Hs] int32, blocks [Hs, NQ, NB] int32, block_ok [Hs, NQ, NB] bool, columns [Hs, NC] int32
// (NC may be 0). Returns [Hs, NQ*64, D]; query rows that see no key (front padding) are 0.
mx::array sparse_tile_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const mx::array& kv,
    const mx::array& blocks,
    const mx::array& block_ok,
    const mx::array& columns,
    int shift,
    int base,
    float scale,
    mx::StreamOrDevice s = {});

class SparseTileAttention : public mx::UnaryPrimitive {
 public:
  SparseTileAttention(mx::Stream stream, int shift, int base, float scale)
      : mx::UnaryPrimitive(stream), shift_(shift), base_(base), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "SparseTileAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const SparseTileAttention&>(other);
    return o.shift_ == shift_ && o.base_ == base_ && o.scale_ == scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  int shift_, base_;
  float scale_;
};

// The vertical-slash index estimate's attention of the last query tile (see vec_kernels.h ProbsArgs):
// q [Hs, 64, D], k [HKV, NK*64, D] float32, kv [Hs] int32 -> [Hs, 64, NK*64].
mx::array last_tile_probs(const mx::array& q, const mx::array& k, const mx::array& kv, int shift, int first_row,
                          float scale, mx::StreamOrDevice s = {});

class LastTileProbs : public mx::UnaryPrimitive {
 public:
  LastTileProbs(mx::Stream stream, int shift, int first_row, float scale)
      : mx::UnaryPrimitive(stream), shift_(shift), first_row_(first_row), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "LastTileProbs";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const LastTileProbs&>(other);
    return o.shift_ == shift_ && o.first_row_ == first_row_ && o.scale_ == scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1), inputs[1].shape(1)}};
  }

 private:
  int shift_, first_row_;
  float scale_;
};

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
