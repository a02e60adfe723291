// x86_64 AVX-512F kernel for the tiled path (M > kDirectMaxMAvx512: prefill chunks, batched decode of many rows).
// Only this file and qmm_avx512.cpp are compiled with -mavx512f; qmm.cpp checks cpuid first.
//
// The AVX2 tile kernel dots rows of x with rows of w along k and pays a horizontal sum per
// output; this one is the outer-product form: a panel of kPanelN = 32 rows of w is dequantized
// k-major ([k][32], two zmm per k) and each k updates MR x 32 outputs with 2 * MR FMAs of a
// broadcast x value, so the FMA units, not loads or shuffles, bound it. Panels cover kChunkK
// values of k at a time (64 KiB, L2-resident while every row of x sweeps it); partial sums of
// later chunks are added to out. Rows of x go in blocks of ~1 MiB so a block stays in L2 while
// every panel of the thread's range sweeps it.
#include <immintrin.h>

#include <algorithm>

#include "qmm_kernels.h"

namespace loom {
namespace {

constexpr int kMR = 12;  // rows of x per micro-kernel call: 24 accumulators + 2 panel registers
constexpr int kXBlockBytes = 1 << 20;

inline __mmask16 first_lanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// The 16 x 16 words r[j][c] (row j of w, word c of a run) -> r[c][j], in registers: 32-bit and
// 64-bit unpacks transpose each 128-bit lane's 4 x 4 blocks, two 128-bit lane shuffles the blocks.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // r[4q + i], lane l: word 4l + i of rows 4q .. 4q + 3
    r[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    r[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    r[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    r[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x44), v1 = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xEE);
    t[i] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[8 + i] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int j = 0; j < 16; ++j) r[j] = t[j];
}

// panel[k * 32 + j] = dequantized w[n + j, k0 + k] for k < kc; rows j >= nr are zeros.
// 16 rows at a time: a run of 16 packed words per row is loaded as one vector per row and
// transposed in registers (transpose16) so each word index becomes one vector of 16 rows, unpacked
// with a shift and a mask; a group's scales and biases of the 16 rows are gathered (stride G).
template <int BITS>
void dequant_panel(const QmmArgs& a, int n, int nr, int k0, int kc, float* panel) {
  constexpr int per = 32 / BITS;  // values per word
  const int gs = a.group_size, G = a.K / gs;
  const long long wpr = a.K / per;
  const __m512i low = _mm512_set1_epi32((1 << BITS) - 1);
  const __m512i row_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(G));
  for (int h = 0; h < kPanelN / 16; ++h) {
    const int vr = std::clamp(nr - 16 * h, 0, 16), row0 = n + 16 * h;
    const __mmask16 rows = first_lanes(vr);
    float* dst = panel + 16 * h;
    int group = -1;
    __m512 s = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int k = 0; k < kc; k += 16 * per) {
      const int nw = std::min(16, (kc - k) / per);
      const long long wo = (k0 + k) / per;
      const __mmask16 words = first_lanes(nw);
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        // The next panel's words (read after this panel's micro-kernels): a panel's 16-32 rows are
        // that many streams, which left the hardware prefetcher behind (~1/5 of prefill time).
        if (row0 + j + kPanelN < a.N)
          _mm_prefetch(reinterpret_cast<const char*>(a.w + (long long)(row0 + j + kPanelN) * wpr + wo), _MM_HINT_T0);
        r[j] = j < vr ? _mm512_maskz_loadu_epi32(words, a.w + (long long)(row0 + j) * wpr + wo) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int c = 0; c < nw; ++c) {
        const int kw = k + c * per;  // panel row of this word's first value
        const int g = (k0 + kw) / gs;  // a group holds whole words (gs >= 32 >= per)
        if (g != group) {
          group = g;
          const __m512i idx = _mm512_add_epi32(row_offsets, _mm512_set1_epi32(g));
          s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, idx, a.scales + (long long)row0 * G, 4);
          b = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, idx, a.biases + (long long)row0 * G, 4);
        }
        const __m512i t = r[c];
#pragma GCC unroll 8
        for (int i = 0; i < per; ++i) {
          const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(t, BITS * i), low));
          _mm512_storeu_ps(dst + (long long)(kw + i) * kPanelN, _mm512_fmadd_ps(q, s, b));
        }
      }
    }
  }
}

// out[m + i, n .. n + nr] (+)= x[m + i, k0 .. k0 + kc] @ panel, i < MR. accumulate: add to out
// (a later k chunk) instead of overwriting it.
template <int MR>
void micro(const QmmArgs& a, const float* panel, int m, int n, int nr, int k0, int kc, bool accumulate) {
  const __mmask16 m0 = first_lanes(nr), m1 = first_lanes(nr - 16);
  const float* x = a.x + (long long)m * a.ldx + k0;
  float* out = a.out + (long long)m * a.N + n;
  __m512 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) {
    c0[i] = accumulate ? _mm512_maskz_loadu_ps(m0, out + (long long)i * a.N) : _mm512_setzero_ps();
    c1[i] = accumulate ? _mm512_maskz_loadu_ps(m1, out + (long long)i * a.N + 16) : _mm512_setzero_ps();
  }
  for (int k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + (long long)k * kPanelN);
    const __m512 w1 = _mm512_loadu_ps(panel + (long long)k * kPanelN + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[(long long)i * a.ldx + k]);
      c0[i] = _mm512_fmadd_ps(w0, xb, c0[i]);
      c1[i] = _mm512_fmadd_ps(w1, xb, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(out + (long long)i * a.N, m0, c0[i]);
    _mm512_mask_storeu_ps(out + (long long)i * a.N + 16, m1, c1[i]);
  }
}

template <int R>
void micro_rest(const QmmArgs& a, const float* panel, int m, int rows, int n, int nr, int k0, int kc, bool acc) {
  if constexpr (R > 0) {
    if (rows == R) return micro<R>(a, panel, m, n, nr, k0, kc, acc);
    micro_rest<R - 1>(a, panel, m, rows, n, nr, k0, kc, acc);
  }
}

template <int BITS>
void panels(const QmmArgs& a, int n0, int n1, float* panel) {
  const int mblock = std::max(kMR, kXBlockBytes / (4 * a.K) / kMR * kMR);
  for (int mb = 0; mb < a.M; mb += mblock) {
    const int me = std::min(a.M, mb + mblock);
    for (int n = n0; n < n1; n += kPanelN) {
      const int nr = std::min(kPanelN, n1 - n);
      for (int k0 = 0; k0 < a.K; k0 += kChunkK) {
        const int kc = std::min(kChunkK, a.K - k0);
        dequant_panel<BITS>(a, n, nr, k0, kc, panel);
        int m = mb;
        for (; m + kMR <= me; m += kMR) micro<kMR>(a, panel, m, n, nr, k0, kc, k0 > 0);
        micro_rest<kMR - 1>(a, panel, m, me - m, n, nr, k0, kc, k0 > 0);
      }
    }
  }
}

}  // namespace

void qmm_panels_avx512(const QmmArgs& a, int n0, int n1, float* scratch) {
  if (a.bits == 4) panels<4>(a, n0, n1, scratch);
  else panels<8>(a, n0, n1, scratch);
}

}  // namespace loom
