/* y = x W^T for GGUF weights kept as stored (every kind of common.h: Q4_0, Q4_1, Q8_0, the 5-bit kinds, the K-quants,
 * IQ4, F16, BF16), for small batches of rows (decode steps), in the SIMD builds; fp32 or bf16 activations.
 *
 * Each thread takes weight rows in turn: it dequantizes the row into an fp32 buffer in L1 (w = d q + m,
 * exactly the float32 weights GGUF readers produce) and takes its dot products with every activation
 * row (fp32 FMAs; bf16 activations are widened once per call). The weights stream from memory once per
 * call, at about their stored size. This is the exact mode (k_qmatmul in common.h); the int8 mode goes to
 * qmatmul_i8.c where the build has integer dot products (AIGC_ERR_UNSUPPORTED elsewhere), and the AVX512-BF16
 * build sends bf16 activations of the quantized kinds to its own kernel (qmatmul_avx512bf16.c).
 */
#include <stdlib.h>

#include "simd.h"

#define PREFETCH_ROWS 4
#define BLOCK 32

/* one weight row of nb blocks -> wf (nb * 32 floats) */
static void dequantize_row(const uint8_t *qs, const uint16_t *d, const uint16_t *m, int nb, float *wf) {
    if (m)
        for (int b = 0; b < nb; b++) dequant_q4(qs + (size_t)b * 16, half_f32(d[b]), half_f32(m[b]), wf + b * 32);
    else
        for (int b = 0; b < nb; b++) dequant_q8(qs + (size_t)b * 32, half_f32(d[b]), wf + b * 32);
}

/* MT activation rows (row stride K) . w -> sums[0..MT). Every row sums its products in the same order
 * whatever MT is (two accumulators, even and odd vectors, then the lanes), so a row's result does not
 * depend on the batch it came in. */
INLINE void dot_rows(const float *w, const float *x, int K, float *sums, const int MT) {
    vf acc[MT][2];
    for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = vset1(0.0f);
    for (int k = 0; k < K; k += 2 * VL) { /* K is a multiple of 32 >= 2 VL */
        const vf w0 = vload(w + k), w1 = vload(w + k + VL);
        for (int i = 0; i < MT; i++) {
            acc[i][0] += w0 * vload(x + (size_t)i * K + k);
            acc[i][1] += w1 * vload(x + (size_t)i * K + k + VL);
        }
    }
    for (int i = 0; i < MT; i++) sums[i] = vsum(acc[i][0] + acc[i][1]);
}

static void dequantize_row_kind(int kind, const uint8_t *qs, const void *d, const void *m, int K, float *wf);

/* VL float weights (QKIND_F16 or QKIND_BF16) at h, as fp32 (exact) */
INLINE vf vload_float_weight(int kind, const uint16_t *h) {
#if defined(__AVX512F__)
    const __m256i v = _mm256_loadu_si256((const __m256i *)h);
    return (vf)(kind == QKIND_F16 ? _mm512_cvtph_ps(v)
                                  : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
#elif defined(__AVX2__)
    const __m128i v = _mm_loadu_si128((const __m128i *)h);
    return (vf)(kind == QKIND_F16 ? _mm256_cvtph_ps(v)
                                  : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
#elif defined(__ARM_NEON)
    return (vf)(kind == QKIND_F16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)))
                                  : vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h), 16)));
#else
    vf w;
    for (int j = 0; j < VL; j++) w[j] = kind == QKIND_F16 ? half_f32(h[j]) : bf16_to_float(h[j]);
    return w;
#endif
}

/* dot_rows with the float weights read as stored (each widened where it is used): the same products in the same
 * order as dot_rows of the widened row, without writing it out (for a call of at most one tile of x rows) */
INLINE void dot_rows_float(int kind, const uint16_t *h, const float *x, int K, float *sums, const int MT) {
    vf acc[MT][2];
    for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = vset1(0.0f);
    for (int k = 0; k < K; k += 2 * VL) {
        const vf w0 = vload_float_weight(kind, h + k), w1 = vload_float_weight(kind, h + k + VL);
        for (int i = 0; i < MT; i++) {
            acc[i][0] += w0 * vload(x + (size_t)i * K + k);
            acc[i][1] += w1 * vload(x + (size_t)i * K + k + VL);
        }
    }
    for (int i = 0; i < MT; i++) sums[i] = vsum(acc[i][0] + acc[i][1]);
}

