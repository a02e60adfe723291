// The LowpMatmul primitive: op construction (argument checks), the scale tables, the kernel
// family (the one the affine kernels use: qmm.cpp's kernel_isa) and the split over the pool.
#include "lowp.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "native_util.h"
#include "qmm.h"
#include "qmm_kernels.h"

namespace loom {

namespace {

using LowpFn = void (*)(const LowpArgs&, int, int);

LowpFn kernel_for(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == "avx512") return lowp_rows_avx512;
  if (isa == "avx2") return lowp_rows_avx2;
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
  if (isa == "neon") return lowp_rows_neon;
#endif
  return lowp_rows_scalar;
}

std::array<float, 256> e8m0_table() {  // 2^(e - 127); 255 is NaN
  std::array<float, 256> t{};
  for (int e = 0; e < 256; ++e) t[e] = e == 255 ? NAN : std::ldexp(1.f, e - 127);
  return t;
}

std::array<float, 256> e4m3_table() {  // fn variant: no infinities, S.1111.111 is NaN
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int exp = (b >> 3) & 0xF, man = b & 7;
    float v = exp == 0 ? std::ldexp(man / 8.f, -6) : std::ldexp(1.f + man / 8.f, exp - 7);
    if ((b & 0x7F) == 0x7F) v = NAN;
    t[b] = (b & 0x80) ? -v : v;
  }
  return t;
}

// Rows of w per block: a block stays in cache while every block of kLowpMaxM rows of x reads it.
constexpr int kRowBlock = 16;

}  // namespace

const float* scale_table(int group_size) {
  static const std::array<float, 256> e8m0 = e8m0_table(), e4m3 = e4m3_table();
  return group_size == 16 ? e4m3.data() : e8m0.data();
}

void lowp_run(const LowpArgs& a) {
  if (a.M == 0 || a.N == 0) return;
  if (a.K == 0) {
    for (int m = 0; m < a.M; ++m) std::fill(a.out + m * a.ldo, a.out + m * a.ldo + a.N, 0.f);
    return;
  }
  const std::string isa = kernel_isa();
  const LowpFn rows = kernel_for(isa);
  LowpArgs base = a;
  base.xi = nullptr;
  thread_local std::vector<float> xi;
  if (a.format == kFp4 && a.group_size == 32 && isa == "avx512") {  // it reads x in the words' order
    QmmArgs q{};
    q.x = a.x;
    q.ldx = a.ldx;
    q.M = a.M;
    q.K = a.K;
    base.ldxi = interleaved_stride(a.K);
    xi.resize((size_t)a.M * base.ldxi);
    interleave_x(q, xi.data());
    base.xi = xi.data();
  }
  const int max_m = isa == "avx512" && a.format != kFp4 ? kLowpMaxMHalfAvx512 : kLowpMaxM;
  const long long work = (long long)a.N * a.K * a.M;
  const int blocks = (a.N + kRowBlock - 1) / kRowBlock;
  const int nt = static_cast<int>(std::min<long long>({num_threads(), std::max(1LL, work / (1 << 14)), blocks}));
  parallel_tasks(nt, [&](int i) {
    const int b0 = static_cast<int>((long long)blocks * i / nt), b1 = static_cast<int>((long long)blocks * (i + 1) / nt);
    for (int b = b0; b < b1; ++b) {
      const int n0 = b * kRowBlock, n1 = std::min(a.N, n0 + kRowBlock);
      for (int m0 = 0; m0 < a.M; m0 += max_m) {
        LowpArgs part = base;
        part.x = a.x + m0 * a.ldx;
        part.out = a.out + m0 * a.ldo;
        part.xi = base.xi ? base.xi + m0 * base.ldxi : nullptr;
        part.M = std::min(max_m, a.M - m0);
        rows(part, n0, n1);
      }
    }
  });
}

