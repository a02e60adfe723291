// silu_mul: silu(gate) * up elementwise as one multi-threaded MLX primitive (CPU). Contract:
// mlx_loom/kernels/activations.py's silu_mul_reference. The gated MLP's activation is ~10% of a
// small model's prefill when MLX computes it (scalar exp per element).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace loom {

namespace mx = mlx::core;

// out[i] = silu(gate[i]) * up[i] for i < n on the calling thread, with the vector kernel this CPU
// runs (out may be gate: in place). The primitive below spreads spans of it over the pool.
void silu_mul_rows(const float* gate, const float* up, float* out, long long n);

// gate, up float32 of one shape -> float32 of that shape.
mx::array silu_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

class SiluMul : public mx::UnaryPrimitive {
 public:
  explicit SiluMul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "SiluMul";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

}  // namespace loom
