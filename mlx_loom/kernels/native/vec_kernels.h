// Kernels compiled once per ISA (vec_avx2.cpp, vec_generic.cpp; see vec8.h), free of MLX headers.
//
// Paged causal attention (attention_tile.h):
// q [B, LQ, H, D] float32, k_pool / v_pool [HKV, NB, BS, D] float32, tables [B, MB] int32,
// q_pos [B, LQ] int32; out [B, LQ, H, D]. Query (b, i) at position p attends to keys 0..p of row b,
// key j living at slot j % BS of page tables[b, j / BS]. D must be a multiple of 16.
#pragma once

namespace loom {

constexpr int kKT = 64;  // keys per tile

struct AttnArgs {
  const float* q;
  const float* k_pool;
  const float* v_pool;
  const int* tables;
  const int* q_pos;
  float* out;
  int B, LQ, H, HKV, D, NB, BS, MB;
  float scale;
};

// attend_task: row b, kv head g, queries [q0, q1) with all rep = H / HKV heads of g.
// silu_mul_span (activation_tile.h): out[i] = silu(gate[i]) * up[i] for i in [0, n).
namespace generic {
void attend_task(const AttnArgs& a, int b, int g, int q0, int q1);
void silu_mul_span(const float* gate, const float* up, float* out, long long n);
}  // namespace generic
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
void attend_task(const AttnArgs& a, int b, int g, int q0, int q1);
void silu_mul_span(const float* gate, const float* up, float* out, long long n);
}  // namespace avx2
#endif

}  // namespace loom
