// Kernels compiled once per ISA (vec_avx2.cpp, vec_generic.cpp; see vec8.h), free of MLX headers.
//
// Paged causal attention (attention_tile.h):
// q [B, LQ, H, D] float32, k_pool / v_pool [HKV, NB, BS, D] float32, tables [B, MB] int32,
// q_pos [B, LQ] int32; out [B, LQ, H, D]. Query (b, i) at position p attends to keys 0..p of row b,
// key j living at slot j % BS of page tables[b, j / BS]. D must be a multiple of 16.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace loom {

// Whether the avx2:: kernels below run here (x86-64 with AVX2 + FMA, MLX_LOOM_NATIVE_SCALAR unset):
// the one rule every primitive picks its vector kernel by.
inline bool use_vec_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  return !std::getenv("MLX_LOOM_NATIVE_SCALAR") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

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

// Sparse prefill tiles (mlx_loom/kernels/sparse_prefill.py's tile_attention, padded coordinates):
// q [Hs, NQ*64, D] (query tile t is absolute key tile base + t), k / v [HKV, NK*64, D] dense with
// `shift` front padding keys, kv [Hs] kv head per query head, blocks / block_ok [Hs, NQ, NB] the key
// tiles of each query tile, columns [Hs, NC] single keys shared by the head's tiles (used by tiles
// after theirs, unless inside one of the tile's blocks); out [Hs, NQ*64, D].
constexpr int kTile = 64;

struct SparseArgs {
  const float* q;
  const float* k;
  const float* v;
  const int* kv;
  const int* blocks;
  const uint8_t* block_ok;
  const int* columns;
  float* out;
  int Hs, NQ, NK, NB, NC, D, shift, base;
  float scale;
};

// The vertical-slash estimate (sparse_prefill.py's vertical_slash_index): q [Hs, 64, D] the last
// query tile (query row r at padded position (NK - 1) * 64 + r; rows below first_row are padding),
// k [HKV, NK*64, D], kv [Hs]; out [Hs, 64, NK*64] causal softmax over keys >= shift (padding rows 0).
struct ProbsArgs {
  const float* q;
  const float* k;
  const int* kv;
  float* out;
  int Hs, NK, D, shift, first_row;
  float scale;
};

// inverse_cdf_row (sample_tile.h): a token id in [0, V) drawn by inverse CDF at u in [0, 1) from
// p = 2^((x - max x) * scale) with p < min_p zeroed; p (V floats) and block_sums
// (ceil(V / kSampleBlock) floats) are scratch. Never an index whose p is 0 while some p > 0.
constexpr int kSampleBlock = 256;

// attend_task: row b, kv head g, queries [q0, q1) with all rep = H / HKV heads of g.
// silu_mul_span (activation_tile.h): out[i] = silu(gate[i]) * up[i] for i in [0, n).
namespace generic {
void attend_task(const AttnArgs& a, int b, int g, int q0, int q1);
void sparse_task(const SparseArgs& a, int h, int t);
void probs_task(const ProbsArgs& a, int h);
void silu_mul_span(const float* gate, const float* up, float* out, long long n);
int inverse_cdf_row(const float* x, int V, float scale, float min_p, float u, float* p, float* block_sums);
}  // namespace generic
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
void attend_task(const AttnArgs& a, int b, int g, int q0, int q1);
void sparse_task(const SparseArgs& a, int h, int t);
void probs_task(const ProbsArgs& a, int h);
void silu_mul_span(const float* gate, const float* up, float* out, long long n);
int inverse_cdf_row(const float* x, int V, float scale, float min_p, float u, float* p, float* block_sums);
}  // namespace avx2
#endif

}  // namespace loom
