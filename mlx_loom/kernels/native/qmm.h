// affine_qmm: x @ dequantize(w, scales, biases).T as an MLX primitive with a native CPU kernel.
#pragma once

#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace loom {

namespace mx = mlx::core;

// x float32 [..., K]; w uint32 [N, K * bits / 32]; scales, biases float32 [N, K / group_size]
// -> float32 [..., N]. Same contract as mx.quantized_matmul(x, w, scales, biases,
// transpose=True, group_size, bits) in MLX's affine mode. bits 4 or 8, group_size 32, 64 or 128.
mx::array affine_qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size = 32,
    int bits = 4,
    mx::StreamOrDevice s = {});

class AffineQMM : public mx::UnaryPrimitive {
 public:
  AffineQMM(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "AffineQMM";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int group_size_;
  int bits_;
};

// Which kernel family eval_cpu runs on this CPU: "avx512", "avx2", "neon" or "scalar".
std::string kernel_isa();
// The families this CPU can run (fastest first) and a switch between them (tests, benchmarks).
std::vector<std::string> kernel_isas();
void set_kernel_isa(const std::string& isa);
// Worker threads used per call (including the calling thread); set_num_threads(0) = default.
int num_threads();
void set_num_threads(int n);

}  // namespace loom
