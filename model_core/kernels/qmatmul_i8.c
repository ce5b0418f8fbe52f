/* i8 mode of the quantized matmul (see k_qmatmul in common.h) with integer dot products: AVX2 (maddubs)
 * and NEON with the dot-product extension (sdot by lane).
 *
 * The activations are rounded to int8 per block of 32 once per call. The weights come interleaved by 8
 * rows, so one vector holds 4 consecutive quants of each of 8 rows: multiplied by 4 activations broadcast
 * to every lane, 8 such products give the block sums of 8 output columns at once, with integer adds only;
 * then one conversion and one FMA per block for the 8 columns. A thread takes groups of 8 rows in turn:
 * it widens the group's 4-bit quants and fp16 scales once into L1 scratch, and reads them back for every
 * activation row (tiles of up to 4 rows). Each output's float sums run in block order (common.h), the same
 * for every batch, tile and build.
 */
#if defined(__AVX2__) || defined(__ARM_FEATURE_DOTPROD)
#include <stdlib.h>

#include "simd.h"

#define BLOCK 32
#define ROWS 8 /* weight rows per group */

#if defined(__AVX2__)
typedef __m256i qv;   /* 8 rows x 4 quants, widened to bytes */
typedef __m256i isum; /* 8 int32 block sums, one per row */
typedef __m256 f8;    /* 8 floats, one per row */
#define F8_ZERO _mm256_setzero_ps()
static inline f8 f8_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void f8_store(float *p, f8 v) { _mm256_storeu_ps(p, v); }
static inline f8 f8_scale_fma(isum s, f8 d, float xs, f8 acc) { /* acc + s * (d * xs) */
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xs)), acc);
}
static inline f8 f8_fma(f8 a, float b, f8 acc) { return _mm256_fmadd_ps(a, _mm256_set1_ps(b), acc); }
static inline void halves8(const uint16_t *h, float *out) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)));
}

/* 4-bit: a block's 4 groups of 32 bytes -> 8 vectors of unsigned quants, vector k = quants 4k..4k+3 of each row */
static inline void unpack_q4(const uint8_t *q, qv *out) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int k = 0; k < 4; k++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * k));
        out[k] = _mm256_and_si256(v, mask);
        out[4 + k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
}

/* block sums of 8 rows against one activation block xb (32 int8): 4-bit quants in 0..15 make pair sums of at
 * most 2 * 15 * 127, so the 8 products add up in int16 without overflow */
static inline isum sums_q4(const qv *w, const int8_t *xb) {
    __m256i s16 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        int32_t four;
        memcpy(&four, xb + 4 * k, 4);
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[k], _mm256_set1_epi32(four)));
    }
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

/* 8-bit (signed) quants: |w| times x with w's sign (maddubs takes unsigned x signed), widened per product */
static inline isum sums_q8(const uint8_t *q, const int8_t *xb) {
    __m256i s32 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * k));
        int32_t four;
        memcpy(&four, xb + 4 * k, 4);
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(_mm256_set1_epi32(four), w));
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
    }
    return s32;
}
#else /* NEON + dotprod: rows 0-3 and 4-7 in two vectors */
typedef struct {
    int8x16_t lo, hi;
} qv;
typedef struct {
    int32x4_t lo, hi;
} isum;
typedef struct {
    float32x4_t lo, hi;
} f8;
#define F8_ZERO ((f8){vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)})
static inline f8 f8_load(const float *p) { return (f8){vld1q_f32(p), vld1q_f32(p + 4)}; }
static inline void f8_store(float *p, f8 v) {
    vst1q_f32(p, v.lo);
    vst1q_f32(p + 4, v.hi);
}
static inline f8 f8_scale_fma(isum s, f8 d, float xs, f8 acc) {
    return (f8){vfmaq_f32(acc.lo, vcvtq_f32_s32(s.lo), vmulq_n_f32(d.lo, xs)),
                vfmaq_f32(acc.hi, vcvtq_f32_s32(s.hi), vmulq_n_f32(d.hi, xs))};
}
static inline f8 f8_fma(f8 a, float b, f8 acc) {
    return (f8){vfmaq_f32(acc.lo, a.lo, vdupq_n_f32(b)), vfmaq_f32(acc.hi, a.hi, vdupq_n_f32(b))};
}
static inline void halves8(const uint16_t *h, float *out) {
    for (int i = 0; i < 8; i++) out[i] = half_f32(h[i]);
}

