// Affine-quantized matmul kernels (MLX layout), free of MLX headers so each ISA file can be
// compiled on its own (and cross-compiled for checks).
//
//   out[m, n] = sum_k x[m, k] * (scales[n, k / gs] * q[n, k] + biases[n, k / gs])
//
// w is uint32 [N, K * bits / 32], values packed low bits first (element k of a row is bits
// (k % per) * bits .. of word k / per, per = 32 / bits); scales / biases float32 [N, K / gs].
//
// Two loop shapes, picked by M:
//   - direct (M <= kDirectMaxM, AVX-512: kDirectMaxMAvx512): each row of w is unpacked in registers
//     and dotted with up to 4 (8) rows of x; the scale is applied once per group and the bias term is sum_g b[n,g] * xsum[m,g]
//     (xsum precomputed per call). Memory-bound matrix-vector product (decode). The AVX-512
//     4-bit variant reads x in an interleaved order (xi, also precomputed per call).
//   - tiled (M above that): a tile of kTileN rows of w is dequantized (s * q + b) into a
//     per-thread float buffer in L1, then a register-blocked float micro-kernel runs over all
//     rows of x. The dequantization is paid once per weight per call, whatever M is. The
//     AVX-512 variant dequantizes panels of kPanelN rows k-major instead (qmm_avx512_panel.cpp).
#pragma once

#include <cstdint>

namespace loom {

constexpr int kDirectMaxM = 4;
constexpr int kDirectMaxMAvx512 = 8;  // 32 vector registers hold 8 rows' sums (batched decode)
constexpr int kTileN = 4;
constexpr int kPanelN = 32;    // rows of w per AVX-512 panel
constexpr int kChunkK = 512;   // values of k per AVX-512 panel

// Floats of per-thread scratch the kernels need for inner size K.
inline long long scratch_floats(int K) {
  const long long tile = (long long)kTileN * K, panel = (long long)kPanelN * kChunkK;
  return tile > panel ? tile : panel;
}

struct QmmArgs {
  const float* x;        // [M, K], row stride ldx
  long long ldx;
  const uint32_t* w;     // [N, K * bits / 32]
  const float* scales;   // [N, K / group_size]
  const float* biases;   // [N, K / group_size]
  const float* xsum;     // [M, K / group_size]: per-group sums of x (direct path only)
  const float* xi;       // [M, interleaved_stride(K)]: x interleaved (AVX-512 4-bit direct path only)
  float* out;            // [M, N]
  int M, N, K, group_size, bits;
};

// Each computes out[:, n0:n1]; scratch holds scratch_floats(K) floats (tiled path).
void qmm_rows_scalar(const QmmArgs& a, int n0, int n1, float* scratch);
#if defined(__x86_64__) || defined(_M_X64)
void qmm_rows_avx2(const QmmArgs& a, int n0, int n1, float* scratch);
void qmm_rows_avx512(const QmmArgs& a, int n0, int n1, float* scratch);
void qmm_panels_avx512(const QmmArgs& a, int n0, int n1, float* scratch);
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
void qmm_rows_neon(const QmmArgs& a, int n0, int n1, float* scratch);
#endif

// Per-group sums of x: xsum[m, g] = sum of x[m, g*gs : (g+1)*gs].
void group_sums(const QmmArgs& a, float* xsum);

// x in the order the AVX-512 4-bit kernel reads it: per run of 128 values (16 packed words),
// xi[m, 128c + 16i + j] = x[m, 128c + 8j + i] (nibble i of word j), zeros past K.
inline long long interleaved_stride(int K) {
  return (K + 127LL) / 128 * 128;
}
void interleave_x(const QmmArgs& a, float* xi);

}  // namespace loom
