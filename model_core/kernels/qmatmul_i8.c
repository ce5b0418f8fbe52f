/* i8 mode of the quantized matmul (see k_qmatmul in common.h) with integer dot products, as llama.cpp
 * computes Q4/Q8 matmuls on these CPUs: AVX2 (maddubs) and NEON with the dot-product extension (sdot).
 *
 * The activations are rounded to int8 per block of 32 once per call (quantize_block: scale s, q, sum q).
 * Per weight block (scale d, offset m, quants w) and activation block:
 *     sum_i (d w_i + m) (s q_i) = d s * sum_i w_i q_i + m * s * sum_i q_i
 * The integer sum is exact; the first terms accumulate per row in block order (two accumulators, even and
 * odd blocks) and the second is one dot product over the blocks, the same whatever the batch, so a row's
 * result does not depend on its neighbours.
 */
#if defined(__AVX2__) || defined(__ARM_FEATURE_DOTPROD)
#include <stdlib.h>

#include "simd.h"

#define BLOCK 32
#define PREFETCH_ROWS 4

#if defined(__AVX2__)
typedef __m256i wblock; /* a weight block's 32 quants, widened for the dot product */
typedef __m256 facc;    /* 8 float partial sums */
#define FACC_ZERO _mm256_setzero_ps()

static inline wblock load_q4(const uint8_t *q) { /* 32 x uint8 in 0..15 */
    const __m128i v = _mm_loadu_si128((const __m128i *)q);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}
static inline wblock load_q8(const uint8_t *q) { return _mm256_loadu_si256((const __m256i *)q); }

/* acc += scale * (w . x) for 32 unsigned (q4) or signed (q8) weights and 32 int8 activations */
static inline facc dot_q4(facc acc, wblock w, const int8_t *x, float scale) {
    const __m256i p16 = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)x));
    const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(scale), acc);
}
static inline facc dot_q8(facc acc, wblock w, const int8_t *x, float scale) {
    const __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    /* |w| as unsigned times x with w's sign: maddubs takes unsigned x signed */
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(scale), acc);
}
static inline float facc_sum(facc a, facc b) {
    const __m256 s = _mm256_add_ps(a, b);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#else /* NEON + dotprod */
typedef struct {
    int8x16_t lo, hi;
} wblock;
typedef float32x4_t facc;
#define FACC_ZERO vdupq_n_f32(0.0f)

static inline wblock load_q4(const uint8_t *q) {
    const uint8x16_t v = vld1q_u8(q);
    return (wblock){vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(v, 4))};
}
static inline wblock load_q8(const uint8_t *q) {
    return (wblock){vld1q_s8((const int8_t *)q), vld1q_s8((const int8_t *)q + 16)};
}
static inline facc dot_q4(facc acc, wblock w, const int8_t *x, float scale) {
    const int32x4_t p = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w.lo, vld1q_s8(x)), w.hi, vld1q_s8(x + 16));
    return vfmaq_n_f32(acc, vcvtq_f32_s32(p), scale);
}
#define dot_q8 dot_q4 /* signed x signed either way */
static inline float facc_sum(facc a, facc b) { return vaddvq_f32(vaddq_f32(a, b)); }
#endif

