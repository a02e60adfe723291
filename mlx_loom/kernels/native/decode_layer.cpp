// The DecodeLayer primitive: argument checks, then one CPU task per layer that runs
//   x = rms_norm(h) ; q, k, v = x Wq, x Wk, x Wv ; RoPE(q, k) ; write k, v into their pages
//   h += attention(q over each row's pages) Wo ; x = rms_norm(h) ; h += (silu(x Wg) * x Wu) Wd
// The matmuls use the affine kernels on the worker pool; attention splits (row, kv head) pairs
// over the same pool. Everything else is a few thousand floats per row and stays on one thread.
#include "decode_layer.h"

#include <array>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "activation.h"
#include "lowp.h"
#include "native_util.h"
#include "row_ops.h"

// Attention's inner loops are plain float loops written to auto-vectorize; on x86-64 Linux they
// are also compiled for x86-64-v3 (AVX2 + FMA) and picked at load time (GCC function
// multiversioning). Not "arch=haswell": GCC's resolver checks that one by CPU model, so AMD CPUs
// (and any later Intel model) silently ran the SSE2 default.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define LOOM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LOOM_SIMD_CLONES
#endif

namespace loom {

namespace {

constexpr int kNumWeights = 23;  // 2 norms + 7 x (w, scales, biases)
enum InputIndex : int { kH = 0, kKPool = 1 + kNumWeights, kVPool, kSlots, kPositions, kTables, kInvFreq, kNumInputs };

// A projection's weight: affine (format kAffine: w, scales, biases as qmm) or one the lowp kernels
// read (kF16 / kBF16: w alone; kFp4: w and uint8 scales; the other arrays are placeholders).
constexpr int kAffine = -1;

struct QWeight {
  const uint32_t* w;
  const float* scales;
  const float* biases;
  int N, K, group_size, bits;
  int format = kAffine;
};

QmmArgs affine_args(const QWeight& q, const float* x, int M, float* y) {
  QmmArgs a{};
  a.x = x;
  a.ldx = q.K;
  a.w = q.w;
  a.scales = q.scales;
  a.biases = q.biases;
  a.out = y;
  a.M = M;
  a.N = q.N;
  a.K = q.K;
  a.group_size = q.group_size;
  a.bits = q.bits;
  return a;
}

// y [M, N] = x [M, K] @ dequantize(q).T
void matmul(const QWeight& q, const float* x, int M, float* y) {
  if (q.format != kAffine) {
    LowpArgs l{};
    l.x = x;
    l.ldx = q.K;
    l.w = q.w;
    l.scales = reinterpret_cast<const uint8_t*>(q.scales);
    l.scale_lut = q.format == kFp4 ? scale_table(q.group_size) : nullptr;
    l.out = y;
    l.ldo = q.N;
    l.M = M;
    l.N = q.N;
    l.K = q.K;
    l.group_size = q.group_size;
    l.format = q.format;
    return lowp_run(l);
  }
  qmm_run(affine_args(q, x, M, y));
}

// Several products of the same x [M, K]: affine ones in one pool call (the threads meet once).
template <size_t n>
void matmuls(const std::array<const QWeight*, n>& qs, const float* x, int M, const std::array<float*, n>& ys) {
  std::array<QmmArgs, n> as;
  size_t affine = 0;
  for (size_t i = 0; i < n; ++i) {
    if (qs[i]->format == kAffine) as[affine++] = affine_args(*qs[i], x, M, ys[i]);
    else matmul(*qs[i], x, M, ys[i]);
  }
  if (affine) qmm_run_many(as.data(), static_cast<int>(affine));
}

LOOM_SIMD_CLONES
float dot(const float* a, const float* b, int n) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s;
}

// exp for x <= 0 (softmax after max subtraction) via 2^n * 2^f, branch-free so it vectorizes;
// relative error ~2e-7. Inputs below ~-87 flush to ~1e-38 instead of 0, which softmax absorbs.
LOOM_SIMD_CLONES
void exp_shifted(float* x, int n, float shift) {
  for (int i = 0; i < n; ++i) {
    float y = (x[i] - shift) * 1.4426950408889634f;
    y = y < -126.f ? -126.f : y;
    const float fl = std::floor(y);
    const float f = y - fl;  // [0, 1)
    // 2^f on [0, 1): minimax degree-6 polynomial
    float p = 1.535336188e-4f;
    p = p * f + 1.339887440e-3f;
    p = p * f + 9.618437357e-3f;
    p = p * f + 5.550332471e-2f;
    p = p * f + 2.402264791e-1f;
    p = p * f + 6.931472028e-1f;
    p = p * f + 1.0f;
    int32_t bits = (static_cast<int32_t>(fl) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    x[i] = p * scale;
  }
}

LOOM_SIMD_CLONES
void axpy(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

struct AttentionArgs {
  const float* q;  // [T, H, D]
  const float* k_pool;
  const float* v_pool;  // [HKV, NB, BS, D]
  const int* tables;    // [T, MB]
  const int* pos;       // [T]
  float* out;           // [T, H, D]
  int H, HKV, D, NB, BS, MB;
  float scale;
};

// Row t, kv head g: its rep = H / HKV query heads over keys 0..pos[t] read through the block table.
void attend(const AttentionArgs& a, int t, int g) {
  const int rep = a.H / a.HKV, D = a.D, L = a.pos[t] + 1;
  const int* table = a.tables + (size_t)t * a.MB;
  const size_t head_off = (size_t)g * a.NB * a.BS * D;
  const float* q = a.q + ((size_t)t * a.H + (size_t)g * rep) * D;
  float* out = a.out + ((size_t)t * a.H + (size_t)g * rep) * D;
  thread_local std::vector<float> scores;
  scores.resize((size_t)rep * L);
  for (int j = 0; j < L; ++j) {
    const float* key = a.k_pool + head_off + ((size_t)table[j / a.BS] * a.BS + j % a.BS) * D;
    for (int r = 0; r < rep; ++r) scores[(size_t)r * L + j] = dot(q + (size_t)r * D, key, D) * a.scale;
  }
  for (int r = 0; r < rep; ++r) {
    float* s = scores.data() + (size_t)r * L;
    float m = s[0];
    for (int j = 1; j < L; ++j) m = s[j] > m ? s[j] : m;
    exp_shifted(s, L, m);
    float sum = 0.f;
    for (int j = 0; j < L; ++j) sum += s[j];
    const float inv = 1.f / sum;
    for (int j = 0; j < L; ++j) s[j] *= inv;
  }
  std::memset(out, 0, sizeof(float) * rep * D);
  for (int j = 0; j < L; ++j) {
    const float* val = a.v_pool + head_off + ((size_t)table[j / a.BS] * a.BS + j % a.BS) * D;
    for (int r = 0; r < rep; ++r) axpy(scores[(size_t)r * L + j], val, out + (size_t)r * D, D);
  }
}

void add_into(float* y, const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += x[i];
}


struct LayerPtrs {
  const float* h;
  const float* attn_norm;
  const float* ffn_norm;
  QWeight q, k, v, o, gate, up, down;
  float* k_pool;
  float* v_pool;
  const int* slots;
  const int* pos;
  const int* tables;
  const float* inv_freq;
  const float* q_norm;  // [D] or null
  const float* k_norm;
  float* h_out;
  int T, DM, FF, NB, BS, MB;
};

void run_layer(const LayerPtrs& p, const DecodeLayerSpec& sp) {
  const int T = p.T, DM = p.DM, H = sp.n_heads, HKV = sp.n_kv_heads, D = sp.head_dim;
  thread_local std::vector<float> xn, q, k, v, att, tmp, g, u;
  xn.resize((size_t)T * DM);
  q.resize((size_t)T * H * D);
  k.resize((size_t)T * HKV * D);
  v.resize((size_t)T * HKV * D);
  att.resize((size_t)T * H * D);
  tmp.resize((size_t)T * DM);
  g.resize((size_t)T * p.FF);
  u.resize((size_t)T * p.FF);

  std::memcpy(p.h_out, p.h, sizeof(float) * T * DM);
  rms_norm(p.h_out, p.attn_norm, T, DM, sp.eps, xn.data());
  matmuls<3>({&p.q, &p.k, &p.v}, xn.data(), T, {q.data(), k.data(), v.data()});
  if (p.q_norm) {
    rms_norm(q.data(), p.q_norm, T * H, D, sp.qk_eps, q.data());  // per head, in place
    rms_norm(k.data(), p.k_norm, T * HKV, D, sp.qk_eps, k.data());
  }
  rope(q.data(), T, H, D, p.pos, p.inv_freq, sp.rope_traditional);
  rope(k.data(), T, HKV, D, p.pos, p.inv_freq, sp.rope_traditional);
  const size_t head_stride = (size_t)p.NB * p.BS * D;
  for (int t = 0; t < T; ++t)
    for (int gi = 0; gi < HKV; ++gi) {
      const size_t dst = gi * head_stride + (size_t)p.slots[t] * D, src = ((size_t)t * HKV + gi) * D;
      std::memcpy(p.k_pool + dst, k.data() + src, sizeof(float) * D);
      std::memcpy(p.v_pool + dst, v.data() + src, sizeof(float) * D);
    }
  AttentionArgs aa{q.data(), p.k_pool, p.v_pool, p.tables, p.pos, att.data(), H, HKV, D, p.NB, p.BS, p.MB, sp.attn_scale};
  parallel_for(T * HKV, [&](int i) { attend(aa, i / HKV, i % HKV); });
  matmul(p.o, att.data(), T, tmp.data());
  add_into(p.h_out, tmp.data(), (size_t)T * DM);
  rms_norm(p.h_out, p.ffn_norm, T, DM, sp.eps, xn.data());
  matmuls<2>({&p.gate, &p.up}, xn.data(), T, {g.data(), u.data()});
  // in place, with the SiluMul primitive's vector kernel (a scalar exp per value cost ~15 us per layer)
  silu_mul_rows(g.data(), u.data(), g.data(), (long long)T * p.FF);
  matmul(p.down, g.data(), T, tmp.data());
  add_into(p.h_out, tmp.data(), (size_t)T * DM);
}

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("[decode_layer] " + what);
}

std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << a.shape() << " " << a.dtype();
  return s.str();
}

// The format of the projection whose arrays start at in[first] (kAffine, kF16, kBF16 or kFp4).
int weight_format(const std::vector<mx::array>& in, int first) {
  const auto &w = in[first], &s = in[first + 1];
  if (w.dtype() == mx::float16) return kF16;
  if (w.dtype() == mx::bfloat16) return kBF16;
  return s.dtype() == mx::uint8 ? kFp4 : kAffine;
}

// (bits, group_size) of a lowp matrix: [N, K] 16-bit, or fp4 with uint8 scales [N, K / 16 or 32].
// "q_proj (w [576, 72] uint32, scales ...)": built only on failure (every layer of every step
// checks its 7 weights; formatting shapes eagerly cost ~1/7 of the engine thread's native time).
std::string weight_desc(const char* name, const mx::array& w, const mx::array& s) {
  return std::string(name) + " (w " + shape_str(w) + ", scales " + shape_str(s) + ")";
}

std::pair<int, int> check_lowp(const std::vector<mx::array>& in, int first, int K, int N, const char* name) {
  auto what = [&] { return weight_desc(name, in[first], in[first + 1]); };
  const auto &w = in[first], &s = in[first + 1];
  const int format = weight_format(in, first);
  if (w.ndim() != 2 || w.shape(0) != N) fail(what() + ": expected " + std::to_string(N) + " output rows");
  if (format != kFp4) {
    if (w.shape(1) != K) fail(what() + ": K does not match");
    return {16, 0};
  }
  if (w.dtype() != mx::uint32 || s.ndim() != 2 || s.shape(0) != N || w.shape(1) * 8 != K || s.shape(1) == 0 ||
      K % s.shape(1) != 0 || (K / s.shape(1) != 16 && K / s.shape(1) != 32))
    fail(what() + ": expected uint32 w [N, K/8] and uint8 scales [N, K/16 or K/32]");
  return {4, K / s.shape(1)};
}

// (bits, group_size) of a quantized matrix whose input width is K, checking its three arrays.
std::pair<int, int> check_qweight(const std::vector<mx::array>& in, int first, int K, int N, const char* name) {
  const auto &w = in[first], &s = in[first + 1], &b = in[first + 2];
  auto what = [&] { return weight_desc(name, w, s); };
  if (weight_format(in, first) != kAffine) return check_lowp(in, first, K, N, name);
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || s.ndim() != 2 || s.dtype() != mx::float32 ||
      b.dtype() != mx::float32 || b.shape() != s.shape())
    fail(what() + ": expected uint32 w and float32 scales/biases of equal 2-d shape");
  if (w.shape(0) != N || s.shape(0) != N) fail(what() + ": expected " + std::to_string(N) + " output rows");
  if (s.shape(1) == 0 || K % s.shape(1) != 0 || (w.shape(1) * 32) % K != 0) fail(what() + ": K does not match");
  const int bits = w.shape(1) * 32 / K, gs = K / s.shape(1);
  if ((bits != 4 && bits != 8) || (gs != 32 && gs != 64 && gs != 128))
    fail(what() + ": only 4/8-bit with group size 32/64/128");
  return {bits, gs};
}

