// Matmuls over 16-bit and 4-bit microscaling weights as one MLX primitive with native CPU
// kernels (lowp_kernels.h): the 16-bit target and the MXFP4 / NVFP4 draft of speculative decoding.
#pragma once

#include <string>
#include <vector>

#include "lowp_kernels.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace loom {

namespace mx = mlx::core;

// x float32 [..., K] @ w.T, w float16 / bfloat16 [N, K] -> float32 [..., N] (f32 accumulation).
mx::array half_matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s = {});

// x float32 [..., K] @ dequantize(w, scales, mode).T -> float32 [..., N]; w uint32 [N, K / 8],
// scales uint8 [N, K / group]: mode "mxfp4" (E8M0 scales, group 32) or "nvfp4" (E4M3, group 16).
// Same contract as mx.quantized_matmul(x, w, scales, None, transpose=True, mode=mode).
mx::array fp4_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const std::string& mode,
                     mx::StreamOrDevice s = {});

// A whole product on the worker pool (any M: rows of x in blocks of kLowpMaxM).
void lowp_run(const LowpArgs& a);

// The 256-entry float table of a scale format: "mxfp4" (E8M0) or "nvfp4" (E4M3).
const float* scale_table(int group_size);

class LowpMatmul : public mx::UnaryPrimitive {
 public:
  LowpMatmul(mx::Stream stream, int format, int group_size)
      : mx::UnaryPrimitive(stream), format_(format), group_size_(group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "LowpMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int format_;
  int group_size_;
};

}  // namespace loom