/* The exact mode of every kind: y (M, N) = x W^T (+ bias), each weight row dequantized to fp32 once (one OpenMP
 * thread a row) and dotted with every activation row (bf16 activations widened to fp32 first). A weight row is
 * row_bytes of qs, d_bytes of d and m_bytes of m. */
static int exact_rows(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m,
                      const float *bias, void *y, int M, int N, int K, size_t row_bytes, size_t d_bytes,
                      size_t m_bytes, int nthreads) {
    const float *xf = x;
    float *widened = NULL;
    if (act == ACT_BF16) { /* (M, K) fp32 copy of the activations */
        widened = malloc((size_t)M * K * sizeof(float));
        if (!widened) return AIGC_ERR_NOMEM;
        for (size_t i = 0; i < (size_t)M * K; i++) widened[i] = bf16_to_float(((const uint16_t *)x)[i]);
        xf = widened;
    }
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *wf = malloc((size_t)K * sizeof(float));
        if (!wf) bad = 1;
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (!wf) continue;
            if (n + PREFETCH_ROWS < N) { /* a later row's stream, ahead of the hardware prefetcher */
                const uint8_t *ahead = qs + (size_t)(n + PREFETCH_ROWS) * row_bytes;
                for (size_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(ahead + c);
            }
            const uint8_t *qn = qs + (size_t)n * row_bytes, *dn = (const uint8_t *)d + (size_t)n * d_bytes;
            const uint8_t *mn = m ? (const uint8_t *)m + (size_t)n * m_bytes : NULL;
            const float bn = bias ? bias[n] : 0.0f;
            float sums[4];
            if (qkind_float(kind) && M <= 4) { /* one tile of x: the weights as stored, no widened copy */
                const uint16_t *h = (const uint16_t *)qn;
                switch (M) {
                case 4: dot_rows_float(kind, h, xf, K, sums, 4); break;
                case 3: /* (as the tiles below: 2 rows, then 1) */
                    dot_rows_float(kind, h, xf, K, sums, 2);
                    dot_rows_float(kind, h, xf + 2 * (size_t)K, K, sums + 2, 1);
                    break;
                case 2: dot_rows_float(kind, h, xf, K, sums, 2); break;
                default: dot_rows_float(kind, h, xf, K, sums, 1); break;
                }
                for (int i = 0; i < M; i++) store_act(y, (size_t)i * N + n, sums[i] + bn, act);
                continue;
            }
            if (kind == QKIND_Q4 || kind == QKIND_Q8)
                dequantize_row(qn, (const uint16_t *)dn, (const uint16_t *)mn, K / BLOCK, wf);
            else
                dequantize_row_kind(kind, qn, dn, mn, K, wf);
            for (int r0 = 0; r0 < M;) {
                const int left = M - r0, mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                const float *xr = xf + (size_t)r0 * K;
                switch (mt) {
                case 4: dot_rows(wf, xr, K, sums, 4); break;
                case 2: dot_rows(wf, xr, K, sums, 2); break;
                default: dot_rows(wf, xr, K, sums, 1); break;
                }
                for (int i = 0; i < mt; i++) store_act(y, (size_t)(r0 + i) * N + n, sums[i] + bn, act);
                r0 += mt;
            }
        }
        free(wf);
    }
    free(widened);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}

int k_qmatmul(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
              void *y, int M, int N, int K, int i8, int nthreads) {
    if (K % BLOCK || M <= 0 || N <= 0) return AIGC_ERR_ARGS;
#if defined(__AVX512BF16__)
    if (act == ACT_BF16 && !(i8 & AIGC_INT8))
        return qmatmul_avx512bf16(x, qs, d, m, bias, y, M, N, K, i8 & AIGC_EVERY_BATCH, nthreads);
#endif
#if defined(QMATMUL_I8)
    if (i8 & AIGC_INT8) return qmatmul_i8(x, act, m ? QKIND_Q4 : QKIND_Q8, qs, d, m, bias, y, M, N, K, i8 & AIGC_INT16,
                                        nthreads);
#endif
    if (i8 & AIGC_INT8) return AIGC_ERR_UNSUPPORTED; /* no integer dot products in this build */
    const size_t nb = (size_t)(K / BLOCK);
    return exact_rows(x, act, m ? QKIND_Q4 : QKIND_Q8, qs, d, m, bias, y, M, N, K, nb * (m ? 16 : 32), nb * 2,
                      nb * 2, nthreads);
}

