/* Portable SIMD for the kernels: GCC/Clang vector types, VL floats wide, lowered by the compiler to the
 * ISA the build targets (AVX-512: 16, AVX2: 8, NEON or SSE: 4), and the few operations the compiler does
 * not lower well, per ISA. Loads and stores are unaligned. */
#ifndef AIGC_KERNELS_SIMD_H
#define AIGC_KERNELS_SIMD_H

#include "common.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX2__)
#define VL 8
#else
#define VL 4
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

#define INLINE static inline __attribute__((always_inline))

INLINE vf vset1(float a) { return (vf){0} + a; }
INLINE vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* VL bf16 at p -> fp32 (exact) */
INLINE vf vload_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* VL fp32 -> bf16 at p, round to nearest even, NaN stays NaN (as float_to_bf16) */
INLINE void vstore_bf16(uint16_t *p, vf v) {
    const vu u = (vu)v;
    const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);
    const vh h = __builtin_convertvector((nan & ((u >> 16) | 0x40u)) | (~nan & rounded), vh);
    memcpy(p, &h, sizeof h);
}

/* v as bf16 holds it */
INLINE vf vround_bf16(vf v) {
    const vu u = (vu)v;
    const vu rounded = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;
    const vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return (vf)((nan & ((u & 0xFFFF0000u) | 0x400000u)) | (~nan & rounded));
}

INLINE vf vload_act(const void *p, size_t i, int act) {
    return act == ACT_BF16 ? vload_bf16((const uint16_t *)p + i) : vload((const float *)p + i);
}

INLINE void vstore_act(void *p, size_t i, vf v, int act) {
    if (act == ACT_BF16)
        vstore_bf16((uint16_t *)p + i, v);
    else
        vstore((float *)p + i, v);
}

INLINE vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
INLINE vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
INLINE vf vabs(vf a) { return (vf)((vu)a & 0x7FFFFFFFu); }

INLINE float vsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* e^x for x <= 0, relative error ~2e-7: 2^n * p(r), r = x - n ln2 */
INLINE vf vexp_neg(vf x) {
    x = vmax(x, vset1(-87.0f));
    const vf big = vset1(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + big) - big;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vset1(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r) * r + (r + 1.0f);
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n, n >= -126 */
    return p * (vf)e;
}

/* an IEEE half (block scale) -> float */
INLINE float half_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__ARM_NEON)
    __fp16 x;
    memcpy(&x, &h, 2);
    return (float)x;
#else
    return half_to_float(h);
#endif
}

/* Dequantize one GGML block of 32 weights into out[0..32) (fp32, exact): the widening of bytes is the one
 * place where the generic vector types compile badly, so each ISA spells it out. */

/* 4-bit: 16 bytes of nibbles (low nibbles are weights 0..15, high 16..31), w = d q + m */
INLINE void dequant_q4(const uint8_t *q, float d, float m, float *out) {
#if defined(__AVX512F__)
    const __m128i v = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(0x0F);
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, mv));
    _mm512_storeu_ps(out + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, mv));
#elif defined(__AVX2__)
    const __m128i v = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(0x0F);
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, mv));
    _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, mv));
    _mm256_storeu_ps(out + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, mv));
    _mm256_storeu_ps(out + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, mv));
#elif defined(__ARM_NEON)
    const uint8x16_t v = vld1q_u8(q);
    const uint8x16_t half[2] = {vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8(v, 4)};
    const float32x4_t dv = vdupq_n_f32(d), mv = vdupq_n_f32(m);
    for (int h = 0; h < 2; h++) {
        const uint16x8_t a = vmovl_u8(vget_low_u8(half[h])), b = vmovl_u8(vget_high_u8(half[h]));
        float *o = out + 16 * h;
        vst1q_f32(o, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_low_u16(a))), dv));
        vst1q_f32(o + 4, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_high_u16(a))), dv));
        vst1q_f32(o + 8, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_low_u16(b))), dv));
        vst1q_f32(o + 12, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_high_u16(b))), dv));
    }
#else
    for (int j = 0; j < 16; j++) {
        out[j] = (float)(q[j] & 0x0F) * d + m;
        out[16 + j] = (float)(q[j] >> 4) * d + m;
    }
#endif
}

/* 8-bit: 32 int8, w = d q */
INLINE void dequant_q8(const uint8_t *q, float d, float *out) {
#if defined(__AVX512F__)
    const __m512 dv = _mm512_set1_ps(d);
    for (int j = 0; j < 32; j += 16)
        _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                    _mm_loadu_si128((const __m128i *)(q + j)))), dv));
#elif defined(__AVX2__)
    const __m256 dv = _mm256_set1_ps(d);
    for (int j = 0; j < 32; j += 8)
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                    _mm_loadl_epi64((const __m128i *)(q + j)))), dv));
#elif defined(__ARM_NEON)
    const float32x4_t dv = vdupq_n_f32(d);
    for (int j = 0; j < 32; j += 8) {
        const int16x8_t a = vmovl_s8(vld1_s8((const int8_t *)q + j));
        vst1q_f32(out + j, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(a))), dv));
        vst1q_f32(out + j + 4, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(a))), dv));
    }
#else
    for (int j = 0; j < 32; j++) out[j] = (float)(int8_t)q[j] * d;
#endif
}

#endif
