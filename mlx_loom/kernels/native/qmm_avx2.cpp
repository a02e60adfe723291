// x86_64 AVX2 + FMA kernels. Only this file is compiled with -mavx2 -mfma; qmm.cpp calls it
// only after a runtime cpuid check, so the extension still loads (and runs the portable
// kernels) on an x86_64 CPU without AVX2.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "qmm_kernels.h"

namespace loom {
namespace {

// The direct path streams w once per call: fetch this far ahead of the row being read (as in
// qmm_avx512.cpp; the hardware prefetcher alone leaves decode stalled on these loads).
constexpr int kPrefetchBytes = 2048;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The c-th run of 8 quantized values of a group starting at word pointer wg, as floats.
template <int BITS>
inline __m256 load8(const uint32_t* wg, int c);

template <>
inline __m256 load8<4>(const uint32_t* wg, int c) {
  // One word = 8 nibbles, low first: broadcast it and shift lane i right by 4 i.
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  __m256i v = _mm256_set1_epi32(static_cast<int>(wg[c]));
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask));
}

template <>
inline __m256 load8<8>(const uint32_t* wg, int c) {
  // Two words = 8 bytes, low first: zero-extend each byte to a lane.
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wg + 2 * c));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

inline float bias_dot(const float* b, const float* xs, int G) {
  __m256 acc = _mm256_setzero_ps();
  int g = 0;
  for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), acc);
  float s = hsum(acc);
  for (; g < G; ++g) s += b[g] * xs[g];
  return s;
}

// Direct path: MB (1..4) rows of x against rows n0..n1 of w, unpacked in registers.
template <int BITS, int MB>
void direct(const QmmArgs& a, int n0, int n1) {
  const int gs = a.group_size, G = a.K / gs, cpg = gs / 8;
  const int wpc = BITS / 4;  // words per run of 8 values
  const long long wpr = (long long)a.K * BITS / 32;
  const float* xr[MB];
  for (int mb = 0; mb < MB; ++mb) xr[mb] = a.x + mb * a.ldx;
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = a.w + n * wpr;
    const float* sr = a.scales + (long long)n * G;
    __m256 acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
      const uint32_t* wg = wr + (long long)g * cpg * wpc;
      _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes, _MM_HINT_T0);
      const int k0 = g * gs;
      __m256 t[MB];
      for (int mb = 0; mb < MB; ++mb) t[mb] = _mm256_setzero_ps();
#pragma GCC unroll 4
      for (int c = 0; c < cpg; ++c) {
        __m256 q = load8<BITS>(wg, c);
        for (int mb = 0; mb < MB; ++mb) t[mb] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xr[mb] + k0 + 8 * c), t[mb]);
      }
      __m256 s = _mm256_set1_ps(sr[g]);
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_fmadd_ps(t[mb], s, acc[mb]);
    }
    const float* br = a.biases + (long long)n * G;
    for (int mb = 0; mb < MB; ++mb)
      a.out[(long long)mb * a.N + n] = hsum(acc[mb]) + bias_dot(br, a.xsum + (long long)mb * G, G);
  }
}

// Rows n .. n+nr of w dequantized (s * q + b) into buf [kTileN, K]; missing rows are zeros.
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
      const __m256 s = _mm256_set1_ps(sr[g]), b = _mm256_set1_ps(br[g]);
      const uint32_t* wg = wr + (long long)g * cpg * wpc;
#pragma GCC unroll 4
      for (int c = 0; c < cpg; ++c)
        _mm256_storeu_ps(dst + g * gs + 8 * c, _mm256_fmadd_ps(load8<BITS>(wg, c), s, b));
    }
  }
  if (nr < kTileN) std::memset(buf + (long long)nr * a.K, 0, sizeof(float) * (kTileN - nr) * a.K);
}

// MR rows of x (from xm) against the kTileN dequantized rows in buf -> out[m, n .. n+nr].
template <int MR>
void micro(const QmmArgs& a, const float* buf, int m, int n, int nr) {
  const int K = a.K;
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = a.x + (long long)(m + i) * a.ldx;
  __m256 acc[MR][kTileN];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < kTileN; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int k = 0; k < K; k += 8) {
    __m256 w0 = _mm256_loadu_ps(buf + k), w1 = _mm256_loadu_ps(buf + K + k);
    __m256 w2 = _mm256_loadu_ps(buf + 2 * K + k), w3 = _mm256_loadu_ps(buf + 3 * K + k);
    for (int i = 0; i < MR; ++i) {
      __m256 xv = _mm256_loadu_ps(xr[i] + k);
      acc[i][0] = _mm256_fmadd_ps(w0, xv, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(w1, xv, acc[i][1]);
      acc[i][2] = _mm256_fmadd_ps(w2, xv, acc[i][2]);
      acc[i][3] = _mm256_fmadd_ps(w3, xv, acc[i][3]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nr; ++r) a.out[(long long)(m + i) * a.N + n + r] = hsum(acc[i][r]);
}

// Rows of x in blocks that stay in L2 (~192 KiB); inside a block, each tile of w is dequantized
// once and swept over every row of the block.
template <int BITS>
void tiled(const QmmArgs& a, int n0, int n1, float* buf) {
  const int mblock = std::max(12, (192 * 1024 / (4 * a.K)) / 3 * 3);
  for (int m0 = 0; m0 < a.M; m0 += mblock) {
    const int m1 = std::min(a.M, m0 + mblock);
    for (int n = n0; n < n1; n += kTileN) {
      const int nr = std::min(kTileN, n1 - n);
      dequant_tile<BITS>(a, n, nr, buf);
      int m = m0;
      for (; m + 3 <= m1; m += 3) micro<3>(a, buf, m, n, nr);
      if (m1 - m == 2) micro<2>(a, buf, m, n, nr);
      else if (m1 - m == 1) micro<1>(a, buf, m, n, nr);
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

void qmm_rows_avx2(const QmmArgs& a, int n0, int n1, float* scratch) {
  static_assert(kDirectMaxM == 4, "direct<> is instantiated for M = 1..4");
  if (a.bits == 4) rows<4>(a, n0, n1, scratch);
  else rows<8>(a, n0, n1, scratch);
}

}  // namespace loom
