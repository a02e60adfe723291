// arm64 NEON kernels (NEON is baseline on AArch64: no runtime check). Same loop shapes as
// qmm_avx2.cpp, with each run of 8 values held as two float32x4 halves.
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>

#include <algorithm>
#include <cstring>

#include "qmm_kernels.h"

namespace loom {
namespace {

struct F8 {
  float32x4_t lo, hi;
};

inline F8 zero8() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
inline F8 load_x8(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
inline F8 fma8(F8 acc, F8 a, F8 b) { return {vfmaq_f32(acc.lo, a.lo, b.lo), vfmaq_f32(acc.hi, a.hi, b.hi)}; }
inline float hsum8(F8 v) { return vaddvq_f32(vaddq_f32(v.lo, v.hi)); }

template <int BITS>
inline F8 load8(const uint32_t* wg, int c);

template <>
inline F8 load8<4>(const uint32_t* wg, int c) {
  const int32_t lo_sh[4] = {0, -4, -8, -12}, hi_sh[4] = {-16, -20, -24, -28};
  const uint32x4_t mask = vdupq_n_u32(0xF);
  uint32x4_t v = vdupq_n_u32(wg[c]);
  uint32x4_t lo = vandq_u32(vshlq_u32(v, vld1q_s32(lo_sh)), mask);
  uint32x4_t hi = vandq_u32(vshlq_u32(v, vld1q_s32(hi_sh)), mask);
  return {vcvtq_f32_u32(lo), vcvtq_f32_u32(hi)};
}

template <>
inline F8 load8<8>(const uint32_t* wg, int c) {
  uint16x8_t h = vmovl_u8(vld1_u8(reinterpret_cast<const uint8_t*>(wg + 2 * c)));
  return {vcvtq_f32_u32(vmovl_u16(vget_low_u16(h))), vcvtq_f32_u32(vmovl_high_u16(h))};
}

inline float bias_dot(const float* b, const float* xs, int G) {
  float32x4_t acc = vdupq_n_f32(0.f);
  int g = 0;
  for (; g + 4 <= G; g += 4) acc = vfmaq_f32(acc, vld1q_f32(b + g), vld1q_f32(xs + g));
  float s = vaddvq_f32(acc);
  for (; g < G; ++g) s += b[g] * xs[g];
  return s;
}

template <int BITS, int MB>
void direct(const QmmArgs& a, int n0, int n1) {
  const int gs = a.group_size, G = a.K / gs, cpg = gs / 8, wpc = BITS / 4;
  const long long wpr = (long long)a.K * BITS / 32;
  const float* xr[MB];
  for (int mb = 0; mb < MB; ++mb) xr[mb] = a.x + mb * a.ldx;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = a.w + n * wpr;
    const float* sr = a.scales + (long long)n * G;
    F8 acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = zero8();
    for (int g = 0; g < G; ++g) {
      const uint32_t* wg = wr + (long long)g * cpg * wpc;
      const int k0 = g * gs;
      F8 t[MB];
      for (int mb = 0; mb < MB; ++mb) t[mb] = zero8();
      for (int c = 0; c < cpg; ++c) {
        F8 q = load8<BITS>(wg, c);
        for (int mb = 0; mb < MB; ++mb) t[mb] = fma8(t[mb], q, load_x8(xr[mb] + k0 + 8 * c));
      }
      const float32x4_t s = vdupq_n_f32(sr[g]);
      for (int mb = 0; mb < MB; ++mb) acc[mb] = {vfmaq_f32(acc[mb].lo, t[mb].lo, s), vfmaq_f32(acc[mb].hi, t[mb].hi, s)};
    }
    const float* br = a.biases + (long long)n * G;
    for (int mb = 0; mb < MB; ++mb)
      a.out[(long long)mb * a.N + n] = hsum8(acc[mb]) + bias_dot(br, a.xsum + (long long)mb * G, G);
  }
}

template <int BITS>
void dequant_tile(const QmmArgs& a, int n, int nr, float* buf) {
  const int gs = a.group_size, G = a.K / gs, cpg = gs / 8, wpc = BITS / 4;
  const long long wpr = (long long)a.K * BITS / 32;
  for (int r = 0; r < nr; ++r) {
    const uint32_t* wr = a.w + (n + r) * wpr;
    const float* sr = a.scales + (long long)(n + r) * G;
    const float* br = a.biases + (long long)(n + r) * G;
    float* dst = buf + (long long)r * a.K;
    for (int g = 0; g < G; ++g) {
      const float32x4_t s = vdupq_n_f32(sr[g]), b = vdupq_n_f32(br[g]);
      const uint32_t* wg = wr + (long long)g * cpg * wpc;
      for (int c = 0; c < cpg; ++c) {
        F8 q = load8<BITS>(wg, c);
        vst1q_f32(dst + g * gs + 8 * c, vfmaq_f32(b, q.lo, s));
        vst1q_f32(dst + g * gs + 8 * c + 4, vfmaq_f32(b, q.hi, s));
      }
    }
  }
  if (nr < kTileN) std::memset(buf + (long long)nr * a.K, 0, sizeof(float) * (kTileN - nr) * a.K);
}

// 32 vector registers: MR = 4 rows of x x kTileN = 4 rows of w, 4-lane accumulators.
template <int MR>
void micro(const QmmArgs& a, const float* buf, int m, int n, int nr) {
  const int K = a.K;
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (long long)(m + i) * a.ldx;
  float32x4_t acc[MR][kTileN];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < kTileN; ++r) acc[i][r] = vdupq_n_f32(0.f);
  for (int k = 0; k < K; k += 4) {
    float32x4_t w0 = vld1q_f32(buf + k), w1 = vld1q_f32(buf + K + k);
    float32x4_t w2 = vld1q_f32(buf + 2 * K + k), w3 = vld1q_f32(buf + 3 * K + k);
    for (int i = 0; i < MR; ++i) {
      float32x4_t xv = vld1q_f32(xr[i] + k);
      acc[i][0] = vfmaq_f32(acc[i][0], w0, xv);
      acc[i][1] = vfmaq_f32(acc[i][1], w1, xv);
      acc[i][2] = vfmaq_f32(acc[i][2], w2, xv);
      acc[i][3] = vfmaq_f32(acc[i][3], w3, xv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nr; ++r) a.out[(long long)(m + i) * a.N + n + r] = vaddvq_f32(acc[i][r]);
}

// Rows of x in blocks that stay in L2 (~192 KiB); inside a block, each tile of w is dequantized
// once and swept over every row of the block.
template <int BITS>
void tiled(const QmmArgs& a, int n0, int n1, float* buf) {
  const int mblock = std::max(16, (192 * 1024 / (4 * a.K)) / 4 * 4);
  for (int m0 = 0; m0 < a.M; m0 += mblock) {
    const int m1 = std::min(a.M, m0 + mblock);
    for (int n = n0; n < n1; n += kTileN) {
      const int nr = std::min(kTileN, n1 - n);
      dequant_tile<BITS>(a, n, nr, buf);
      int m = m0;
      for (; m + 4 <= m1; m += 4) micro<4>(a, buf, m, n, nr);
      switch (m1 - m) {
        case 3: micro<3>(a, buf, m, n, nr); break;
        case 2: micro<2>(a, buf, m, n, nr); break;
        case 1: micro<1>(a, buf, m, n, nr); break;
        default: break;
      }
    }
  }
}

template <int BITS>
void rows(const QmmArgs& a, int n0, int n1, float* buf) {
  switch (a.M) {
    case 1: return direct<BITS, 1>(a, n0, n1);
    case 2: return direct<BITS, 2>(a, n0, n1);
    case 3: return direct<BITS, 3>(a, n0, n1);
    case 4: return direct<BITS, 4>(a, n0, n1);
    default: return tiled<BITS>(a, n0, n1, buf);
  }
}

}  // namespace

void qmm_rows_neon(const QmmArgs& a, int n0, int n1, float* scratch) {
  if (a.bits == 4) rows<4>(a, n0, n1, scratch);
  else rows<8>(a, n0, n1, scratch);
}

}  // namespace loom
#endif