/* ---- the K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256 weights) and the 5-bit blocks of 32 (Q5_0, Q5_1), exact
 * mode; layouts in common.h (k_qmatmul_kind) */

/* 32 Q6_K weights (24 bytes: 16 of low nibbles in the 4-bit order, 8 of high bit pairs) with the scales s0 of
 * weights 0..15 and s1 of 16..31: w = s (q - 32), exact */
INLINE void dequant_q6(const uint8_t *q, float s0, float s1, float *out) {
#if defined(__AVX2__)
    const __m128i v = _mm_loadu_si128((const __m128i *)q), h = _mm_loadl_epi64((const __m128i *)(q + 16));
    const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03), off = _mm_set1_epi8(32);
    /* high pairs of weights 0..15 (bits 0-1 and 2-3 of the 8 bytes) and 16..31 (bits 4-5 and 6-7) */
    const __m128i ha = _mm_and_si128(_mm_unpacklo_epi64(h, _mm_srli_epi16(h, 2)), m2);
    const __m128i hb = _mm_and_si128(_mm_unpacklo_epi64(_mm_srli_epi16(h, 4), _mm_srli_epi16(h, 6)), m2);
    const __m128i qa = _mm_sub_epi8(_mm_or_si128(_mm_and_si128(v, m4), _mm_slli_epi16(ha, 4)), off);
    const __m128i qb = _mm_sub_epi8(_mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_slli_epi16(hb, 4)), off);
#if defined(__AVX512F__)
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(qa)), _mm512_set1_ps(s0)));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(qb)), _mm512_set1_ps(s1)));
#else
    const __m256 a = _mm256_set1_ps(s0), b = _mm256_set1_ps(s1);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qa)), a));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qa, 8))), a));
    _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qb)), b));
    _mm256_storeu_ps(out + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qb, 8))), b));
#endif
#elif defined(__ARM_NEON)
    const uint8x16_t v = vld1q_u8(q);
    const uint8x8_t h = vld1_u8(q + 16), m2 = vdup_n_u8(0x03);
    const uint8x16_t ha = vcombine_u8(vand_u8(h, m2), vand_u8(vshr_n_u8(h, 2), m2));
    const uint8x16_t hb = vcombine_u8(vand_u8(vshr_n_u8(h, 4), m2), vshr_n_u8(h, 6));
    const int8x16_t half[2] = {
        vreinterpretq_s8_u8(vsubq_u8(vorrq_u8(vandq_u8(v, vdupq_n_u8(0x0F)), vshlq_n_u8(ha, 4)), vdupq_n_u8(32))),
        vreinterpretq_s8_u8(vsubq_u8(vorrq_u8(vshrq_n_u8(v, 4), vshlq_n_u8(hb, 4)), vdupq_n_u8(32)))};
    for (int k = 0; k < 2; k++) {
        const float32x4_t s = vdupq_n_f32(k ? s1 : s0);
        const int16x8_t a = vmovl_s8(vget_low_s8(half[k])), b = vmovl_s8(vget_high_s8(half[k]));
        float *o = out + 16 * k;
        vst1q_f32(o, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(a))), s));
        vst1q_f32(o + 4, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(a))), s));
        vst1q_f32(o + 8, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(b))), s));
        vst1q_f32(o + 12, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(b))), s));
    }
#else
    for (int j = 0; j < 16; j++) {
        const int hi = q[16 + j % 8] >> (2 * (j / 8));
        out[j] = (float)((q[j] & 0x0F) + ((hi & 3) << 4) - 32) * s0;
        out[16 + j] = (float)((q[j] >> 4) + (((hi >> 4) & 3) << 4) - 32) * s1;
    }
#endif
}

/* 32 weights of a 5-bit kind (20 bytes: 16 of low nibbles in the 4-bit order, then the fifth bits as a little-endian
 * uint32, bit i weight i; common.h, k_qmatmul_kind): w = fma(q, d, m), q = low | fifth << 4 in 0..31 */
