// x86_64 AVX-512F low-precision kernels (16 lanes; compiled with -mavx512f -mf16c, called after
// the runtime cpuid check).
//   f16: vcvtph2ps of 16 halves. bf16: zero-extend 16 to 32 bits and shift left 16.
//   fp4: two words broadcast to the two halves of a vector, lane i shifted right by 4 (i % 8);
//        vpermps looks the low 4 bits up in the 16 e2m1 code points: 3 instructions per 16 values.
#include <immintrin.h>

#include "lowp_kernels.h"

namespace loom {
namespace {

constexpr int kPrefetchBytes = 2048;

template <int FMT>
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (FMT == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int FMT>
inline float load1(uint16_t h) {
  return FMT == kF16 ? f16_to_float(h) : bf16_to_float(h);
}

template <int FMT, int MB>
void direct_half(const LowpArgs& a, int n0, int n1) {
  const int K = a.K;
  for (int n = n0; n < n1; ++n) {
    const uint16_t* wr = static_cast<const uint16_t*>(a.w) + (long long)n * K;
    __m512 acc0[MB], acc1[MB];
    for (int mb = 0; mb < MB; ++mb) acc0[mb] = acc1[mb] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 w0 = load16<FMT>(wr + k), w1 = load16<FMT>(wr + k + 16);
      for (int mb = 0; mb < MB; ++mb) {
        const float* xr = a.x + mb * a.ldx + k;
        acc0[mb] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc0[mb]);
        acc1[mb] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc1[mb]);
      }
    }
    for (; k + 16 <= K; k += 16) {
      const __m512 w0 = load16<FMT>(wr + k);
      for (int mb = 0; mb < MB; ++mb) acc0[mb] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(a.x + mb * a.ldx + k), acc0[mb]);
    }
    for (int mb = 0; mb < MB; ++mb) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[mb], acc1[mb]));
      for (int kk = k; kk < K; ++kk) s += load1<FMT>(wr[kk]) * a.x[mb * a.ldx + kk];
      a.out[mb * a.ldo + n] = s;
    }
  }
}

// 16 e2m1 values of words w[0], w[1] as floats.
inline __m512 fp4x16(const uint32_t* w, __m512 table, __m512i shifts) {
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(w[0]))),
                                          _mm256_set1_epi32(static_cast<int>(w[1])), 1);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(both, shifts), table);  // index = bits 0-3
}

template <int MB>
void direct_fp4(const LowpArgs& a, int n0, int n1) {
  const int gs = a.group_size, G = a.K / gs, wpg = gs / 8;
  const __m512 table = _mm512_loadu_ps(kE2M1);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = static_cast<const uint32_t*>(a.w) + (long long)n * (a.K / 8);
    const uint8_t* sr = a.scales + (long long)n * G;
    __m512 acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
      const uint32_t* wg = wr + g * wpg;
      _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes, _MM_HINT_T0);
      __m512 t[MB];
      for (int mb = 0; mb < MB; ++mb) t[mb] = _mm512_setzero_ps();
      for (int c = 0; c < wpg; c += 2) {  // group sizes 16 and 32: whole pairs of words
        const __m512 q = fp4x16(wg + c, table, shifts);
        for (int mb = 0; mb < MB; ++mb)
          t[mb] = _mm512_fmadd_ps(q, _mm512_loadu_ps(a.x + mb * a.ldx + g * gs + 8 * c), t[mb]);
      }
      const __m512 s = _mm512_set1_ps(a.scale_lut[sr[g]]);
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_fmadd_ps(t[mb], s, acc[mb]);
    }
    for (int mb = 0; mb < MB; ++mb) a.out[mb * a.ldo + n] = _mm512_reduce_add_ps(acc[mb]);
  }
}

// The E8M0 scales of lanes j = 0..15 of chunk c (lane j's group is 4c + j / 4): 2^(e - 127) built
// as float bits e << 23 (e = 0: 2^-127, a subnormal; e = 255: NaN), no table lookups.
inline __m512 e8m0_lanes(const uint8_t* sr, int c, int G) {
  uint32_t word = 0;
  for (int g = 0; g < 4 && 4 * c + g < G; ++g) word |= static_cast<uint32_t>(sr[4 * c + g]) << (8 * g);
  const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  const __m512i e = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                                     _mm512_set1_epi32(0xFF));
  __m512i bits = _mm512_slli_epi32(e, 23);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), _mm512_set1_epi32(0x00400000));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0xFF)), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(bits);
}

