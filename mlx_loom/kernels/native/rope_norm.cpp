// The RmsNorm and Rope primitives: argument checks, then rows spread over the worker pool when a
// prefill chunk makes them worth splitting (a decode step's few rows stay on the stream thread).
#include "rope_norm.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "native_util.h"
#include "row_ops.h"

namespace loom {

namespace {

constexpr long long kTaskFloats = 1 << 14;  // floats per task: a few us of work

void fail(const char* op, const std::string& what) {
  std::ostringstream msg;
  msg << "[" << op << "] " << what;
  throw std::invalid_argument(msg.str());
}

// fn(r0, r1) over row ranges of `rows` rows of `width` floats each.
template <typename Fn>
void over_rows(int rows, long long width, Fn fn) {
  const int per = static_cast<int>(std::max<long long>(1, kTaskFloats / std::max<long long>(1, width)));
  const int tasks = (rows + per - 1) / per;
  if (tasks <= 1) return fn(0, rows);
  parallel_tasks(tasks, [&](int t) { fn(t * per, std::min(rows, (t + 1) * per)); });
}

}  // namespace

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps, mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || x.ndim() < 1 || w.ndim() != 1 ||
      w.shape(0) != x.shape(-1))
    fail("rms_norm", "x must be float32 [..., DM] and w float32 [DM]");
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(mx::to_stream(s), eps), {x, w});
}

mx::array rope(const mx::array& x, const mx::array& positions, const mx::array& inv_freq, bool traditional,
               mx::StreamOrDevice s) {
  if (x.dtype() != mx::float32 || x.ndim() != 3 || x.shape(2) % 2)
    fail("rope", "x must be float32 [T, heads, D] with D even");
  if (positions.dtype() != mx::int32 || positions.ndim() != 1 || positions.shape(0) != x.shape(0))
    fail("rope", "positions must be int32 [T]");
  if (inv_freq.dtype() != mx::float32 || inv_freq.ndim() != 1 || inv_freq.shape(0) * 2 != x.shape(2))
    fail("rope", "inv_freq must be float32 [D/2]");
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(mx::to_stream(s), traditional),
                   {x, positions, inv_freq});
}

void RmsNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[rms_norm] CPU only: GPU backends run mx.fast.rms_norm");
}

void Rope::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[rope] CPU only: GPU backends run mx.fast.rope");
}

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  const int DM = out.shape(-1);
  const int rows = DM ? static_cast<int>(out.size() / DM) : 0;
  encoder.dispatch([x = input(inputs[0]), w = input(inputs[1]), y = out.data<float>(), rows, DM, eps = eps_]() {
    std::vector<float> xs, ws;
    const float* xp = dense_ptr<float>(x, xs);
    const float* wp = dense_ptr<float>(w, ws);
    over_rows(rows, DM, [&](int r0, int r1) {
      rms_norm(xp + (size_t)r0 * DM, wp, r1 - r0, DM, eps, y + (size_t)r0 * DM);
    });
  });
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  const int T = out.shape(0), heads = out.shape(1), D = out.shape(2);
  encoder.dispatch([x = input(inputs[0]), p = input(inputs[1]), f = input(inputs[2]), y = out.data<float>(), T,
                    heads, D, traditional = traditional_]() {
    std::vector<float> xs, fs;
    std::vector<int> ps;
    const float* xp = dense_ptr<float>(x, xs);
    const int* pp = dense_ptr<int>(p, ps);
    const float* fp = dense_ptr<float>(f, fs);
    const size_t row = (size_t)heads * D;
    over_rows(T, static_cast<long long>(row), [&](int t0, int t1) {
      std::memcpy(y + t0 * row, xp + t0 * row, (t1 - t0) * row * sizeof(float));
      rope(y + t0 * row, t1 - t0, heads, D, pp + t0, fp, traditional);
    });
  });
}

}  // namespace loom