INLINE void dequant_q5(const uint8_t *q, float d, float m, float *out) {
    uint32_t fifth;
    memcpy(&fifth, q + 16, 4);
#if defined(__AVX2__)
    const __m128i v = _mm_loadu_si128((const __m128i *)q), m4 = _mm_set1_epi8(0x0F), sixteen = _mm_set1_epi8(16);
    const __m128i h = _mm_set1_epi32((int)fifth), bit = _mm_set1_epi64x((long long)0x8040201008040201ULL);
    /* byte j of weights 0..15 (16..31): byte j / 8 (2 + j / 8) of the bits, bit j % 8 of it set -> 16 */
    const __m128i ha = _mm_shuffle_epi8(h, _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    const __m128i hb = _mm_shuffle_epi8(h, _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m128i fa = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(ha, bit), bit), sixteen);
    const __m128i fb = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(hb, bit), bit), sixteen);
    const __m128i lo = _mm_or_si128(_mm_and_si128(v, m4), fa);
    const __m128i hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m4), fb);
#if defined(__AVX512F__)
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, mv));
    _mm512_storeu_ps(out + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, mv));
#else
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, mv));
    _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, mv));
    _mm256_storeu_ps(out + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, mv));
    _mm256_storeu_ps(out + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, mv));
#endif
#elif defined(__ARM_NEON)
    const uint8x16_t v = vld1q_u8(q), sixteen = vdupq_n_u8(16);
    const uint8x16_t bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t ha = vcombine_u8(vdup_n_u8((uint8_t)fifth), vdup_n_u8((uint8_t)(fifth >> 8)));
    const uint8x16_t hb = vcombine_u8(vdup_n_u8((uint8_t)(fifth >> 16)), vdup_n_u8((uint8_t)(fifth >> 24)));
    const uint8x16_t half[2] = {vorrq_u8(vandq_u8(v, vdupq_n_u8(0x0F)), vandq_u8(vtstq_u8(ha, bit), sixteen)),
                                vorrq_u8(vshrq_n_u8(v, 4), vandq_u8(vtstq_u8(hb, bit), sixteen))};
    const float32x4_t dv = vdupq_n_f32(d), mv = vdupq_n_f32(m);
    for (int k = 0; k < 2; k++) {
        const uint16x8_t a = vmovl_u8(vget_low_u8(half[k])), b = vmovl_u8(vget_high_u8(half[k]));
        float *o = out + 16 * k;
        vst1q_f32(o, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_low_u16(a))), dv));
        vst1q_f32(o + 4, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_high_u16(a))), dv));
        vst1q_f32(o + 8, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_low_u16(b))), dv));
        vst1q_f32(o + 12, vfmaq_f32(mv, vcvtq_f32_u32(vmovl_u16(vget_high_u16(b))), dv));
    }
#else
    for (int j = 0; j < 16; j++) {
        out[j] = fmaf((float)((q[j] & 0x0F) | (((fifth >> j) & 1) << 4)), d, m);
        out[16 + j] = fmaf((float)((q[j] >> 4) | (((fifth >> (16 + j)) & 1) << 4)), d, m);
    }
#endif
}

/* 32 weights of the 2- or 3-bit K-quants (8 bytes of 2-bit lows: byte i bits 2s..2s+1 weight 8s + i; Q3_K: then
 * the third bits as a little-endian uint32, bit i weight i) with each half's (weights 0..15, 16..31) scale s and
 * offset o: w = fma(q, s, o), q in 0..3 (Q2_K) or 0..7 (Q3_K) */
INLINE void dequant_q23(const uint8_t *q, int third, const float *s, const float *o, float *out) {
    uint32_t bits = 0;
    if (third) memcpy(&bits, q + 8, 4);
    for (int i = 0; i < 32; i++) {
        const int v = ((q[i % 8] >> (2 * (i / 8))) & 3) | (int)(((bits >> i) & 1) << 2);
        out[i] = fmaf((float)v, s[i / 16], o[i / 16]);
    }
}

/* one weight row of nsb super-blocks (kind QKIND_Q4_K, QKIND_Q5_K, QKIND_Q6_K, QKIND_Q2_K or QKIND_Q3_K) -> wf
 * (nsb * 256 floats), the file's weights */