// MXFP4 with x interleaved (as the affine 4-bit kernel reads it): one load of 16 words = 128 values;
// nibble i of lane j is k = 128c + 8j + i, so a shift of the whole vector by 4i and one vpermps give
// 16 values matching 16 contiguous floats of xi (2 instructions + the FMA per 16 values); the
// scales multiply per lane once per 128 values.
template <int MB>
void direct_mxfp4_interleaved(const LowpArgs& a, int n0, int n1) {
  const int G = a.K / 32, wpr = a.K / 8, chunks = (wpr + 15) / 16;
  const __m512 table = _mm512_loadu_ps(kE2M1);
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = static_cast<const uint32_t*>(a.w) + (long long)n * wpr;
    const uint8_t* sr = a.scales + (long long)n * G;
    __m512 acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; ++c) {
      const int left = wpr - 16 * c;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      _mm_prefetch(reinterpret_cast<const char*>(wr + 16 * c) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i v = _mm512_maskz_loadu_epi32(m, wr + 16 * c);
      __m512 t[MB];
      for (int mb = 0; mb < MB; ++mb) t[mb] = _mm512_setzero_ps();
      const float* xc = a.xi + 128LL * c;
#define LOOM_FP4_STEP(I)                                                                         \
  {                                                                                              \
    const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * (I)), table);                \
    for (int mb = 0; mb < MB; ++mb) t[mb] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xc + mb * a.ldxi + 16 * (I)), t[mb]); \
  }
      LOOM_FP4_STEP(0) LOOM_FP4_STEP(1) LOOM_FP4_STEP(2) LOOM_FP4_STEP(3)
      LOOM_FP4_STEP(4) LOOM_FP4_STEP(5) LOOM_FP4_STEP(6) LOOM_FP4_STEP(7)
#undef LOOM_FP4_STEP
      const __m512 s = e8m0_lanes(sr, c, G);
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_fmadd_ps(t[mb], s, acc[mb]);
    }
    for (int mb = 0; mb < MB; ++mb) a.out[mb * a.ldo + n] = _mm512_reduce_add_ps(acc[mb]);
  }
}

template <int MB>
void direct(const LowpArgs& a, int n0, int n1) {
  switch (a.format) {
    case kF16: return direct_half<kF16, MB>(a, n0, n1);
    case kBF16: return direct_half<kBF16, MB>(a, n0, n1);
    default: return a.xi && a.group_size == 32 ? direct_mxfp4_interleaved<MB>(a, n0, n1) : direct_fp4<MB>(a, n0, n1);
  }
}

}  // namespace

void lowp_rows_avx512(const LowpArgs& a, int n0, int n1) {
  static_assert(kLowpMaxM == 4 && kLowpMaxMHalfAvx512 == 8, "direct<> is instantiated for M = 1..4, 16-bit to 8");
  if (a.M > 4 && a.format != kFp4) {  // lowp_run passes fp4 at most 4 rows
    switch (a.M) {
      case 5: return a.format == kF16 ? direct_half<kF16, 5>(a, n0, n1) : direct_half<kBF16, 5>(a, n0, n1);
      case 6: return a.format == kF16 ? direct_half<kF16, 6>(a, n0, n1) : direct_half<kBF16, 6>(a, n0, n1);
      case 7: return a.format == kF16 ? direct_half<kF16, 7>(a, n0, n1) : direct_half<kBF16, 7>(a, n0, n1);
      default: return a.format == kF16 ? direct_half<kF16, 8>(a, n0, n1) : direct_half<kBF16, 8>(a, n0, n1);
    }
  }
  switch (a.M) {
    case 1: return direct<1>(a, n0, n1);
    case 2: return direct<2>(a, n0, n1);
    case 3: return direct<3>(a, n0, n1);
    default: return direct<4>(a, n0, n1);
  }
}

}  // namespace loom
