// silu(gate) * up over a span, with the vector exp2 of vec8.h (MLX's CPU exp / sigmoid are scalar
// libm calls, ~20 ns per element). Included once per ISA, like attention_tile.h.
#include <cmath>

#include "vec8.h"
#include "vec_kernels.h"

namespace loom::LOOM_ISA_NS {

void silu_mul_span(const float* gate, const float* up, float* out, long long n) {
  using namespace vec8;
  long long i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 g = load(gate + i), y = g * -1.4426950408889634f;
    const v8 r = g * load(up + i) / (1.f + exp2_clamped(y));
    store(out + i, (v8)((i8)r & ~(y > splat(126.f))));  // gate < -87: silu underflows to 0, as exp does
  }
  for (; i < n; ++i) out[i] = gate[i] * up[i] / (1.f + std::exp(-gate[i]));
}

}  // namespace loom::LOOM_ISA_NS
