// Python module kernels.native._loom_native (nanobind, shared "mlx" domain so mx.array crosses).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

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
  m.def("kernel_isa", &loom::kernel_isa, "Kernel family used on this CPU: 'avx2', 'neon' or 'scalar'.");
  m.def("num_threads", &loom::num_threads, "Threads per call (the MLX stream thread included).");
  m.def("set_num_threads", &loom::set_num_threads, "n"_a, "Threads per call; 0 restores the default.");
}
