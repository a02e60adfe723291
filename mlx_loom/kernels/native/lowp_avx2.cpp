// x86_64 AVX2 + FMA + F16C low-precision kernels. Only this file is compiled with those flags;
// lowp.cpp calls it after the runtime cpuid check that picks the affine family (qmm.cpp).
//   f16: vcvtph2ps, 8 values per instruction. bf16: zero-extend to 32 bits and shift left 16.
//   fp4: broadcast a word, shift lane i right by 4i; vpermps looks bits 0-2 up in the e2m1
//        magnitudes and bit 3, moved to bit 31, is the sign: 4 instructions per 8 values.
#include <immintrin.h>

#include "lowp_kernels.h"

namespace loom {
namespace {

constexpr int kPrefetchBytes = 2048;  // as the affine kernels: rows stream once per call

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int FMT>
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (FMT == kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int FMT>
inline float load1(uint16_t h) {
  return FMT == kF16 ? f16_to_float(h) : bf16_to_float(h);
}

// 16-bit rows: MB (1..4) rows of x against rows n0..n1 of w.
template <int FMT, int MB>
void direct_half(const LowpArgs& a, int n0, int n1) {
  const int K = a.K;
  for (int n = n0; n < n1; ++n) {
    const uint16_t* wr = static_cast<const uint16_t*>(a.w) + (long long)n * K;
    __m256 acc0[MB], acc1[MB];
    for (int mb = 0; mb < MB; ++mb) acc0[mb] = acc1[mb] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + k) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 w0 = load8<FMT>(wr + k), w1 = load8<FMT>(wr + k + 8);
      for (int mb = 0; mb < MB; ++mb) {
        const float* xr = a.x + mb * a.ldx + k;
        acc0[mb] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[mb]);
        acc1[mb] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc1[mb]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 w0 = load8<FMT>(wr + k);
      for (int mb = 0; mb < MB; ++mb) acc0[mb] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a.x + mb * a.ldx + k), acc0[mb]);
    }
    for (int mb = 0; mb < MB; ++mb) {
      float s = hsum(_mm256_add_ps(acc0[mb], acc1[mb]));
      for (int kk = k; kk < K; ++kk) s += load1<FMT>(wr[kk]) * a.x[mb * a.ldx + kk];
      a.out[mb * a.ldo + n] = s;
    }
  }
}

// 8 e2m1 values of one word as floats.
inline __m256 fp4x8(uint32_t word, __m256 mags, __m256i shifts, __m256i sign_bit) {
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  const __m256 mag = _mm256_permutevar8x32_ps(mags, v);  // index = bits 0-2
  return _mm256_xor_ps(mag, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 28), sign_bit)));
}

template <int MB>
void direct_fp4(const LowpArgs& a, int n0, int n1) {
  const int gs = a.group_size, G = a.K / gs, wpg = gs / 8;
  const __m256 mags = _mm256_loadu_ps(kE2M1);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i sign_bit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int n = n0; n < n1; ++n) {
    const uint32_t* wr = static_cast<const uint32_t*>(a.w) + (long long)n * (a.K / 8);
    const uint8_t* sr = a.scales + (long long)n * G;
    __m256 acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
      const uint32_t* wg = wr + g * wpg;
      _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes, _MM_HINT_T0);
      __m256 t[MB];
      for (int mb = 0; mb < MB; ++mb) t[mb] = _mm256_setzero_ps();
      for (int c = 0; c < wpg; ++c) {
        const __m256 q = fp4x8(wg[c], mags, shifts, sign_bit);
        for (int mb = 0; mb < MB; ++mb)
          t[mb] = _mm256_fmadd_ps(q, _mm256_loadu_ps(a.x + mb * a.ldx + g * gs + 8 * c), t[mb]);
      }
      const __m256 s = _mm256_set1_ps(a.scale_lut[sr[g]]);
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_fmadd_ps(t[mb], s, acc[mb]);
    }
    for (int mb = 0; mb < MB; ++mb) a.out[mb * a.ldo + n] = hsum(acc[mb]);
  }
}

template <int MB>
void direct(const LowpArgs& a, int n0, int n1) {
  switch (a.format) {
    case kF16: return direct_half<kF16, MB>(a, n0, n1);
    case kBF16: return direct_half<kBF16, MB>(a, n0, n1);
    default: return direct_fp4<MB>(a, n0, n1);
  }
}

}  // namespace

void lowp_rows_avx2(const LowpArgs& a, int n0, int n1) {
  static_assert(kLowpMaxM == 4, "direct<> is instantiated for M = 1..4");
  switch (a.M) {
    case 1: return direct<1>(a, n0, n1);
    case 2: return direct<2>(a, n0, n1);
    case 3: return direct<3>(a, n0, n1);
    default: return direct<4>(a, n0, n1);
  }
}

}  // namespace loom