static void dequantize_row_k(int kind, const uint8_t *qs, const float *d, const uint8_t *m, int nsb, float *wf) {
    for (int s = 0; s < nsb; s++, wf += 256)
        if (kind == QKIND_Q2_K || kind == QKIND_Q3_K) { /* per 16: Q2_K fma(q, d sc, -(dmin mn)); Q3_K (d sc)(q - 4) */
            const int q2 = kind == QKIND_Q2_K;
            for (int j = 0; j < 8; j++) {
                float sc[2], off[2];
                for (int h = 0; h < 2; h++) {
                    const uint8_t byte = m[(size_t)s * 16 + 2 * j + h];
                    sc[h] = q2 ? d[2 * s] * (float)(byte & 0x0F) : d[s] * (float)(int8_t)byte;
                    off[h] = q2 ? -(d[2 * s + 1] * (float)(byte >> 4)) : -4.0f * sc[h];
                }
                dequant_q23(qs + ((size_t)s * 8 + j) * (q2 ? 8 : 12), !q2, sc, off, wf + 32 * j);
            }
        } else if (kind == QKIND_Q4_K) { /* w = (d sc_j) q - (dmin mn_j): both products exact, one rounding (an FMA) */
            const float ds = d[2 * s], dm = d[2 * s + 1];
            const uint8_t *sm = m + (size_t)s * 16;
            for (int j = 0; j < 8; j++)
                dequant_q4(qs + ((size_t)s * 8 + j) * 16, ds * (float)sm[j], -(dm * (float)sm[8 + j]), wf + 32 * j);
        } else if (kind == QKIND_Q5_K) { /* as Q4_K, with 5-bit q */
            const float ds = d[2 * s], dm = d[2 * s + 1];
            const uint8_t *sm = m + (size_t)s * 16;
            for (int j = 0; j < 8; j++)
                dequant_q5(qs + ((size_t)s * 8 + j) * 20, ds * (float)sm[j], -(dm * (float)sm[8 + j]), wf + 32 * j);
        } else { /* w = (d sc) (q - 32): exact */
            const int8_t *sc = (const int8_t *)m + (size_t)s * 16;
            for (int j = 0; j < 8; j++)
                dequant_q6(qs + ((size_t)s * 8 + j) * 24, d[s] * (float)sc[2 * j], d[s] * (float)sc[2 * j + 1],
                           wf + 32 * j);
        }
}

/* K (a multiple of 32) IEEE half or bfloat16 weights -> wf, exactly */
static void widen_row(int kind, const uint16_t *h, int K, float *wf) {
    for (int k = 0; k < K; k += 16) {
#if defined(__AVX512F__)
        const __m256i v = _mm256_loadu_si256((const __m256i *)(h + k));
        _mm512_storeu_ps(wf + k, kind == QKIND_F16 ? _mm512_cvtph_ps(v)
                                                   : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
#elif defined(__AVX2__)
        for (int j = 0; j < 16; j += 8) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(h + k + j));
            _mm256_storeu_ps(wf + k + j, kind == QKIND_F16
                                             ? _mm256_cvtph_ps(v)
                                             : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
        }
#elif defined(__ARM_NEON)
        for (int j = 0; j < 16; j += 4)
            vst1q_f32(wf + k + j, kind == QKIND_F16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + k + j)))
                                                    : vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h + k + j), 16)));
#else
        for (int j = 0; j < 16; j++) wf[k + j] = kind == QKIND_F16 ? half_f32(h[k + j]) : bf16_to_float(h[k + j]);
#endif
    }
}

/* 16 bytes of QKIND_IQ4 indices (the 4-bit order) -> the 32 int8 values they stand for, in weight order */
INLINE void iq4_values(const uint8_t *q, int8_t *out) {
#if defined(__AVX2__)
    const __m128i lut = _mm_loadu_si128((const __m128i *)IQ4_VALUES), v = _mm_loadu_si128((const __m128i *)q);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(lut, _mm_and_si128(v, m4)));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m4)));
#elif defined(__ARM_NEON)
    const int8x16_t lut = vld1q_s8(IQ4_VALUES);
    const uint8x16_t v = vld1q_u8(q);
    vst1q_s8(out, vqtbl1q_s8(lut, vandq_u8(v, vdupq_n_u8(0x0F))));
    vst1q_s8(out + 16, vqtbl1q_s8(lut, vshrq_n_u8(v, 4)));
#else
    for (int j = 0; j < 16; j++) out[j] = IQ4_VALUES[q[j] & 0x0F], out[16 + j] = IQ4_VALUES[q[j] >> 4];
#endif
}