static inline void unpack_q4(const uint8_t *q, qv *out) {
    const uint8x16_t mask = vdupq_n_u8(0x0F);
    for (int k = 0; k < 4; k++) {
        const uint8x16_t a = vld1q_u8(q + 32 * k), b = vld1q_u8(q + 32 * k + 16);
        out[k] = (qv){vreinterpretq_s8_u8(vandq_u8(a, mask)), vreinterpretq_s8_u8(vandq_u8(b, mask))};
        out[4 + k] = (qv){vreinterpretq_s8_u8(vshrq_n_u8(a, 4)), vreinterpretq_s8_u8(vshrq_n_u8(b, 4))};
    }
}

#define DOT_LANES(W, X0, X1)                                                                          \
    do {                                                                                              \
        lo = vdotq_laneq_s32(lo, W[0].lo, X0, 0), hi = vdotq_laneq_s32(hi, W[0].hi, X0, 0);           \
        lo = vdotq_laneq_s32(lo, W[1].lo, X0, 1), hi = vdotq_laneq_s32(hi, W[1].hi, X0, 1);           \
        lo = vdotq_laneq_s32(lo, W[2].lo, X0, 2), hi = vdotq_laneq_s32(hi, W[2].hi, X0, 2);           \
        lo = vdotq_laneq_s32(lo, W[3].lo, X0, 3), hi = vdotq_laneq_s32(hi, W[3].hi, X0, 3);           \
        lo = vdotq_laneq_s32(lo, W[4].lo, X1, 0), hi = vdotq_laneq_s32(hi, W[4].hi, X1, 0);           \
        lo = vdotq_laneq_s32(lo, W[5].lo, X1, 1), hi = vdotq_laneq_s32(hi, W[5].hi, X1, 1);           \
        lo = vdotq_laneq_s32(lo, W[6].lo, X1, 2), hi = vdotq_laneq_s32(hi, W[6].hi, X1, 2);           \
        lo = vdotq_laneq_s32(lo, W[7].lo, X1, 3), hi = vdotq_laneq_s32(hi, W[7].hi, X1, 3);           \
    } while (0)

static inline isum sums_q4(const qv *w, const int8_t *xb) {
    const int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16);
    int32x4_t lo = vdupq_n_s32(0), hi = vdupq_n_s32(0);
    DOT_LANES(w, x0, x1);
    return (isum){lo, hi};
}

static inline isum sums_q8(const uint8_t *q, const int8_t *xb) {
    qv w[8];
    for (int k = 0; k < 8; k++)
        w[k] = (qv){vld1q_s8((const int8_t *)q + 32 * k), vld1q_s8((const int8_t *)q + 32 * k + 16)};
    const int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16);
    int32x4_t lo = vdupq_n_s32(0), hi = vdupq_n_s32(0);
    DOT_LANES(w, x0, x1);
    return (isum){lo, hi};
}
#endif

/* MT activation rows against one group of 8 weight rows -> out (MT, 8). Q4: 4-bit quants, widened in w4
 * (nb * 8 vectors), with offsets mv; else 8-bit ones read from q8. dv, mv: (nb, 8) float scales and offsets;
 * xq, xs, xt: the rows' int8 blocks, scales and scale * sum q. MT and Q4 are constants where this is inlined,
 * so the accumulators live in registers. */
