// The InverseCdfSample primitive: checks, ISA choice, rows spread over the worker pool.
#include "sample.h"

#include <sstream>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "native_util.h"
#include "vec_kernels.h"

namespace loom {

namespace {

using RowFn = int (*)(const float*, int, float, float, float, float*, float*);

RowFn pick_row_fn() {
#if defined(__x86_64__) || defined(_M_X64)
  if (use_vec_avx2()) return avx2::inverse_cdf_row;
#endif
  return generic::inverse_cdf_row;
}

[[noreturn]] void fail(const mx::array& x, const mx::array& scale, const mx::array& min_p, const mx::array& u) {
  std::ostringstream msg;
  msg << "[inverse_cdf_sample] expected float32 x [S, V] (V > 0) and float32 scale, min_p, u [S], got x "
      << x.shape() << " " << x.dtype() << ", scale " << scale.shape() << " " << scale.dtype() << ", min_p "
      << min_p.shape() << " " << min_p.dtype() << ", u " << u.shape() << " " << u.dtype();
  throw std::invalid_argument(msg.str());
}

}  // namespace

mx::array inverse_cdf_sample(const mx::array& x, const mx::array& scale, const mx::array& min_p, const mx::array& u,
                             mx::StreamOrDevice s) {
  if (x.ndim() != 2 || x.shape(1) == 0 || x.dtype() != mx::float32) fail(x, scale, min_p, u);
  for (const auto* a : {&scale, &min_p, &u})
    if (a->ndim() != 1 || a->shape(0) != x.shape(0) || a->dtype() != mx::float32) fail(x, scale, min_p, u);
  return mx::array({x.shape(0)}, mx::int32, std::make_shared<InverseCdfSample>(mx::to_stream(s)),
                   {x, scale, min_p, u});
}

void InverseCdfSample::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[inverse_cdf_sample] CPU only: GPU backends run the reference");
}

void InverseCdfSample::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  encoder.dispatch([x = input(inputs[0]), sc = input(inputs[1]), mp = input(inputs[2]), uu = input(inputs[3]),
                    o = out.data<int32_t>(), S = inputs[0].shape(0), V = inputs[0].shape(1)]() {
    std::vector<float> xs, ss, ms, us;
    const float* xp = dense_ptr<float>(x, xs);
    const float* scale = dense_ptr<float>(sc, ss);
    const float* min_p = dense_ptr<float>(mp, ms);
    const float* u = dense_ptr<float>(uu, us);
    static const RowFn row = pick_row_fn();
    parallel_tasks(S, [&](int r) {
      thread_local std::vector<float> p, sums;
      p.resize(V);
      sums.resize((V + kSampleBlock - 1) / kSampleBlock);
      o[r] = row(xp + (size_t)r * V, V, scale[r], min_p[r], u[r], p.data(), sums.data());
    });
  });
}

}  // namespace loom
