// Eight-float vectors with GCC/Clang vector extensions, for the kernels compiled once per ISA
// (vec_avx2.cpp with -mavx2 -mfma, vec_generic.cpp with the compiler's baseline: NEON on AArch64,
// SSE2 on x86-64). One source, register-blocked code on each; no intrinsics to keep in sync.
#pragma once

#include <cstdint>
#include <cstring>

// Vectors wider than the baseline ISA only live inside inlined helpers, never across an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace loom::vec8 {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads / stores
typedef int32_t i8 __attribute__((vector_size(32)));

inline v8 load(const float* p) {
  return *reinterpret_cast<const v8u*>(p);
}
inline void store(float* p, v8 v) {
  *reinterpret_cast<v8u*>(p) = v;
}
inline v8 splat(float x) {
  return v8{x, x, x, x, x, x, x, x};
}

inline v8 vmax(v8 a, v8 b) {
  return (v8)((((i8)a) & (a >= b)) | (((i8)b) & ~(a >= b)));
}
inline v8 vmin(v8 a, v8 b) {
  return (v8)((((i8)a) & (a <= b)) | (((i8)b) & ~(a <= b)));
}

// 2^y for y in [-126, 127] (clamped outside): 2^floor(y) from the exponent bits times a degree-6
// minimax polynomial of the fraction (relative error ~2e-7).
inline v8 exp2_clamped(v8 y) {
  y = vmin(vmax(y, splat(-126.f)), splat(127.f));
  v8 fl = __builtin_convertvector(__builtin_convertvector(y, i8), v8);  // trunc toward 0
  fl += __builtin_convertvector((i8)(fl > y), v8);  // true lanes are -1: floor for negatives
  const v8 f = y - fl;  // [0, 1)
  v8 p = splat(1.535336188e-4f);
  p = p * f + 1.339887440e-3f;
  p = p * f + 9.618437357e-3f;
  p = p * f + 5.550332471e-2f;
  p = p * f + 2.402264791e-1f;
  p = p * f + 6.931472028e-1f;
  p = p * f + 1.0f;
  const v8 scale = (v8)((__builtin_convertvector(fl, i8) + 127) << 23);
  return p * scale;
}

// 2^y for y <= 0, exactly 0 below -126 (masked attention scores are -inf).
inline v8 exp2_nonpos(v8 y) {
  const i8 keep = y >= splat(-126.f);
  return (v8)((i8)exp2_clamped(y) & keep);
}

}  // namespace loom::vec8
