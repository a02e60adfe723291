// Per-row RMSNorm and RoPE on float32 rows: shared by the fused decode layer and the standalone
// RmsNorm / Rope primitives (rope_norm.cpp), so both compute bit-for-bit the same thing.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

namespace loom {

// y [T, DM] = x [T, DM] * rsqrt(mean(x^2) + eps) * w [DM]; y may alias x.
inline void rms_norm(const float* x, const float* w, int T, int DM, float eps, float* y) {
  for (int t = 0; t < T; ++t) {
    const float* xr = x + (size_t)t * DM;
    float ss = 0.f;
    for (int i = 0; i < DM; ++i) ss += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / DM + eps);
    for (int i = 0; i < DM; ++i) y[(size_t)t * DM + i] = xr[i] * r * w[i];
  }
}

// x [T, heads, D] rotated in place by each row's position (inv_freq [D/2], position scale folded in).
inline void rope(float* x, int T, int heads, int D, const int* pos, const float* inv_freq, bool traditional) {
  const int half = D / 2;
  std::vector<float> c(half), s(half);
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < half; ++i) {
      const float theta = static_cast<float>(pos[t]) * inv_freq[i];
      c[i] = std::cos(theta);
      s[i] = std::sin(theta);
    }
    for (int h = 0; h < heads; ++h) {
      float* v = x + ((size_t)t * heads + h) * D;
      for (int i = 0; i < half; ++i) {
        const int a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + half;
        const float x1 = v[a], x2 = v[b];
        v[a] = x1 * c[i] - x2 * s[i];
        v[b] = x1 * s[i] + x2 * c[i];
      }
    }
  }
}

}  // namespace loom
