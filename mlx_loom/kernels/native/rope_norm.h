// RmsNorm and Rope as MLX primitives (CPU): on MLX's CPU backend mx.fast.rms_norm and mx.fast.rope
// run as their compositions (~6 and ~25 small ops; a RoPE with per-token offsets costs ~100 us per
// call at decode), so the op-by-op path spends a quarter of a narrow model's step there. Contracts:
// mlx_loom/kernels/rope_norm.py's rms_norm_reference and rope_reference.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace loom {

namespace mx = mlx::core;

// x float32 [..., DM], w float32 [DM] -> x * rsqrt(mean(x^2, -1) + eps) * w.
mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s = {});

// x float32 [T, heads, D], positions int32 [T], inv_freq float32 [D/2] -> x rotated by position.
mx::array rope(const mx::array& x, const mx::array& positions, const mx::array& inv_freq, bool traditional,
               mx::StreamOrDevice s = {});

class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LoomRmsNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
};

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream stream, bool traditional) : mx::UnaryPrimitive(stream), traditional_(traditional) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "LoomRope";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return traditional_ == static_cast<const Rope&>(other).traditional_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  bool traditional_;
};

}  // namespace loom