void check_float(const mx::array& a, const char* name, int ndim) {
  if (a.dtype() != mx::float32 || a.ndim() != ndim) fail(std::string(name) + " must be float32 of rank " + std::to_string(ndim) + ", got " + shape_str(a));
}

void check_int(const mx::array& a, const char* name, int ndim) {
  if (a.dtype() != mx::int32 || a.ndim() != ndim) fail(std::string(name) + " must be int32 of rank " + std::to_string(ndim) + ", got " + shape_str(a));
}

}  // namespace

mx::array decode_layer(
    const mx::array& h,
    const std::vector<mx::array>& weights,
    const mx::array& k_pool,
    const mx::array& v_pool,
    const mx::array& slots,
    const mx::array& positions,
    const mx::array& block_tables,
    const mx::array& inv_freq,
    const DecodeLayerSpec& spec,
    mx::StreamOrDevice s) {
  const bool qk_norm = (int)weights.size() == kNumWeights + 2;
  if ((int)weights.size() != kNumWeights && !qk_norm)
    fail("expected 23 weights: 2 norms + 7 x (w, scales, biases) (+ q_norm, k_norm: 25)");
  check_float(h, "h", 2);
  check_float(k_pool, "k_pool", 4);
  check_float(v_pool, "v_pool", 4);
  check_float(inv_freq, "inv_freq", 1);
  check_int(slots, "slots", 1);
  check_int(positions, "positions", 1);
  check_int(block_tables, "block_tables", 2);
  const int T = h.shape(0), DM = h.shape(1), H = spec.n_heads, HKV = spec.n_kv_heads, D = spec.head_dim;
  if (H <= 0 || HKV <= 0 || H % HKV != 0 || D <= 0 || D % 2 != 0) fail("bad head counts / head_dim");
  if (k_pool.shape() != v_pool.shape() || k_pool.shape(0) != HKV || k_pool.shape(3) != D)
    fail("pools must be [HKV, NB, BS, D], got " + shape_str(k_pool));
  if (slots.shape(0) != T || positions.shape(0) != T || block_tables.shape(0) != T)
    fail("slots, positions and block_tables need one entry per row of h");
  if (inv_freq.shape(0) != D / 2) fail("inv_freq must have head_dim / 2 entries");
  std::vector<mx::array> in{h};
  in.insert(in.end(), weights.begin(), weights.begin() + kNumWeights);
  for (int i : {0, 1})
    if (in[1 + i].dtype() != mx::float32 || in[1 + i].ndim() != 1 || in[1 + i].shape(0) != DM)
      fail("norm weights must be float32 [DM]");
  const int FF = weights[14 + 0].shape(0);  // gate rows
  check_qweight(in, 3, DM, H * D, "q_proj");
  check_qweight(in, 6, DM, HKV * D, "k_proj");
  check_qweight(in, 9, DM, HKV * D, "v_proj");
  check_qweight(in, 12, H * D, DM, "o_proj");
  check_qweight(in, 15, DM, FF, "gate_proj");
  check_qweight(in, 18, DM, FF, "up_proj");
  check_qweight(in, 21, FF, DM, "down_proj");
  in.insert(in.end(), {k_pool, v_pool, slots, positions, block_tables, inv_freq});
  if (qk_norm) {  // after inv_freq, so every other input keeps its index
    for (int i : {0, 1}) {
      const auto& w = weights[kNumWeights + i];
      if (w.dtype() != mx::float32 || w.ndim() != 1 || w.shape(0) != D) fail("q_norm / k_norm must be float32 [head_dim]");
      in.push_back(w);
    }
  }
  return mx::array(h.shape(), mx::float32, std::make_shared<DecodeLayer>(mx::to_stream(s), spec), std::move(in));
}

