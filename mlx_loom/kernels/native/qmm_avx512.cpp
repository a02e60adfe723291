// x86_64 AVX-512F kernels for the direct path (M <= kDirectMaxM, decode). Only this file and
// qmm_avx512_panel.cpp (M > kDirectMaxM) are compiled with -mavx512f; qmm.cpp calls them only
// after a runtime cpuid check.
//
// 4-bit: a 512-bit load of 16 words holds 128 values; nibble i of lane j is k = 128c + 8j + i.
// Shifting the whole vector right by 4i and looking the low 4 bits up in a 16-entry float table
// (vpermps) gives those 16 values as floats in 2 instructions, against 4-5 per 8 values for a
// broadcast + variable shift + mask + convert. x is pre-arranged once per call to the same
// order (interleave_x), so each lookup is one FMA with a contiguous load.
// 8-bit: 16 consecutive bytes zero-extend to 16 lanes (vpmovzxbd) in x's own order.
#include <immintrin.h>

#include "qmm_kernels.h"

namespace loom {
namespace {

constexpr int kChunk = 128;  // 4-bit values per 512-bit load
// Weights stream once per call from L3 / DRAM: fetch this far ahead of the row being read (the
// hardware prefetcher alone left ~1/5 of decode time stalled on these loads; 1-4 KiB all gave the
// same gain here: default model decode 11.1 -> 8.9 ms per token).
constexpr int kPrefetchBytes = 2048;

inline __mmask16 first_lanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// sum_g biases[g] * xsum[g] over G groups.
inline float bias_dot(const float* b, const float* xs, int G) {
  __m512 acc = _mm512_setzero_ps();
  for (int g = 0; g < G; g += 16) {
    const __mmask16 m = first_lanes(G - g);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + g), _mm512_maskz_loadu_ps(m, xs + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// out[m0 + mb, n] = the row's scaled dot products + its bias term, for MB rows of x from m0.
template <int MB>
inline void store_row(const QmmArgs& a, int n, int m0, const __m512* acc) {
  const int G = a.K / a.group_size;
  const float* br = a.biases + (long long)n * G;
  for (int mb = 0; mb < MB; ++mb)
    a.out[(long long)(m0 + mb) * a.N + n] =
        _mm512_reduce_add_ps(acc[mb]) + bias_dot(br, a.xsum + (long long)(m0 + mb) * G, G);
}

// Lane j of a 4-bit chunk c lies in group 128c / gs + lane_groups(gs)[j] (gs is 32, 64 or 128:
// divides 128).
inline __m512i lane_groups(int gs) {
  alignas(64) int v[16];
  for (int j = 0; j < 16; ++j) v[j] = 8 * j / gs;
  return _mm512_load_si512(v);
}

template <int MB>
void direct4(const QmmArgs& a, int n0, int n1) {
  const int gs = a.group_size, G = a.K / gs;
  const long long wpr = a.K / 8, ldxi = interleaved_stride(a.K);
  const int chunks = static_cast<int>((wpr + 15) / 16);
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lane_group = lane_groups(gs);
  const int gs_shift = __builtin_ctz(gs);
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = a.w + n * wpr;
    const float* sr = a.scales + (long long)n * G;
    __m512 acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + 16 * c) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i v = _mm512_maskz_loadu_epi32(first_lanes(static_cast<int>(wpr - 16LL * c)), wr + 16 * c);
      const float* xc = a.xi + (long long)kChunk * c;
      __m512 t[MB];
      const __m512 q0 = _mm512_permutexvar_ps(v, table);
      for (int mb = 0; mb < MB; ++mb) t[mb] = _mm512_mul_ps(q0, _mm512_loadu_ps(xc + mb * ldxi));
#pragma GCC unroll 7
      for (int i = 1; i < 8; ++i) {
        const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * i), table);
        for (int mb = 0; mb < MB; ++mb) t[mb] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xc + mb * ldxi + 16 * i), t[mb]);
      }
      // Lanes past K hold q = 0 and x = 0, so their (masked-off, zero) scale is never used.
      const int g0 = (kChunk >> gs_shift) * c;  // no division per chunk
      const __m512 s = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(first_lanes(G - g0), sr + g0));
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_fmadd_ps(t[mb], s, acc[mb]);
    }
    store_row<MB>(a, n, 0, acc);
  }
}

