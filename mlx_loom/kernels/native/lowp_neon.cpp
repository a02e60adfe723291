// AArch64 NEON low-precision kernels (NEON is baseline there).
//   f16: vcvt_f32_f16 of 4 halves. bf16: widen with a left shift of 16 (vshll_n_u16).
//   fp4: a group's bytes split into low / high nibbles, looked up (vqtbl1q_s8) as 2x the e2m1
//        value (small integers), interleaved back into k order, widened to float; the 0.5 goes
//        into the group's scale.
#include <arm_neon.h>

#include "lowp_kernels.h"

namespace loom {
namespace {

template <int FMT>
inline float32x4_t load4(const uint16_t* p) {
  const uint16x4_t h = vld1_u16(p);
  if constexpr (FMT == kF16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
  return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

template <int FMT>
inline float load1(uint16_t h) {
  return FMT == kF16 ? f16_to_float(h) : bf16_to_float(h);
}

template <int FMT, int MB>
void direct_half(const LowpArgs& a, int n0, int n1) {
  const int K = a.K;
  for (int n = n0; n < n1; ++n) {
    const uint16_t* wr = static_cast<const uint16_t*>(a.w) + (long long)n * K;
    float32x4_t acc0[MB], acc1[MB];
    for (int mb = 0; mb < MB; ++mb) acc0[mb] = acc1[mb] = vdupq_n_f32(0.f);
    int k = 0;
    for (; k + 8 <= K; k += 8) {
      const float32x4_t w0 = load4<FMT>(wr + k), w1 = load4<FMT>(wr + k + 4);
      for (int mb = 0; mb < MB; ++mb) {
        const float* xr = a.x + mb * a.ldx + k;
        acc0[mb] = vfmaq_f32(acc0[mb], w0, vld1q_f32(xr));
        acc1[mb] = vfmaq_f32(acc1[mb], w1, vld1q_f32(xr + 4));
      }
    }
    for (int mb = 0; mb < MB; ++mb) {
      float s = vaddvq_f32(vaddq_f32(acc0[mb], acc1[mb]));
      for (int kk = k; kk < K; ++kk) s += load1<FMT>(wr[kk]) * a.x[mb * a.ldx + kk];
      a.out[mb * a.ldo + n] = s;
    }
  }
}

// 16 values (8 bytes) starting at byte p, as 2 x e2m1, widened to 4 float vectors in k order.
inline void fp4x16(const uint8_t* p, int8x16_t table, float32x4_t out[4]) {
  const uint8x8_t b = vld1_u8(p);
  const uint8x16_t nib = vcombine_u8(vand_u8(b, vdup_n_u8(0xF)), vshr_n_u8(b, 4));  // lows, highs
  const int8x16_t v = vqtbl1q_s8(table, nib);
  const int8x8x2_t z = vzip_s8(vget_low_s8(v), vget_high_s8(v));  // k order: low, high per byte
  const int16x8_t lo = vmovl_s8(z.val[0]), hi = vmovl_s8(z.val[1]);
  out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  out[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
  out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  out[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

template <int MB>
void direct_fp4(const LowpArgs& a, int n0, int n1) {
  const int gs = a.group_size, G = a.K / gs;
  const int8_t twice[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  const int8x16_t table = vld1q_s8(twice);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = reinterpret_cast<const uint8_t*>(static_cast<const uint32_t*>(a.w) + (long long)n * (a.K / 8));
    const uint8_t* sr = a.scales + (long long)n * G;
    float32x4_t acc[MB];
    for (int mb = 0; mb < MB; ++mb) acc[mb] = vdupq_n_f32(0.f);
    for (int g = 0; g < G; ++g) {
      float32x4_t t[MB];
      for (int mb = 0; mb < MB; ++mb) t[mb] = vdupq_n_f32(0.f);
      for (int c = 0; c < gs; c += 16) {
        float32x4_t q[4];
        fp4x16(wr + (g * gs + c) / 2, table, q);
        for (int mb = 0; mb < MB; ++mb) {
          const float* xr = a.x + mb * a.ldx + g * gs + c;
          for (int j = 0; j < 4; ++j) t[mb] = vfmaq_f32(t[mb], q[j], vld1q_f32(xr + 4 * j));
        }
      }
      const float32x4_t s = vdupq_n_f32(0.5f * a.scale_lut[sr[g]]);
      for (int mb = 0; mb < MB; ++mb) acc[mb] = vfmaq_f32(acc[mb], t[mb], s);
    }
    for (int mb = 0; mb < MB; ++mb) a.out[mb * a.ldo + n] = vaddvq_f32(acc[mb]);
  }
}

template <int MB>
void direct(const LowpArgs& a, int n0, int n1) {
  switch (a.format) {
    case kF16: return direct_half<kF16, MB>(a, n0, n1);
    case kBF16: return direct_half<kBF16, MB>(a, n0, n1);
    default: return direct_fp4<MB>(a, n0, n1);
  }
}

}  // namespace

void lowp_rows_neon(const LowpArgs& a, int n0, int n1) {
  static_assert(kLowpMaxM == 4, "direct<> is instantiated for M = 1..4");
  switch (a.M) {
    case 1: return direct<1>(a, n0, n1);
    case 2: return direct<2>(a, n0, n1);
    case 3: return direct<3>(a, n0, n1);
    default: return direct<4>(a, n0, n1);
  }
}

}  // namespace loom
