// inverse_cdf_sample: one token per row of x drawn from softmax(x / T) by inverse CDF, as one
// MLX primitive (CPU). Contract: mlx_loom/kernels/inverse_cdf.py's draw_full_reference.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace loom {

namespace mx = mlx::core;

// x float32 [S, V] (processed logits); scale [S] = log2(e) / temperature; min_p [S] (0 = off);
// u [S] uniforms in [0, 1) -> int32 [S]: per row, the first index whose running sum of
// p = 2^((x - max x) * scale) (p < min_p zeroed) exceeds u * sum(p).
mx::array inverse_cdf_sample(const mx::array& x, const mx::array& scale, const mx::array& min_p,
                             const mx::array& u, mx::StreamOrDevice s = {});

class InverseCdfSample : public mx::UnaryPrimitive {
 public:
  explicit InverseCdfSample(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "InverseCdfSample";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0)}};
  }
};

}  // namespace loom
