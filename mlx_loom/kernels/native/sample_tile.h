// One row's inverse-CDF draw from softmax(x / T) (mlx_loom/kernels/inverse_cdf.py's reference),
// with the vector exp2 of vec8.h: MLX's CPU power / exp are scalar libm calls (~5 ns per value,
// ~0.25 ms per 49k-token row). Included once per ISA, like attention_tile.h.
#include <cmath>
#include <limits>

#include "vec8.h"
#include "vec_kernels.h"

namespace loom::LOOM_ISA_NS {

namespace {

inline float hmax(vec8::v8 v) {
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

inline float hsum(vec8::v8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// Last index < end with p > 0 from begin, else -1.
inline int last_positive(const float* p, int begin, int end) {
  for (int j = end - 1; j >= begin; --j)
    if (p[j] > 0.f) return j;
  return -1;
}

}  // namespace

int inverse_cdf_row(const float* x, int V, float scale, float min_p, float u, float* p, float* block_sums) {
  using namespace vec8;
  // xmax
  float xmax = -std::numeric_limits<float>::infinity();
  int i = 0;
  if (V >= 8) {
    v8 m = load(x);
    for (i = 8; i + 8 <= V; i += 8) m = vmax(m, load(x + i));
    xmax = hmax(m);
  }
  for (; i < V; ++i) xmax = x[i] > xmax ? x[i] : xmax;
  if (!(xmax > -std::numeric_limits<float>::infinity()) || std::isinf(xmax))  // all -inf, NaN, +inf
    return V - 1;
  // p = 2^((x - xmax) * scale), exactly 0 for -inf logits (masked) and below min_p (p_max = 1);
  // summed per block of kSampleBlock in a fixed order (the search below uses the same sums).
  const int blocks = (V + kSampleBlock - 1) / kSampleBlock;
  const v8 mx8 = splat(xmax), sc8 = splat(scale), mp8 = splat(min_p);
  for (int b = 0; b < blocks; ++b) {
    const int b0 = b * kSampleBlock, b1 = b0 + kSampleBlock < V ? b0 + kSampleBlock : V;
    v8 acc = splat(0.f);
    int j = b0;
    for (; j + 8 <= b1; j += 8) {
      v8 pv = exp2_nonpos((load(x + j) - mx8) * sc8);
      pv = (v8)((i8)pv & (pv >= mp8));
      store(p + j, pv);
      acc += pv;
    }
    float s = hsum(acc);
    for (; j < b1; ++j) {
      const float y = (x[j] - xmax) * scale;
      float pj = y >= -126.f ? std::exp2(y) : 0.f;
      pj = pj >= min_p ? pj : 0.f;
      p[j] = pj;
      s += pj;
    }
    block_sums[b] = s;
  }
  float total = 0.f;
  for (int b = 0; b < blocks; ++b) total += block_sums[b];
  const float t = u * total;
  // The first index whose cumulative sum exceeds t: find its block by the block sums, then scan.
  float run = 0.f;
  for (int b = 0; b < blocks; ++b) {
    if (run + block_sums[b] > t) {
      const int b0 = b * kSampleBlock, b1 = b0 + kSampleBlock < V ? b0 + kSampleBlock : V;
      float c = run;
      for (int j = b0; j < b1; ++j) {
        c += p[j];
        if (c > t && p[j] > 0.f) return j;
      }
      const int last = last_positive(p, b0, b1);  // rounding left the scan short of t
      if (last >= 0) return last;
    }
    run += block_sums[b];
  }
  const int last = last_positive(p, 0, V);
  return last >= 0 ? last : V - 1;
}

}  // namespace loom::LOOM_ISA_NS