static inline __attribute__((always_inline)) void group_rows(const qv *w4, const uint8_t *q8, const float *dv,
                                                            const float *mv, int nb, const int8_t *xq,
                                                            const float *xs, const float *xt, float *out,
                                                            const int MT, const int Q4) {
    f8 acc[MT], off[MT];
    _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) acc[i] = off[i] = F8_ZERO;
    for (int b = 0; b < nb; b++) {
        const f8 db = f8_load(dv + (size_t)b * ROWS);
        _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) {
            const size_t at = (size_t)i * nb + b;
            const isum s = Q4 ? sums_q4(w4 + (size_t)b * 8, xq + at * BLOCK)
                              : sums_q8(q8 + (size_t)b * ROWS * BLOCK, xq + at * BLOCK);
            acc[i] = f8_scale_fma(s, db, xs[at], acc[i]);
        }
    }
    if (Q4) /* the offsets' term in its own pass, so that the loop above keeps only acc in registers */
        for (int b = 0; b < nb; b++) {
            const f8 mb = f8_load(mv + (size_t)b * ROWS);
            _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) off[i] = f8_fma(mb, xt[(size_t)i * nb + b], off[i]);
        }
    _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) {
        float a[ROWS], o[ROWS];
        f8_store(a, acc[i]);
        f8_store(o, off[i]);
        for (int r = 0; r < ROWS; r++) out[i * ROWS + r] = a[r] + o[r];
    }
}

/* the row tile of MT rows starting at row r0, for 4-bit (Q4) or 8-bit weights */
#define GROUP_TILE(MT, Q4) \
    group_rows(w4, qg, dv, mv, nb, xq + at * BLOCK, xs + at, xt + at, out, MT, Q4)

int qmatmul_i8(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
               void *y, int M, int N, int K, int nthreads) {
    const int nb = K / BLOCK, G = (N + ROWS - 1) / ROWS;
    const size_t group_bytes = (size_t)nb * ROWS * (m ? 16 : 32), nblk = (size_t)M * nb;
    int8_t *xq = malloc(nblk * BLOCK);           /* (M, nb, 32) */
    float *xs = malloc(nblk * 2 * sizeof(float)); /* (M, nb) scales, then (M, nb) scale * sum q */
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return AIGC_ERR_NOMEM;
    }
    float *xt = xs + nblk;
    for (size_t b = 0; b < nblk; b++) {
        float xf[BLOCK];
        int q_sum;
        for (int i = 0; i < BLOCK; i++) xf[i] = load_act(x, b * BLOCK + i, act);
        xs[b] = quantize_block(xf, xq + b * BLOCK, &q_sum);
        xt[b] = xs[b] * (float)q_sum;
    }
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        /* per thread: the group's widened quants (4-bit), float scales and offsets */
        qv *w4 = m ? aligned_alloc(64, ((sizeof(qv) * (size_t)nb * 8 + 63) / 64) * 64) : NULL;
        float *dv = malloc(sizeof(float) * (size_t)nb * ROWS * 2);
        if ((m && !w4) || !dv) bad = 1;
#pragma omp for schedule(static)
        for (int g = 0; g < G; g++) {
            if (!dv || (m && !w4)) continue;
            const uint8_t *qg = qs + (size_t)g * group_bytes;
            float *mv = m ? dv + (size_t)nb * ROWS : NULL;
            for (int b = 0; b < nb; b++) {
                const size_t at = ((size_t)g * nb + b) * ROWS;
                halves8(d + at, dv + (size_t)b * ROWS);
                if (m) {
                    halves8(m + at, mv + (size_t)b * ROWS);
                    unpack_q4(qg + (size_t)b * ROWS * 16, w4 + (size_t)b * 8);
                }
            }
            const int cols = N - g * ROWS < ROWS ? N - g * ROWS : ROWS;
            float out[4 * ROWS];
            for (int r0 = 0; r0 < M;) {
                const int left = M - r0, mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                const size_t at = (size_t)r0 * nb;
                switch (mt * (m ? 1 : -1)) {
                case 4: GROUP_TILE(4, 1); break;
                case 2: GROUP_TILE(2, 1); break;
                case 1: GROUP_TILE(1, 1); break;
                case -4: GROUP_TILE(4, 0); break;
                case -2: GROUP_TILE(2, 0); break;
                default: GROUP_TILE(1, 0); break;
                }
                for (int i = 0; i < mt; i++)
                    for (int c = 0; c < cols; c++) {
                        const int n = g * ROWS + c;
                        store_act(y, (size_t)(r0 + i) * N + n, out[i * ROWS + c] + (bias ? bias[n] : 0.0f), act);
                    }
                r0 += mt;
            }
        }
        free(w4);
        free(dv);
    }
    free(xq);
    free(xs);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
#endif
