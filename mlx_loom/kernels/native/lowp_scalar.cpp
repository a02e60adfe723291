// Portable low-precision kernels: each row of w is decoded into a float buffer, then dotted with
// every row of x (fixed-width lane loops the auto-vectorizer can use). The fallback family, and
// the one the others are tested against alongside the pure-MLX references.
#include <vector>

#include "lowp_kernels.h"

namespace loom {
namespace {

void decode_row(const LowpArgs& a, int n, float* dst) {
  const int K = a.K;
  if (a.format == kFp4) {
    const uint32_t* wr = static_cast<const uint32_t*>(a.w) + (long long)n * (K / 8);
    const int gs = a.group_size, G = K / gs;
    const uint8_t* sr = a.scales + (long long)n * G;
    for (int g = 0; g < G; ++g) {
      const float s = a.scale_lut[sr[g]];
      for (int j = 0; j < gs / 8; ++j) {
        const uint32_t word = wr[g * gs / 8 + j];
        float* d = dst + g * gs + 8 * j;
        for (int i = 0; i < 8; ++i) d[i] = kE2M1[(word >> (4 * i)) & 0xF] * s;
      }
    }
    return;
  }
  const uint16_t* wr = static_cast<const uint16_t*>(a.w) + (long long)n * K;
  if (a.format == kBF16)
    for (int k = 0; k < K; ++k) dst[k] = bf16_to_float(wr[k]);
  else
    for (int k = 0; k < K; ++k) dst[k] = f16_to_float(wr[k]);
}

float dot(const float* u, const float* v, int K) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int k = 0;
  for (; k + 8 <= K; k += 8)
    for (int i = 0; i < 8; ++i) acc[i] += u[k + i] * v[k + i];
  float s = 0.f;
  for (; k < K; ++k) s += u[k] * v[k];
  for (int i = 0; i < 8; ++i) s += acc[i];
  return s;
}

}  // namespace

void lowp_rows_scalar(const LowpArgs& a, int n0, int n1) {
  thread_local std::vector<float> row;
  row.resize(a.K);
  for (int n = n0; n < n1; ++n) {
    decode_row(a, n, row.data());
    for (int m = 0; m < a.M; ++m) a.out[m * a.ldo + n] = dot(row.data(), a.x + m * a.ldx, a.K);
  }
}

}  // namespace loom