// direct4's loop for NR (1 or 2) rows of w from n against MB (<= 4) rows of x from m0: each load of x
// feeds NR FMAs. Batches of 5-8 rows take it (two passes of up to 4 rows of x, rows of w in pairs):
// ~5% less time per 8-row decode step than direct4<8>, whose 16 accumulators left the loop short of
// registers (A/B in one process, 10 of 10 pairs). Up to 4 rows direct4 stays faster (~5% at 1 row).
// Each output is the same sequence of operations as in direct4 (a row of a batch gets bit for bit
// what it gets alone).
template <int MB, int NR>
inline void direct4_block(const QmmArgs& a, int n, int m0) {
  const int gs = a.group_size, G = a.K / gs;
  const long long wpr = a.K / 8, ldxi = interleaved_stride(a.K);
  const int chunks = static_cast<int>((wpr + 15) / 16);
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lane_group = lane_groups(gs);
  const int gs_shift = __builtin_ctz(gs);
  const uint32_t* wr[NR];
  const float* sr[NR];
  __m512 acc[NR][MB];
  for (int r = 0; r < NR; ++r) {
    wr[r] = a.w + (n + r) * wpr;
    sr[r] = a.scales + (long long)(n + r) * G;
    for (int mb = 0; mb < MB; ++mb) acc[r][mb] = _mm512_setzero_ps();
  }
  const float* x0 = a.xi + (long long)m0 * ldxi;
  for (int c = 0; c < chunks; ++c) {
    const __mmask16 words = first_lanes(static_cast<int>(wpr - 16LL * c));
    __m512i v[NR];
    __m512 q[NR], t[NR][MB];
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(wr[r] + 16 * c) + kPrefetchBytes, _MM_HINT_T0);
      v[r] = _mm512_maskz_loadu_epi32(words, wr[r] + 16 * c);
      q[r] = _mm512_permutexvar_ps(v[r], table);
    }
    const float* xc = x0 + (long long)kChunk * c;
    for (int mb = 0; mb < MB; ++mb) {
      const __m512 xv = _mm512_loadu_ps(xc + mb * ldxi);
      for (int r = 0; r < NR; ++r) t[r][mb] = _mm512_mul_ps(q[r], xv);
    }
#pragma GCC unroll 7
    for (int i = 1; i < 8; ++i) {
      for (int r = 0; r < NR; ++r) q[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v[r], 4 * i), table);
      for (int mb = 0; mb < MB; ++mb) {
        const __m512 xv = _mm512_loadu_ps(xc + mb * ldxi + 16 * i);
        for (int r = 0; r < NR; ++r) t[r][mb] = _mm512_fmadd_ps(q[r], xv, t[r][mb]);
      }
    }
    // Lanes past K hold q = 0 and x = 0, so their (masked-off, zero) scale is never used.
    const int g0 = (kChunk >> gs_shift) * c;  // no division per chunk
    for (int r = 0; r < NR; ++r) {
      const __m512 sc = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(first_lanes(G - g0), sr[r] + g0));
      for (int mb = 0; mb < MB; ++mb) acc[r][mb] = _mm512_fmadd_ps(t[r][mb], sc, acc[r][mb]);
    }
  }
  for (int r = 0; r < NR; ++r) store_row<MB>(a, n + r, m0, acc[r]);
}

// Batches of 5 to 8 rows of x.
template <int MB>
void direct4_pairs(const QmmArgs& a, int n0, int n1) {
  static_assert(MB > 4 && MB <= 8, "direct4 takes up to 4 rows");
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    direct4_block<4, 2>(a, n, 0);
    direct4_block<MB - 4, 2>(a, n, 4);
  }
  if (n < n1) {
    direct4_block<4, 1>(a, n, 0);
    direct4_block<MB - 4, 1>(a, n, 4);
  }
}

template <int MB>
void direct8(const QmmArgs& a, int n0, int n1) {
  const int gs = a.group_size, G = a.K / gs;
  const long long wpr = a.K / 4;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(a.w + n * wpr);
    const float* sr = a.scales + (long long)n * G;
    __m512 acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
      __m512 t[MB];
      for (int mb = 0; mb < MB; ++mb) t[mb] = _mm512_setzero_ps();
      _mm_prefetch(reinterpret_cast<const char*>(wr + g * gs) + kPrefetchBytes, _MM_HINT_T0);
      for (int k = g * gs; k < (g + 1) * gs; k += 16) {  // gs is a multiple of 16
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))));
        for (int mb = 0; mb < MB; ++mb) t[mb] = _mm512_fmadd_ps(q, _mm512_loadu_ps(a.x + mb * a.ldx + k), t[mb]);
      }
      const __m512 s = _mm512_set1_ps(sr[g]);
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_fmadd_ps(t[mb], s, acc[mb]);
    }
    store_row<MB>(a, n, 0, acc);
  }
}

template <int MB>
void direct(const QmmArgs& a, int n0, int n1) {
  if constexpr (MB > 4) {
    if (a.bits == 4) return direct4_pairs<MB>(a, n0, n1);
  } else {
    if (a.bits == 4) return direct4<MB>(a, n0, n1);
  }
  direct8<MB>(a, n0, n1);
}

}  // namespace

void qmm_rows_avx512(const QmmArgs& a, int n0, int n1, float* scratch) {
  static_assert(kDirectMaxMAvx512 == 8, "direct<> is instantiated for M = 1..8");
  switch (a.M) {
    case 1: return direct<1>(a, n0, n1);
    case 2: return direct<2>(a, n0, n1);
    case 3: return direct<3>(a, n0, n1);
    case 4: return direct<4>(a, n0, n1);
    case 5: return direct<5>(a, n0, n1);
    case 6: return direct<6>(a, n0, n1);
    case 7: return direct<7>(a, n0, n1);
    case 8: return direct<8>(a, n0, n1);
    default: return qmm_panels_avx512(a, n0, n1, scratch);
  }
}

}  // namespace loom
