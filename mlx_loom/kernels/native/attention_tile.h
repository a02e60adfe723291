// Tiled (flash-style) attention for one task over a list of keys: dense paged prefill/decode (one row
// b, one kv head g and a tile of queries, whose rep = H / HKV query heads share every K/V read) and
// the sparse prefill tiles (one head, one 64-query tile, its selected key tiles and columns). Included once per ISA
// (vec_avx2.cpp, vec_generic.cpp) with LOOM_ISA_NS naming the namespace; see vec8.h.
//
// Per key tile of kKT keys: pack K^T, S = Q K^T (6 x 16 register blocks), causal mask, online
// softmax in base 2 (Q is prescaled by scale * log2 e), O += P V (6 x 16 register blocks).
// No [LQ, L] score or mask matrix is ever materialized.
#include <cmath>
#include <cstring>
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
// and rescaling its output row. Keys at positions past the row's (kpos[j] > pos) are masked;
// unused slots carry INT_MAX. A row that sees nothing of the tile leaves its state alone.
void softmax_row(float* s, const int* kpos, int tile_max_pos, int pos, float& m, float& l, float* o, int D) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (tile_max_pos > pos)
    for (int j = 0; j < kKT; ++j) s[j] = kpos[j] > pos ? neg_inf : s[j];
  float tile_max = neg_inf;
  for (int j = 0; j < kKT; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
  if (tile_max == neg_inf) {
    for (int j = 0; j < kKT; ++j) s[j] = 0.f;
    return;
  }
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

// One task's state: Rp query rows (a multiple of kMR) prescaled by scale * log2(e), their
// positions, and the keys they attend to (rows of K and V by pointer, with positions).
struct Scratch {
  std::vector<float> qp, kp, s, o, m, l;
  std::vector<int> pos, key_pos;
  std::vector<const float*> key_k, key_v;

  void reset(int Rp, int D) {
    qp.assign((size_t)Rp * D, 0.f);
    o.assign((size_t)Rp * D, 0.f);
    s.resize((size_t)Rp * kKT);
    kp.resize((size_t)D * kKT);
    m.assign(Rp, -std::numeric_limits<float>::infinity());
    l.assign(Rp, 0.f);
    pos.resize(Rp);
    key_pos.clear();
    key_k.clear();
    key_v.clear();
  }
  void add_key(const float* k, const float* v, int p) {
    key_k.push_back(k);
    key_v.push_back(v);
    key_pos.push_back(p);
  }
};

// Online softmax attention of w's rows over w's key list, kKT keys at a time; O / l stay in w.
void attend_keys(Scratch& w, int Rp, int D) {
  const int n = static_cast<int>(w.key_pos.size());
  int kpos[kKT];
  const float* vrows[kKT];
  for (int k0 = 0; k0 < n; k0 += kKT) {
    const int kn = n - k0 < kKT ? n - k0 : kKT;
    int tile_max_pos = 0;
    for (int j = 0; j < kKT; ++j) {
      if (j >= kn) {
        for (int d = 0; d < D; ++d) w.kp[(size_t)d * kKT + j] = 0.f;
        kpos[j] = std::numeric_limits<int>::max();
        continue;
      }
      const float* k = w.key_k[k0 + j];
      for (int d = 0; d < D; ++d) w.kp[(size_t)d * kKT + j] = k[d];
      vrows[j] = w.key_v[k0 + j];
      kpos[j] = w.key_pos[k0 + j];
    }
    for (int j = 0; j < kKT; ++j) tile_max_pos = kpos[j] > tile_max_pos ? kpos[j] : tile_max_pos;
    scores(w.qp.data(), w.kp.data(), Rp, D, w.s.data());
    for (int r = 0; r < Rp; ++r)
      softmax_row(w.s.data() + (size_t)r * kKT, kpos, tile_max_pos, w.pos[r], w.m[r], w.l[r],
                  w.o.data() + (size_t)r * D, D);
    accumulate(w.s.data(), vrows, kn, Rp, D, w.o.data());
  }
}

// Row r of w's output, normalized (0 for a row that saw no key).
void write_row(const Scratch& w, int r, int D, float* out) {
  const float inv = w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
  for (int d = 0; d < D; ++d) out[d] = w.o[(size_t)r * D + d] * inv;
}

}  // namespace

void attend_task(const AttnArgs& a, int b, int g, int q0, int q1) {
  thread_local Scratch w;
  const int rep = a.H / a.HKV, D = a.D, nq = q1 - q0, R = nq * rep, Rp = (R + kMR - 1) / kMR * kMR;
  w.reset(Rp, D);
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
  for (int key = 0; key <= pmax; ++key) {
    const size_t off = head + ((size_t)table[key / a.BS] * a.BS + key % a.BS) * D;
    w.add_key(a.k_pool + off, a.v_pool + off, key);
  }
  attend_keys(w, Rp, D);
  for (int r = 0; r < R; ++r)
    write_row(w, r, D, a.out + (((size_t)b * a.LQ + q0 + r / rep) * a.H + (size_t)g * rep + r % rep) * D);
}

