// The SiluMul primitive: checks, ISA choice, spans of the flat arrays spread over the worker pool.
#include "activation.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "native_util.h"
#include "vec_kernels.h"

namespace loom {

namespace {

using SpanFn = void (*)(const float*, const float*, float*, long long);

SpanFn pick_span_fn() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_vec_avx2()) return avx2::silu_mul_span;
#endif
  return generic::silu_mul_span;
}

constexpr long long kSpan = 1 << 15;  // elements per task: ~10 us of work

}  // namespace

void silu_mul_rows(const float* gate, const float* up, float* out, long long n) {
  static const SpanFn span = pick_span_fn();
  span(gate, up, out, n);
}

mx::array silu_mul(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  if (gate.dtype() != mx::float32 || up.dtype() != mx::float32 || gate.shape() != up.shape()) {
    std::ostringstream msg;
    msg << "[silu_mul] gate and up must be float32 of one shape, got " << gate.shape() << " " << gate.dtype()
        << " and " << up.shape() << " " << up.dtype();
    throw std::invalid_argument(msg.str());
  }
  return mx::array(gate.shape(), mx::float32, std::make_shared<SiluMul>(mx::to_stream(s)), {gate, up});
}

void SiluMul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[silu_mul] CPU only: GPU backends run the reference");
}

void SiluMul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  encoder.dispatch([g = input(inputs[0]), u = input(inputs[1]), o = out.data<float>(), n = (long long)out.size()]() {
    std::vector<float> gs, us;
    const float* gp = dense_ptr<float>(g, gs);
    const float* up = dense_ptr<float>(u, us);
    const int tasks = static_cast<int>((n + kSpan - 1) / kSpan);
    parallel_tasks(tasks, [&](int t) {
      const long long i0 = t * kSpan, i1 = std::min(n, i0 + kSpan);
      silu_mul_rows(gp + i0, up + i0, o + i0, i1 - i0);
    });
  });
}

}  // namespace loom