static void fail(const std::string& op, const std::string& what, const mx::array& x, const mx::array& w) {
  std::ostringstream msg;
  msg << "[" << op << "] " << what << " (x " << x.shape() << " " << x.dtype() << ", w " << w.shape() << " "
      << w.dtype() << ")";
  throw std::invalid_argument(msg.str());
}

static mx::Shape out_shape(const mx::array& x, int N) {
  auto shape = x.shape();
  shape.back() = N;
  return shape;
}

mx::array half_matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  if (x.ndim() < 1 || w.ndim() != 2) fail("half_matmul", "bad ranks", x, w);
  if (x.dtype() != mx::float32) fail("half_matmul", "x must be float32", x, w);
  if (w.dtype() != mx::float16 && w.dtype() != mx::bfloat16) fail("half_matmul", "w must be float16 or bfloat16", x, w);
  if (w.shape(1) != x.shape(-1)) fail("half_matmul", "w.shape[1] must equal x.shape[-1]", x, w);
  const int format = w.dtype() == mx::float16 ? kF16 : kBF16;
  return mx::array(out_shape(x, w.shape(0)), mx::float32,
                   std::make_shared<LowpMatmul>(mx::to_stream(s), format, 0), {x, w});
}

mx::array fp4_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const std::string& mode,
                     mx::StreamOrDevice s) {
  if (mode != "mxfp4" && mode != "nvfp4") fail("fp4_matmul", "mode must be mxfp4 or nvfp4", x, w);
  const int gs = mode == "mxfp4" ? 32 : 16;
  if (x.ndim() < 1 || w.ndim() != 2 || scales.ndim() != 2) fail("fp4_matmul", "bad ranks", x, w);
  if (x.dtype() != mx::float32) fail("fp4_matmul", "x must be float32", x, w);
  if (w.dtype() != mx::uint32 || scales.dtype() != mx::uint8) fail("fp4_matmul", "w uint32, scales uint8", x, w);
  const int K = x.shape(-1), N = w.shape(0);
  if (K % gs != 0 || w.shape(1) * 8 != K) fail("fp4_matmul", "K must be w.shape[1] * 8, a multiple of the group", x, w);
  if (scales.shape(0) != N || scales.shape(1) != K / gs) fail("fp4_matmul", "scales must be [N, K / group]", x, w);
  return mx::array(out_shape(x, N), mx::float32, std::make_shared<LowpMatmul>(mx::to_stream(s), kFp4, gs),
                   {x, w, scales});
}

std::vector<mx::Shape> LowpMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {out_shape(inputs[0], inputs[1].shape(0))};
}

bool LowpMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const LowpMatmul&>(other);
  return format_ == o.format_ && group_size_ == o.group_size_;
}

void LowpMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[LowpMatmul] CPU only: use MLX's own ops on GPU streams");
}

void LowpMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const int K = inputs[0].shape(-1), N = inputs[1].shape(0);
  const int M = K > 0 ? static_cast<int>(inputs[0].size() / K) : 0;
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  const bool fp4 = format_ == kFp4;
  encoder.dispatch([x = input(inputs[0]), w = input(inputs[1]), sc = fp4 ? input(inputs[2]) : Input{},
                    out_ptr = out.data<float>(), M, N, K, format = format_, gs = group_size_, fp4]() {
    std::vector<float> xs;
    std::vector<uint32_t> ws;
    std::vector<uint16_t> hs;
    std::vector<uint8_t> ss;
    LowpArgs a{};
    a.x = dense_ptr<float>(x, xs);
    a.ldx = K;
    a.w = fp4 ? static_cast<const void*>(dense_ptr<uint32_t>(w, ws)) : dense_ptr<uint16_t>(w, hs);
    a.scales = fp4 ? dense_ptr<uint8_t>(sc, ss) : nullptr;
    a.scale_lut = fp4 ? scale_table(gs) : nullptr;
    a.out = out_ptr;
    a.ldo = N;
    a.M = M;
    a.N = N;
    a.K = K;
    a.group_size = gs;
    a.format = format;
    lowp_run(a);
  });
}

}  // namespace loom
