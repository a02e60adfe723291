// Portable C++ kernels: the fallback on CPUs without AVX2/FMA or NEON. Written with fixed-width
// lane loops so the compiler's auto-vectorizer can use whatever SIMD the target has.
#include <cstring>

#include "qmm_kernels.h"

namespace loom {

void group_sums(const QmmArgs& a, float* xsum) {
  const int G = a.K / a.group_size;
  for (int m = 0; m < a.M; ++m) {
    const float* xr = a.x + m * a.ldx;
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
      for (int k = 0; k < a.group_size; ++k) s += xr[g * a.group_size + k];
      xsum[m * G + g] = s;
    }
  }
}

void interleave_x(const QmmArgs& a, float* xi) {
  const long long ld = interleaved_stride(a.K);
  for (int m = 0; m < a.M; ++m) {
    const float* xr = a.x + m * a.ldx;
    float* dst = xi + m * ld;
    for (long long c = 0; c < ld; c += 128)
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 16; ++j) {
          const long long k = c + 8 * j + i;
          dst[c + 16 * i + j] = k < a.K ? xr[k] : 0.f;
        }
  }
}

// Row n of w -> float [K]: s * q + b.
static void dequant_row(const QmmArgs& a, int n, float* dst) {
  const int per = 32 / a.bits, G = a.K / a.group_size, wpg = a.group_size / per;
  const uint32_t mask = (1u << a.bits) - 1;
  const uint32_t* wr = a.w + (long long)n * (a.K / per);
  for (int g = 0; g < G; ++g) {
    const float s = a.scales[(long long)n * G + g], b = a.biases[(long long)n * G + g];
    for (int j = 0; j < wpg; ++j) {
      const uint32_t word = wr[g * wpg + j];
      float* d = dst + g * a.group_size + j * per;
      for (int i = 0; i < per; ++i) d[i] = s * float((word >> (i * a.bits)) & mask) + b;
    }
  }
}

static float dot(const float* u, const float* v, int K) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int k = 0;
  for (; k + 8 <= K; k += 8)
    for (int i = 0; i < 8; ++i) acc[i] += u[k + i] * v[k + i];
  float s = 0.f;
  for (; k < K; ++k) s += u[k] * v[k];
  for (int i = 0; i < 8; ++i) s += acc[i];
  return s;
}

void qmm_rows_scalar(const QmmArgs& a, int n0, int n1, float* scratch) {
  for (int n = n0; n < n1; ++n) {
    dequant_row(a, n, scratch);
    for (int m = 0; m < a.M; ++m) a.out[(long long)m * a.N + n] = dot(scratch, a.x + m * a.ldx, a.K);
  }
}

}  // namespace loom