std::vector<mx::Shape> DecodeLayer::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[kH].shape()};
}

bool DecodeLayer::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeLayer&>(other).spec_;
  return o.n_heads == spec_.n_heads && o.n_kv_heads == spec_.n_kv_heads && o.head_dim == spec_.head_dim &&
      o.eps == spec_.eps && o.attn_scale == spec_.attn_scale && o.rope_traditional == spec_.rope_traditional &&
      o.qk_eps == spec_.qk_eps;
}

void DecodeLayer::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[decode_layer] CPU only: GPU backends run the reference composition");
}

// The KV pools are written in place (like any paged KV cache): they are inputs so MLX orders this
// layer after whatever produced them, but not outputs, because a multi-output primitive can never
// donate its inputs (each output holds its own reference). The runner owns the pools and keeps
// nothing lazy that reads an older version of them.
static float* writable_pool(const mx::array& pool) {
  if (!pool.flags().row_contiguous || pool.data_size() != pool.size())
    throw std::runtime_error("[decode_layer] KV pools must be dense row-major buffers (mx.contiguous them once)");
  return const_cast<float*>(pool.data<float>());
}

void DecodeLayer::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  // Only pointers and metadata here: inputs may still be being computed by earlier stream tasks.
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);

  const int DM = inputs[kH].shape(1), HD = spec_.n_heads * spec_.head_dim, FF = inputs[15].shape(0);
  LayerPtrs p{};
  p.T = inputs[kH].shape(0);
  p.DM = DM;
  p.FF = FF;
  p.NB = inputs[kKPool].shape(1);
  p.BS = inputs[kKPool].shape(2);
  p.MB = inputs[kTables].shape(1);
  p.k_pool = writable_pool(inputs[kKPool]);
  p.v_pool = writable_pool(inputs[kVPool]);
  p.h_out = out.data<float>();
  std::vector<Input> views;
  for (const auto& in : inputs) views.push_back(input(in));
  // (first input, K) of each quantized matrix: q, k, v, o, gate, up, down
  const std::array<std::pair<int, int>, 7> mats{{{3, DM}, {6, DM}, {9, DM}, {12, HD}, {15, DM}, {18, DM}, {21, FF}}};
  std::array<int, 7> formats;
  for (int m = 0; m < 7; ++m) {
    formats[m] = weight_format(inputs, mats[m].first);
    if (formats[m] != kAffine && !(views[mats[m].first].dense && views[mats[m].first + 1].dense))
      throw std::runtime_error("[decode_layer] 16-bit / fp4 weights must be dense row-major arrays");
  }
  encoder.dispatch([p, spec = spec_, views = std::move(views), mats, formats]() mutable {
    // Inputs are row-contiguous in practice; a strided one is gathered into `store` first.
    std::vector<std::vector<uint32_t>> store(views.size());
    auto ptr = [&](int i) { return dense_ptr<uint32_t>(views[i], store[i]); };
    auto f = [&](int i) { return reinterpret_cast<const float*>(ptr(i)); };
    auto q = [&](int m) {
      auto [first, K] = mats[m];
      const auto& w = views[first];
      const int groups = views[first + 1].shape[1];
      if (formats[m] == kF16 || formats[m] == kBF16)
        return QWeight{static_cast<const uint32_t*>(views[first].ptr), nullptr, nullptr, w.shape[0], K, 0, 16, formats[m]};
      if (formats[m] == kFp4)
        return QWeight{static_cast<const uint32_t*>(views[first].ptr), static_cast<const float*>(views[first + 1].ptr),
                       nullptr, w.shape[0], K, K / groups, 4, kFp4};
      return QWeight{ptr(first), f(first + 1), f(first + 2), w.shape[0], K, K / groups, w.shape[1] * 32 / K};
    };
    p.h = f(kH);
    p.attn_norm = f(1);
    p.ffn_norm = f(2);
    p.q = q(0);
    p.k = q(1);
    p.v = q(2);
    p.o = q(3);
    p.gate = q(4);
    p.up = q(5);
    p.down = q(6);
    p.inv_freq = f(kInvFreq);
    const bool qk = views.size() > (size_t)kNumInputs;
    p.q_norm = qk ? f(kNumInputs) : nullptr;
    p.k_norm = qk ? f(kNumInputs + 1) : nullptr;
    p.slots = reinterpret_cast<const int*>(ptr(kSlots));
    p.pos = reinterpret_cast<const int*>(ptr(kPositions));
    p.tables = reinterpret_cast<const int*>(ptr(kTables));
    if (p.T > 0) run_layer(p, spec);
  });
}

}  // namespace loom