// Query tile t of head h (sparse prefill): its selected key tiles and its shared columns.
void sparse_task(const SparseArgs& a, int h, int t) {
  thread_local Scratch w;
  const int D = a.D, Rp = (kTile + kMR - 1) / kMR * kMR, qtile = a.base + t;
  w.reset(Rp, D);
  const float qscale = a.scale * 1.4426950408889634f;
  for (int r = 0; r < Rp; ++r) {
    const int i = r < kTile ? r : kTile - 1;
    w.pos[r] = qtile * kTile + i;  // padded coordinates, like the keys
    if (r >= kTile) continue;
    const float* q = a.q + ((size_t)h * a.NQ * kTile + (size_t)t * kTile + i) * D;
    for (int d = 0; d < D; ++d) w.qp[(size_t)r * D + d] = q[d] * qscale;
  }
  const size_t head = (size_t)a.kv[h] * a.NK * kTile * D;
  const int* blocks = a.blocks + ((size_t)h * a.NQ + t) * a.NB;
  const uint8_t* ok = a.block_ok + ((size_t)h * a.NQ + t) * a.NB;
  for (int nb = 0; nb < a.NB; ++nb) {
    if (!ok[nb]) continue;
    for (int j = 0; j < kTile; ++j) {
      const int key = blocks[nb] * kTile + j;
      if (key < a.shift || blocks[nb] >= a.NK) continue;  // front padding (and never past the keys)
      w.add_key(a.k + head + (size_t)key * D, a.v + head + (size_t)key * D, key);
    }
  }
  for (int c = 0; c < a.NC; ++c) {
    const int col = a.columns[(size_t)h * a.NC + c], ctile = col / kTile;
    bool inside = false;
    for (int nb = 0; nb < a.NB && !inside; ++nb) inside = ok[nb] && blocks[nb] == ctile;
    if (col < a.shift || ctile >= qtile || inside) continue;  // only earlier tiles not already in a block
    w.add_key(a.k + head + (size_t)col * D, a.v + head + (size_t)col * D, col);
  }
  attend_keys(w, Rp, D);
  for (int r = 0; r < kTile; ++r) write_row(w, r, D, a.out + ((size_t)h * a.NQ * kTile + (size_t)t * kTile + r) * D);
}

// Head h's attention probabilities of the last query tile over every key (the vertical-slash
// index estimate): scores in 64-key tiles, then each row masked, exponentiated and normalized.
void probs_task(const ProbsArgs& a, int h) {
  thread_local Scratch w;
  const int D = a.D, Rp = (kTile + kMR - 1) / kMR * kMR, L = a.NK * kTile, qbase = (a.NK - 1) * kTile;
  w.reset(Rp, D);
  const float qscale = a.scale * 1.4426950408889634f;
  for (int r = 0; r < kTile; ++r) {
    const float* q = a.q + ((size_t)h * kTile + r) * D;
    for (int d = 0; d < D; ++d) w.qp[(size_t)r * D + d] = q[d] * qscale;
  }
  const float* k = a.k + (size_t)a.kv[h] * L * D;
  float* out = a.out + (size_t)h * kTile * L;
  for (int k0 = 0; k0 < L; k0 += kTile) {
    for (int j = 0; j < kTile; ++j)
      for (int d = 0; d < D; ++d) w.kp[(size_t)d * kKT + j] = k[(size_t)(k0 + j) * D + d];
    scores(w.qp.data(), w.kp.data(), Rp, D, w.s.data());
    for (int r = 0; r < kTile; ++r) std::memcpy(out + (size_t)r * L + k0, w.s.data() + (size_t)r * kKT, sizeof(float) * kKT);
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < kTile; ++r) {
    float* p = out + (size_t)r * L;
    const int hi = qbase + r;  // keys [shift, hi] are visible
    if (r < a.first_row || hi < a.shift) {
      std::memset(p, 0, sizeof(float) * L);
      continue;
    }
    for (int j = 0; j < a.shift; ++j) p[j] = neg_inf;
    for (int j = hi + 1; j < L; ++j) p[j] = neg_inf;
    float m = neg_inf;
    for (int j = a.shift; j <= hi; ++j) m = p[j] > m ? p[j] : m;
    v8 sum = {};
    for (int j = 0; j < L; j += 8) {
      const v8 e = exp2_nonpos(load(p + j) - m);
      store(p + j, e);
      sum += e;
    }
    float total = 0.f;
    for (int i = 0; i < 8; ++i) total += sum[i];
    const v8 inv = splat(1.f / total);
    for (int j = 0; j < L; j += 8) store(p + j, load(p + j) * inv);
  }
}

}  // namespace loom::LOOM_ISA_NS
