// Tiled (flash-style) causal attention over paged K/V for one task: one row b, one kv head g and a
// tile of queries, whose rep = H / HKV query heads share every K/V read. Included once per ISA
// (vec_avx2.cpp, vec_generic.cpp) with LOOM_ISA_NS naming the namespace; see vec8.h.
//
// Per key tile of kKT keys: pack K^T, S = Q K^T (6 x 16 register blocks), causal mask, online
// softmax in base 2 (Q is prescaled by scale * log2 e), O += P V (6 x 16 register blocks).
// No [LQ, L] score or mask matrix is ever materialized.
#include <cmath>
#include <limits>
#include <vector>

#include "vec8.h"
#include "vec_kernels.h"


namespace loom::LOOM_ISA_NS {

using namespace vec8;

namespace {

constexpr int kMR = 6;  // rows per register block
constexpr int kNR = 16;  // columns per register block (two v8)

// S[R, kKT] = Qp[R, D] @ Kp[D, kKT]; R a multiple of kMR.
void scores(const float* qp, const float* kp, int R, int D, float* s) {
  for (int r0 = 0; r0 < R; r0 += kMR)
    for (int c0 = 0; c0 < kKT; c0 += kNR) {
      v8 acc[kMR][2] = {};
      for (int d = 0; d < D; ++d) {
        const v8 b0 = load(kp + (size_t)d * kKT + c0), b1 = load(kp + (size_t)d * kKT + c0 + 8);
#pragma GCC unroll 6
        for (int i = 0; i < kMR; ++i) {
          const v8 a = splat(qp[(size_t)(r0 + i) * D + d]);
          acc[i][0] += a * b0;
          acc[i][1] += a * b1;
        }
      }
      for (int i = 0; i < kMR; ++i) {
        store(s + (size_t)(r0 + i) * kKT + c0, acc[i][0]);
        store(s + (size_t)(r0 + i) * kKT + c0 + 8, acc[i][1]);
      }
    }
}

// O[R, D] += P[R, kKT] @ V[kn, D] (rows of V through pointers); D a multiple of kNR.
void accumulate(const float* p, const float* const* vrows, int kn, int R, int D, float* o) {
  for (int r0 = 0; r0 < R; r0 += kMR)
    for (int c0 = 0; c0 < D; c0 += kNR) {
      v8 acc[kMR][2];
      for (int i = 0; i < kMR; ++i) {
        acc[i][0] = load(o + (size_t)(r0 + i) * D + c0);
        acc[i][1] = load(o + (size_t)(r0 + i) * D + c0 + 8);
      }
      for (int j = 0; j < kn; ++j) {
        const v8 b0 = load(vrows[j] + c0), b1 = load(vrows[j] + c0 + 8);
#pragma GCC unroll 6
        for (int i = 0; i < kMR; ++i) {
          const v8 a = splat(p[(size_t)(r0 + i) * kKT + j]);
          acc[i][0] += a * b0;
          acc[i][1] += a * b1;
        }
      }
      for (int i = 0; i < kMR; ++i) {
        store(o + (size_t)(r0 + i) * D + c0, acc[i][0]);
        store(o + (size_t)(r0 + i) * D + c0 + 8, acc[i][1]);
      }
    }
}

// Row r's scores of one key tile -> probabilities (in place), updating its running max m and sum l
// and rescaling its output row. Keys past `visible` (count of visible keys in the tile) are masked.
void softmax_row(float* s, int visible, float& m, float& l, float* o, int D) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int j = visible; j < kKT; ++j) s[j] = neg_inf;
  float tile_max = neg_inf;
  for (int j = 0; j < visible; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
  const float m_new = tile_max > m ? tile_max : m;
  v8 sum = {};
  for (int j = 0; j < kKT; j += 8) {
    const v8 pj = exp2_nonpos(load(s + j) - m_new);
    store(s + j, pj);
    sum += pj;
  }
  float tile_sum = 0.f;
  for (int i = 0; i < 8; ++i) tile_sum += sum[i];
  if (m_new != m) {  // rescale what was accumulated under the old max
    const float alpha = m == neg_inf ? 0.f : std::exp2(m - m_new);
    l *= alpha;
    for (int d = 0; d < D; ++d) o[d] *= alpha;
    m = m_new;
  }
  l += tile_sum;
}

struct Scratch {
  std::vector<float> qp, kp, s, o, m, l;
  std::vector<const float*> vrows;
  std::vector<int> pos;
};

}  // namespace