/* one weight row of any kind but QKIND_Q4/QKIND_Q8 (its qs, d and m) -> wf (K floats), the file's weights */
static void dequantize_row_kind(int kind, const uint8_t *qs, const void *d, const void *m, int K, float *wf) {
    if (kind == QKIND_IQ4) { /* w = d IQ4_VALUES[q]: one product, as gguf's */
        for (int b = 0; b < K / 32; b++) {
            int8_t v[32];
            iq4_values(qs + (size_t)b * 16, v);
            dequant_q8((const uint8_t *)v, ((const float *)d)[b], wf + 32 * b);
        }
    } else if (qkind_float(kind)) {
        widen_row(kind, (const uint16_t *)qs, K, wf);
    } else if (kind == QKIND_Q5_0 || kind == QKIND_Q5_1) { /* w = fma(q, d, m), m = -16 d for Q5_0 (exact) */
        const uint16_t *dh = d, *mh = m;
        for (int b = 0; b < K / 32; b++) {
            const float db = half_f32(dh[b]);
            dequant_q5(qs + (size_t)b * 20, db, kind == QKIND_Q5_1 ? half_f32(mh[b]) : -16.0f * db, wf + 32 * b);
        }
    } else {
        dequantize_row_k(kind, qs, d, m, K / 256, wf);
    }
}

int k_qmatmul_kind(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m,
                   const float *bias, void *y, int M, int N, int K, int i8, int nthreads) {
    if (kind == QKIND_Q4 || kind == QKIND_Q8)
        return m || kind == QKIND_Q8 ? k_qmatmul(x, act, qs, d, kind == QKIND_Q4 ? m : NULL, bias, y, M, N, K, i8,
                                                 nthreads)
                                     : AIGC_ERR_ARGS;
    if (!qkind_args_ok(kind, qs, d, m, M, N, K)) return AIGC_ERR_ARGS;
    const int fl = qkind_float(kind);
#if defined(QMATMUL_I8)
    if ((i8 & AIGC_INT8) && !fl) return qmatmul_i8(x, act, kind, qs, d, m, bias, y, M, N, K, i8 & AIGC_INT16, nthreads);
#endif
    if ((i8 & AIGC_INT8) && !fl) return AIGC_ERR_UNSUPPORTED; /* no integer dot products in this build */
#if defined(__AVX512BF16__)
    if (act == ACT_BF16 && !fl)
        return qmatmul_avx512bf16_kind(kind, x, qs, d, m, bias, y, M, N, K, i8 & AIGC_EVERY_BATCH, nthreads);
#endif
    size_t row_bytes, d_bytes, m_bytes; /* a weight row's qs, d and m */
    qkind_row_bytes(kind, K, &row_bytes, &d_bytes, &m_bytes);
    return exact_rows(x, act, kind, qs, d, m, bias, y, M, N, K, row_bytes, d_bytes, m_bytes, nthreads);
}

int k_dequantize(int kind, const uint8_t *qs, const void *d, const void *m, void *out, int N, int K, int act,
                 int nthreads) {
    size_t row_bytes, d_bytes, m_bytes; /* a weight row's qs, d and m */
    if (kind == QKIND_Q4 || kind == QKIND_Q8) {
        if (K % BLOCK || N <= 0 || !qs || !d || (kind == QKIND_Q4 && !m)) return AIGC_ERR_ARGS;
        row_bytes = (size_t)(K / BLOCK) * (kind == QKIND_Q4 ? 16 : 32), d_bytes = m_bytes = (size_t)(K / BLOCK) * 2;
    } else {
        if (!qkind_args_ok(kind, qs, d, m, 1, N, K)) return AIGC_ERR_ARGS;
        qkind_row_bytes(kind, K, &row_bytes, &d_bytes, &m_bytes);
    }
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *wf = act == ACT_BF16 ? malloc((size_t)K * sizeof(float)) : NULL; /* a row before its rounding */
        if (act == ACT_BF16 && !wf) bad = 1;
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (act == ACT_BF16 && !wf) continue;
            float *w = act == ACT_BF16 ? wf : (float *)out + (size_t)n * K;
            const uint8_t *qn = qs + (size_t)n * row_bytes, *dn = (const uint8_t *)d + (size_t)n * d_bytes;
            const uint8_t *mn = m ? (const uint8_t *)m + (size_t)n * m_bytes : NULL;
            if (kind == QKIND_Q4 || kind == QKIND_Q8)
                dequantize_row(qn, (const uint16_t *)dn, kind == QKIND_Q4 ? (const uint16_t *)mn : NULL, K / BLOCK, w);
            else
                dequantize_row_kind(kind, qn, dn, mn, K, w);
            if (act == ACT_BF16)
                for (int k = 0; k < K; k++) ((uint16_t *)out)[(size_t)n * K + k] = float_to_bf16(w[k]);
        }
        free(wf);
    }
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