/* sum_b a[b] * b[b] in a fixed order (VL lanes, then the tail) */
static inline float dot_f32(const float *a, const float *b, int n) {
    vf acc = vset1(0.0f);
    int i = 0;
    for (; i + VL <= n; i += VL) acc += vload(a + i) * vload(b + i);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* MT activation rows against one weight row (quants qn, scales dw, offsets mw as floats; q4 when mw != NULL).
 * scale: (MT, nb) scratch for dw[b] * xs[i][b]. The inner loop is integer dot products and one FMA per block
 * and row; the offsets' term is one dot product per row after it. */
static inline __attribute__((always_inline)) void rows_dot(const uint8_t *qn, const float *dw, const float *mw, int nb,
                                                          const int8_t *xq, const float *xs, const float *xm,
                                                          float *scale, float *sums, const int MT) {
    for (int i = 0; i < MT; i++) {
        const float *xsi = xs + (size_t)i * nb;
        float *si = scale + (size_t)i * nb;
        int b = 0;
        for (; b + VL <= nb; b += VL) vstore(si + b, vload(dw + b) * vload(xsi + b));
        for (; b < nb; b++) si[b] = dw[b] * xsi[b];
    }
    facc acc[MT][2]; /* even and odd blocks; indexed by constants only, so they stay in registers */
    for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = FACC_ZERO;
#define ROWS_STEP(LOAD, DOT, QB, b, k)                                                                         \
    do {                                                                                                   \
        const wblock w = LOAD(qn + (size_t)(b) * (QB));                                                    \
        for (int i = 0; i < MT; i++)                                                                       \
            acc[i][k] = DOT(acc[i][k], w, xq + ((size_t)i * nb + (b)) * BLOCK, scale[(size_t)i * nb + (b)]); \
    } while (0)
    int b = 0;
    if (mw) {
        for (; b + 2 <= nb; b += 2) {
            ROWS_STEP(load_q4, dot_q4, 16, b, 0);
            ROWS_STEP(load_q4, dot_q4, 16, b + 1, 1);
        }
        if (b < nb) ROWS_STEP(load_q4, dot_q4, 16, b, 0);
    } else {
        for (; b + 2 <= nb; b += 2) {
            ROWS_STEP(load_q8, dot_q8, BLOCK, b, 0);
            ROWS_STEP(load_q8, dot_q8, BLOCK, b + 1, 1);
        }
        if (b < nb) ROWS_STEP(load_q8, dot_q8, BLOCK, b, 0);
    }
#undef ROWS_STEP
    for (int i = 0; i < MT; i++)
        sums[i] = facc_sum(acc[i][0], acc[i][1]) + (mw ? dot_f32(mw, xm + (size_t)i * nb, nb) : 0.0f);
}

int qmatmul_i8(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
               void *y, int M, int N, int K, int nthreads);

int qmatmul_i8(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
               void *y, int M, int N, int K, int nthreads) {
    const int nb = K / BLOCK;
    const size_t row_bytes = (size_t)nb * (m ? 16 : 32), nblk = (size_t)M * nb;
    int8_t *xq = malloc(nblk * BLOCK);           /* (M, nb, 32) */
    float *xs = malloc(nblk * 2 * sizeof(float)); /* (M, nb) scales, then (M, nb) scale * sum q */
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    float *xm = xs + nblk;
    for (size_t b = 0; b < nblk; b++) {
        float xf[BLOCK];
        int q_sum;
        for (int i = 0; i < BLOCK; i++) xf[i] = load_act(x, b * BLOCK + i, act);
        xs[b] = quantize_block(xf, xq + b * BLOCK, &q_sum);
        xm[b] = xs[b] * (float)q_sum;
    }
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *scratch = malloc((size_t)nb * 6 * sizeof(float)); /* dw, mw, and (4, nb) scales */
        if (!scratch) bad = 1;
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (!scratch) continue;
            if (n + PREFETCH_ROWS < N) { /* a later row's stream, ahead of the hardware prefetcher */
                const uint8_t *ahead = qs + (size_t)(n + PREFETCH_ROWS) * row_bytes;
                for (size_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(ahead + c);
            }
            const uint8_t *qn = qs + (size_t)n * row_bytes;
            float *dw = scratch, *mw = m ? scratch + nb : NULL, *scale = scratch + 2 * (size_t)nb;
            for (int b = 0; b < nb; b++) dw[b] = half_f32(d[(size_t)n * nb + b]);
            for (int b = 0; mw && b < nb; b++) mw[b] = half_f32(m[(size_t)n * nb + b]);
            const float bn = bias ? bias[n] : 0.0f;
            float sums[4];
            for (int r0 = 0; r0 < M;) {
                const int left = M - r0, mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                const size_t at = (size_t)r0 * nb;
                switch (mt) {
                case 4: rows_dot(qn, dw, mw, nb, xq + at * BLOCK, xs + at, xm + at, scale, sums, 4); break;
                case 2: rows_dot(qn, dw, mw, nb, xq + at * BLOCK, xs + at, xm + at, scale, sums, 2); break;
                default: rows_dot(qn, dw, mw, nb, xq + at * BLOCK, xs + at, xm + at, scale, sums, 1); break;
                }
                for (int i = 0; i < mt; i++) store_act(y, (size_t)(r0 + i) * N + n, sums[i] + bn, act);
                r0 += mt;
            }
        }
        free(scratch);
    }
    free(xq);
    free(xs);
    return bad ? -1 : 0;
}
#endif
