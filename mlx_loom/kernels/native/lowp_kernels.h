// Matmuls over weights stored below float32, free of MLX headers so each ISA file compiles on
// its own: x float32 [M, K] @ W.T -> float32 [M, N], accumulated in float32.
//
//   kF16 / kBF16: w uint16 [N, K] (IEEE half / bfloat16 bits), any K.
//   kFp4: w uint32 [N, K / 8], e2m1 values packed low nibble first (MLX's mxfp4 / nvfp4 layout:
//         element k of a row is nibble k % 8 of word k / 8; bit 3 = sign, bits 0-2 index
//         {0, 0.5, 1, 1.5, 2, 3, 4, 6}); scales uint8 [N, K / group_size], decoded through
//         scale_lut (E8M0 = 2^(e - 127) for mxfp4, group 32; E4M3 for nvfp4, group 16).
//
// Every kernel computes out[m, n] for m < M <= kLowpMaxM and n in [n0, n1) straight from the
// packed row (decode: memory-bound matrix-vector products); lowp_run tiles larger M over it.
#pragma once

#include <cstdint>

namespace loom {

constexpr int kLowpMaxM = 4;
// The AVX-512 16-bit kernels take up to this many rows of x per pass (16 accumulators of its 32
// registers): a verification step's 5 rows per sequence then stream w once, not as 4 + 1.
constexpr int kLowpMaxMHalfAvx512 = 8;

enum LowpFormat : int { kF16 = 0, kBF16 = 1, kFp4 = 2 };

struct LowpArgs {
  const float* x;          // [M, K], row stride ldx
  long long ldx;
  const void* w;           // uint16 [N, K] or uint32 [N, K / 8]
  const uint8_t* scales;   // [N, K / group_size] (kFp4 only)
  const float* scale_lut;  // [256] (kFp4 only)
  float* out;              // [M, N], row stride ldo
  long long ldo;
  const float* xi;         // [M, ldxi]: x in the AVX-512 4-bit order (qmm_kernels.h interleave_x), or null
  long long ldxi;
  int M, N, K, group_size, format;
};

// The e2m1 code points, sign bit included (index = nibble).
inline constexpr float kE2M1[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                    -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

static inline float bf16_to_float(uint16_t h) {
  union { uint32_t u; float f; } v{static_cast<uint32_t>(h) << 16};
  return v.f;
}

// IEEE binary16 -> float32, subnormals, infinities and NaNs included; branch-free (selects), so
// the scalar family's loops vectorize (F. Giesen's half_to_float_fast: subnormals through a float
// subtraction).
static inline float f16_to_float(uint16_t h) {
  union U { uint32_t u; float f; };
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7FFF) << 13;  // exponent / mantissa
  const uint32_t exp = shifted & 0x0F800000u;
  U o{shifted + ((127u - 15u) << 23)};
  o.u += exp == 0x0F800000u ? ((128u - 16u) << 23) : 0u;  // Inf / NaN keep an all-ones exponent
  U sub{o.u + (1u << 23)}, magic{113u << 23};
  sub.f -= magic.f;  // zero / subnormal: renormalize
  U r{(exp == 0 ? sub.u : o.u) | (static_cast<uint32_t>(h & 0x8000) << 16)};
  return r.f;
}

void lowp_rows_scalar(const LowpArgs& a, int n0, int n1);
#if defined(__x86_64__) || defined(_M_X64)
void lowp_rows_avx2(const LowpArgs& a, int n0, int n1);
void lowp_rows_avx512(const LowpArgs& a, int n0, int n1);
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
void lowp_rows_neon(const LowpArgs& a, int n0, int n1);
#endif

}  // namespace loom