void attend_task(const AttnArgs& a, int b, int g, int q0, int q1) {
  thread_local Scratch w;
  const int rep = a.H / a.HKV, D = a.D, nq = q1 - q0, R = nq * rep, Rp = (R + kMR - 1) / kMR * kMR;
  w.qp.assign((size_t)Rp * D, 0.f);
  w.o.assign((size_t)Rp * D, 0.f);
  w.s.resize((size_t)Rp * kKT);
  w.kp.resize((size_t)D * kKT);
  w.vrows.resize(kKT);
  w.m.assign(Rp, -std::numeric_limits<float>::infinity());
  w.l.assign(Rp, 0.f);
  w.pos.resize(Rp);
  int pmax = 0;
  // Row r = (query q0 + r / rep, head g * rep + r % rep); padding rows copy the last row's position.
  const float qscale = a.scale * 1.4426950408889634f;
  for (int r = 0; r < Rp; ++r) {
    const int qi = q0 + (r < R ? r : R - 1) / rep;
    const int p = a.q_pos[(size_t)b * a.LQ + qi];
    w.pos[r] = p;
    pmax = p > pmax ? p : pmax;
    if (r >= R) continue;
    const float* q = a.q + (((size_t)b * a.LQ + qi) * a.H + (size_t)g * rep + r % rep) * D;
    for (int d = 0; d < D; ++d) w.qp[(size_t)r * D + d] = q[d] * qscale;
  }
  const int* table = a.tables + (size_t)b * a.MB;
  const size_t head = (size_t)g * a.NB * a.BS * D;
  const int keys = pmax + 1;
  for (int k0 = 0; k0 < keys; k0 += kKT) {
    const int kn = keys - k0 < kKT ? keys - k0 : kKT;
    for (int j = 0; j < kKT; ++j) {
      if (j >= kn) {
        for (int d = 0; d < D; ++d) w.kp[(size_t)d * kKT + j] = 0.f;
        continue;
      }
      const int key = k0 + j;
      const size_t off = head + ((size_t)table[key / a.BS] * a.BS + key % a.BS) * D;
      const float* k = a.k_pool + off;
      for (int d = 0; d < D; ++d) w.kp[(size_t)d * kKT + j] = k[d];
      w.vrows[j] = a.v_pool + off;
    }
    scores(w.qp.data(), w.kp.data(), Rp, D, w.s.data());
    for (int r = 0; r < Rp; ++r) {
      int visible = w.pos[r] - k0 + 1;
      visible = visible > kn ? kn : visible;
      if (visible <= 0) {  // nothing of this tile is visible to row r: it adds nothing
        for (int j = 0; j < kKT; ++j) w.s[(size_t)r * kKT + j] = 0.f;
        continue;
      }
      softmax_row(w.s.data() + (size_t)r * kKT, visible, w.m[r], w.l[r], w.o.data() + (size_t)r * D, D);
    }
    accumulate(w.s.data(), w.vrows.data(), kn, Rp, D, w.o.data());
  }
  for (int r = 0; r < R; ++r) {
    const int qi = q0 + r / rep;
    float* out = a.out + (((size_t)b * a.LQ + qi) * a.H + (size_t)g * rep + r % rep) * D;
    const float inv = 1.f / w.l[r];
    for (int d = 0; d < D; ++d) out[d] = w.o[(size_t)r * D + d] * inv;
  }
}

}  // namespace loom::LOOM_ISA_NS
