/* i8 mode of the quantized matmul (see k_qmatmul and k_qmatmul_kind in common.h) with integer dot products: AVX2
 * (maddubs), NEON with the dot-product extension (sdot by lane), 512-bit vpdpbusd in the builds with AVX512-VNNI
 * (zmm_i8: 16 weight rows a vector), and AMX-INT8 tiles for bigger batches where the build and CPU have them, for
 * every weight kind.
 *
 * The activations are rounded to int8 per block of 32 once per call (int16 mode, AIGC_INT16: to 16 bits, held as
 * two int8 halves whose block sums are taken apart and joined as fma(S_hi, 255, S_lo): twice the products; the AVX2
 * build's batches of the signed kinds take one sum of the 16-bit values instead, the same number: avx2_i16). The
 * weights come interleaved by 8 rows, so one vector holds 4 consecutive quants of each of 8 rows: multiplied by 4 activations broadcast
 * to every lane, 8 such products give the block sums of 8 output columns at once, with integer adds only;
 * then one conversion and one FMA per block for the 8 columns. A thread takes groups of 8 rows in turn:
 * it widens the group's quants to bytes and its scales to floats once into L1/L2 scratch, and reads them back
 * for every activation row (tiles of up to 4 rows). Each output's float sums run in block order (common.h), the
 * same for every batch, tile and build.
 *
 * The kinds widen to one of four forms (WIDE_*): unsigned quants of at most 4 bits (Q4_0/Q4_1 and Q4_K: w = d' q
 * + m' per block of 32, d' and m' floats), of at most 5 bits (Q5_0, Q5_1, Q5_K: the same), signed 8-bit ones (Q8_0,
 * read in place: no widening) and Q6_K's signed 6-bit ones (q - 32) whose two halves of 16 carry integer scales:
 * their block sum is sc_lo * sum_lo + sc_hi * sum_hi, exact in int32, times d (Q3_K's q - 4 and Q2_K's q in 0..3
 * the same way; Q2_K's mins an offset per half of 16); IQ4's indices widen through their table (IQ4_VALUES) to signed
 * 8-bit values, summed as Q8_0's.
 */
#if defined(__AVX2__) || defined(__ARM_FEATURE_DOTPROD)
#include <stdlib.h>

#include "simd.h"

#define BLOCK 32
#define ROWS 8 /* weight rows per group */

enum { WIDE_U4 = 0, WIDE_U5 = 1, WIDE_S8 = 2, WIDE_Q6 = 3, WIDE_IQ4 = 4 };

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
static inline isum i16_sum(isum hi, isum lo) { /* int16 mode: fma(S_hi, 255, S_lo) as floats, kept in an isum's bits */
    return _mm256_castps_si256(_mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(255.0f), _mm256_cvtepi32_ps(lo)));
}
static inline f8 f8_scale_fma_f(isum s, f8 d, float xs, f8 acc) { /* acc + s * (d * xs), s floats (i16_sum) */
    return _mm256_fmadd_ps(_mm256_castsi256_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(xs)), acc);
}
static inline void halves8(const uint16_t *h, float *out) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)));
}
/* out[r] = q[r] for r < 8, sign-extended */
static inline void widen8(const int8_t *q, int32_t *out) {
    _mm256_storeu_si256((__m256i *)out, _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}
/* out[r] = ds[r] * q[r] for r < 8 (each product rounded once, as the scalar C), negated where neg */
static inline void scale8(const float *ds, const uint8_t *q, float *out, int neg) {
    const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(ds),
                                   _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q))));
    _mm256_storeu_ps(out, neg ? _mm256_xor_ps(p, _mm256_set1_ps(-0.0f)) : p);
}
static inline qv qv_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 4-bit: a block's 4 runs of 32 bytes -> 8 vectors of unsigned quants, vector k = quants 4k..4k+3 of each row */
static inline void unpack_q4(const uint8_t *q, qv *out) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int k = 0; k < 4; k++) {
        const __m256i v = qv_load(q + 32 * k);
        out[k] = _mm256_and_si256(v, mask);
        out[4 + k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
}

/* 5-bit: runs 0..3 the low nibbles as 4-bit, run 4 each row's fifth bits (a little-endian uint32, bit i: quant i)
 * -> 8 vectors of quants in 0..31. add_bits: v into vector k's byte j of a row where bit 4k + j of its run `bits`
 * is set: bit 4 (k % 2) + j of the row's byte k / 2. */
static inline void add_bits(const uint8_t *bits, char v, qv *out) {
    const __m256i run = qv_load(bits), value = _mm256_set1_epi8(v);
    for (int k = 0; k < 8; k++) {
        const int b = k / 2;
        const __m256i pick = _mm256_setr_epi8(b, b, b, b, 4 + b, 4 + b, 4 + b, 4 + b, 8 + b, 8 + b, 8 + b, 8 + b,
                                              12 + b, 12 + b, 12 + b, 12 + b, b, b, b, b, 4 + b, 4 + b, 4 + b, 4 + b,
                                              8 + b, 8 + b, 8 + b, 8 + b, 12 + b, 12 + b, 12 + b, 12 + b);
        const __m256i bit = _mm256_set1_epi32((int)(0x08040201u << (4 * (k % 2))));
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(run, pick), bit), bit);
        out[k] = _mm256_or_si256(out[k], _mm256_and_si256(set, value));
    }
}

static inline void unpack_q5(const uint8_t *q, qv *out) {
    unpack_q4(q, out);
    add_bits(q + 128, 16, out);
}

/* Q2_K, Q3_K: runs 0 and 1 the 2-bit lows (byte i of run h: bits 2s..2s+1 hold quant 8s + 4h + i's) -> 8 vectors of
 * q in 0..3; Q3_K: run 2 the third bits (as the fifth bits above) -> q - 4 in -4..3 (signed) */
static inline void unpack_q2(const uint8_t *q, qv *out) {
    const __m256i m2 = _mm256_set1_epi8(3), h[2] = {qv_load(q), qv_load(q + 32)};
    for (int k = 0; k < 8; k++) out[k] = _mm256_and_si256(_mm256_srli_epi16(h[k % 2], 2 * (k / 2)), m2);
}

static inline void unpack_q3(const uint8_t *q, qv *out) {
    unpack_q2(q, out);
    add_bits(q + 64, 4, out);
    for (int k = 0; k < 8; k++) out[k] = _mm256_sub_epi8(out[k], _mm256_set1_epi8(4));
}

/* Q6_K: runs 0..3 the low nibbles as 4-bit, runs 4 and 5 the high bit pairs (byte i of run 4 + h: bits 2s..2s+1
 * hold quant 8s + 4h + i's) -> 8 vectors of q - 32 in -32..31 (signed) */
static inline void unpack_q6(const uint8_t *q, qv *out) {
    unpack_q4(q, out);
    const __m256i m2 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    const __m256i h[2] = {qv_load(q + 128), qv_load(q + 160)};
    for (int k = 0; k < 8; k++) {
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(h[k % 2], 2 * (k / 2)), m2);
        out[k] = _mm256_sub_epi8(_mm256_or_si256(out[k], _mm256_slli_epi16(high, 4)), off);
    }
}

static inline __m256i x4(const int8_t *xb, int k) { /* activations 4k..4k+3, in every 32-bit lane */
    int32_t four;
    memcpy(&four, xb + 4 * k, 4);
    return _mm256_set1_epi32(four);
}

/* block sums of 8 rows against one activation block xb (32 int8). 4-bit quants in 0..15 make pair sums of at
 * most 2 * 15 * 127, so the 8 products add up in int16 without overflow; 5-bit ones (0..31), 4 at a time */
static inline isum sums_q4(const qv *w, const int8_t *xb) {
    __m256i s16 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[k], x4(xb, k)));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

static inline isum sums_q5(const qv *w, const int8_t *xb) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
        a = _mm256_add_epi16(a, _mm256_maddubs_epi16(w[k], x4(xb, k)));
        b = _mm256_add_epi16(b, _mm256_maddubs_epi16(w[4 + k], x4(xb, 4 + k)));
    }
    const __m256i one = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(a, one), _mm256_madd_epi16(b, one));
}

/* signed quants: |w| times x with w's sign (maddubs takes unsigned x signed) */
static inline __m256i signed_pairs(qv w, __m256i x) { return _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); }

/* 8-bit (signed) quants, widened per product */
static inline isum sums_q8(const uint8_t *q, const int8_t *xb) {
    __m256i s32 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++)
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(signed_pairs(qv_load(q + 32 * k), x4(xb, k)), _mm256_set1_epi16(1)));
    return s32;
}

/* Q6_K: q - 32 in -32..31 make pair sums of at most 2 * 32 * 127, 4 of them in int16; each half (quants 0..15,
 * 16..31) times its row's integer scale sc (8 int32 per half) */
static inline isum sums_q6(const qv *w, const int8_t *xb, const int32_t *sc) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
        a = _mm256_add_epi16(a, signed_pairs(w[k], x4(xb, k)));
        b = _mm256_add_epi16(b, signed_pairs(w[4 + k], x4(xb, 4 + k)));
    }
    const __m256i one = _mm256_set1_epi16(1);
    const __m256i lo = _mm256_mullo_epi32(_mm256_madd_epi16(a, one), _mm256_loadu_si256((const __m256i *)sc));
    return _mm256_add_epi32(lo, _mm256_mullo_epi32(_mm256_madd_epi16(b, one), _mm256_loadu_si256((const __m256i *)(sc + ROWS))));
}


/* IQ4: the 4-bit indices as 4-bit quants, then each through the table: 8 vectors of signed values */
static inline void unpack_iq4(const uint8_t *q, qv *out) {
    unpack_q4(q, out);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES));
    for (int k = 0; k < 8; k++) out[k] = _mm256_shuffle_epi8(lut, out[k]);
}

/* signed 8-bit values already widened (IQ4), as sums_q8 */
static inline isum sums_iq4(const qv *w, const int8_t *xb) {
    __m256i s32 = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++)
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(signed_pairs(w[k], x4(xb, k)), _mm256_set1_epi16(1)));
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
static inline isum i16_sum(isum hi, isum lo) {
    const float32x4_t k = vdupq_n_f32(255.0f);
    return (isum){vreinterpretq_s32_f32(vfmaq_f32(vcvtq_f32_s32(lo.lo), vcvtq_f32_s32(hi.lo), k)),
                  vreinterpretq_s32_f32(vfmaq_f32(vcvtq_f32_s32(lo.hi), vcvtq_f32_s32(hi.hi), k))};
}
static inline f8 f8_scale_fma_f(isum s, f8 d, float xs, f8 acc) {
    return (f8){vfmaq_f32(acc.lo, vreinterpretq_f32_s32(s.lo), vmulq_n_f32(d.lo, xs)),
                vfmaq_f32(acc.hi, vreinterpretq_f32_s32(s.hi), vmulq_n_f32(d.hi, xs))};
}
static inline void halves8(const uint16_t *h, float *out) {
    for (int i = 0; i < 8; i++) out[i] = half_f32(h[i]);
}
static inline void widen8(const int8_t *q, int32_t *out) {
    for (int r = 0; r < 8; r++) out[r] = q[r];
}
static inline void scale8(const float *ds, const uint8_t *q, float *out, int neg) {
    for (int r = 0; r < 8; r++) out[r] = neg ? -(ds[r] * (float)q[r]) : ds[r] * (float)q[r];
}

static inline void unpack_q4(const uint8_t *q, qv *out) {
    const uint8x16_t mask = vdupq_n_u8(0x0F);
    for (int k = 0; k < 4; k++) {
        const uint8x16_t a = vld1q_u8(q + 32 * k), b = vld1q_u8(q + 32 * k + 16);
        out[k] = (qv){vreinterpretq_s8_u8(vandq_u8(a, mask)), vreinterpretq_s8_u8(vandq_u8(b, mask))};
        out[4 + k] = (qv){vreinterpretq_s8_u8(vshrq_n_u8(a, 4)), vreinterpretq_s8_u8(vshrq_n_u8(b, 4))};
    }
}

/* as the AVX2 add_bits: vector k's byte j of a row takes v where bit 4 (k % 2) + j of the row's byte k / 2 is set */
static inline void add_bits(const uint8_t *bits, uint8_t v, qv *out) {
    const uint8x16_t f[2] = {vld1q_u8(bits), vld1q_u8(bits + 16)}, value = vdupq_n_u8(v);
    for (int k = 0; k < 8; k++) {
        const uint8_t b = (uint8_t)(k / 2), s = (uint8_t)(4 * (k % 2));
        const uint8x16_t pick = {b, b, b, b, 4 + b, 4 + b, 4 + b, 4 + b, 8 + b, 8 + b, 8 + b, 8 + b, 12 + b, 12 + b, 12 + b, 12 + b};
        const uint8x16_t bit = {1 << s, 2 << s, 4 << s, 8 << s, 1 << s, 2 << s, 4 << s, 8 << s,
                                1 << s, 2 << s, 4 << s, 8 << s, 1 << s, 2 << s, 4 << s, 8 << s};
        const uint8x16_t lo = vandq_u8(vtstq_u8(vqtbl1q_u8(f[0], pick), bit), value);
        const uint8x16_t hi = vandq_u8(vtstq_u8(vqtbl1q_u8(f[1], pick), bit), value);
        out[k] = (qv){vorrq_s8(out[k].lo, vreinterpretq_s8_u8(lo)), vorrq_s8(out[k].hi, vreinterpretq_s8_u8(hi))};
    }
}

static inline void unpack_q5(const uint8_t *q, qv *out) {
    unpack_q4(q, out);
    add_bits(q + 128, 16, out);
}

/* as the AVX2 unpack_q2, unpack_q3 */
static inline void unpack_q2(const uint8_t *q, qv *out) {
    const uint8x16_t h[2][2] = {{vld1q_u8(q), vld1q_u8(q + 16)}, {vld1q_u8(q + 32), vld1q_u8(q + 48)}};
    const uint8x16_t m2 = vdupq_n_u8(3);
    for (int k = 0; k < 8; k++) {
        const int8x16_t shift = vdupq_n_s8((int8_t)(-2 * (k / 2)));
        out[k] = (qv){vreinterpretq_s8_u8(vandq_u8(vshlq_u8(h[k % 2][0], shift), m2)),
                      vreinterpretq_s8_u8(vandq_u8(vshlq_u8(h[k % 2][1], shift), m2))};
    }
}

static inline void unpack_q3(const uint8_t *q, qv *out) {
    unpack_q2(q, out);
    add_bits(q + 64, 4, out);
    const int8x16_t four = vdupq_n_s8(4);
    for (int k = 0; k < 8; k++) out[k] = (qv){vsubq_s8(out[k].lo, four), vsubq_s8(out[k].hi, four)};
}

/* as the AVX2 unpack_q6 */
static inline void unpack_q6(const uint8_t *q, qv *out) {
    unpack_q4(q, out);
    const uint8x16_t h[2][2] = {{vld1q_u8(q + 128), vld1q_u8(q + 144)}, {vld1q_u8(q + 160), vld1q_u8(q + 176)}};
    const uint8x16_t m2 = vdupq_n_u8(3);
    const int8x16_t off = vdupq_n_s8(32);
    for (int k = 0; k < 8; k++) {
        const int8x16_t shift = vdupq_n_s8((int8_t)(-2 * (k / 2)));
        const uint8x16_t lo = vandq_u8(vshlq_u8(h[k % 2][0], shift), m2), hi = vandq_u8(vshlq_u8(h[k % 2][1], shift), m2);
        out[k] = (qv){vsubq_s8(vorrq_s8(out[k].lo, vreinterpretq_s8_u8(vshlq_n_u8(lo, 4))), off),
                      vsubq_s8(vorrq_s8(out[k].hi, vreinterpretq_s8_u8(vshlq_n_u8(hi, 4))), off)};
    }
}

#define DOT_HALF(W, X, L, H) /* L, H (rows 0-3, 4-7) += the 4 vectors W[0..3] by the 4 lanes of X */             \
    do {                                                                                              \
        L = vdotq_laneq_s32(L, (W)[0].lo, X, 0), H = vdotq_laneq_s32(H, (W)[0].hi, X, 0);             \
        L = vdotq_laneq_s32(L, (W)[1].lo, X, 1), H = vdotq_laneq_s32(H, (W)[1].hi, X, 1);             \
        L = vdotq_laneq_s32(L, (W)[2].lo, X, 2), H = vdotq_laneq_s32(H, (W)[2].hi, X, 2);             \
        L = vdotq_laneq_s32(L, (W)[3].lo, X, 3), H = vdotq_laneq_s32(H, (W)[3].hi, X, 3);             \
    } while (0)

/* sdot takes signed bytes: the unsigned quants (at most 5 bits) are the same bytes, the sums in int32 */
static inline isum sums_q4(const qv *w, const int8_t *xb) {
    const int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16);
    int32x4_t lo = vdupq_n_s32(0), hi = vdupq_n_s32(0);
    DOT_HALF(w, x0, lo, hi);
    DOT_HALF(w + 4, x1, lo, hi);
    return (isum){lo, hi};
}
#define sums_q5 sums_q4

static inline isum sums_q8(const uint8_t *q, const int8_t *xb) {
    qv w[8];
    for (int k = 0; k < 8; k++)
        w[k] = (qv){vld1q_s8((const int8_t *)q + 32 * k), vld1q_s8((const int8_t *)q + 32 * k + 16)};
    return sums_q4(w, xb);
}

static inline isum sums_q6(const qv *w, const int8_t *xb, const int32_t *sc) {
    const int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16);
    int32x4_t alo = vdupq_n_s32(0), ahi = vdupq_n_s32(0), blo = vdupq_n_s32(0), bhi = vdupq_n_s32(0);
    DOT_HALF(w, x0, alo, ahi);
    DOT_HALF(w + 4, x1, blo, bhi);
    return (isum){vmlaq_s32(vmulq_s32(alo, vld1q_s32(sc)), blo, vld1q_s32(sc + ROWS)),
                  vmlaq_s32(vmulq_s32(ahi, vld1q_s32(sc + 4)), bhi, vld1q_s32(sc + ROWS + 4))};
}

static inline void unpack_iq4(const uint8_t *q, qv *out) {
    unpack_q4(q, out);
    const int8x16_t lut = vld1q_s8(IQ4_VALUES);
    for (int k = 0; k < 8; k++)
        out[k] = (qv){vqtbl1q_s8(lut, vreinterpretq_u8_s8(out[k].lo)), vqtbl1q_s8(lut, vreinterpretq_u8_s8(out[k].hi))};
}
#define sums_iq4 sums_q4
#endif

/* x's block at element `at` (32 values of x, act) rounded as quantize_block (i16: quantize_block16, the hi and lo
 * halves at q and q + 32) of common.h: the same values on vectors (the conversions round to nearest even, as
 * nearbyintf; hi as q / 255 to the nearest integer, which is never a tie, so that q times a float 1 / 255 rounds to it
 * too: the product's error (< 1e-5) is far below the 1 / 510 to the nearest half). Returns the scale; q_sum and
 * half_sum get the sums of q and of its first 16. */
static inline float quantize_x(const void *x, size_t at, int act, int i16, int8_t *q, int *q_sum, int *half_sum) {
#if defined(__AVX2__)
    __m256 v[4], mx = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int k = 0; k < 4; k++) {
        v[k] = act == ACT_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                     _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + at + 8 * k))), 16))
                               : _mm256_loadu_ps((const float *)x + at + 8 * k);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[k], abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float scale = amax / (i16 ? 32512.0f : 127.0f), inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    __m256i qi[4], hi[4], lo[4];
    for (int k = 0; k < 4; k++) {
        qi[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(inv)));
        hi[k] = i16 ? _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(qi[k]), _mm256_set1_ps(1.0f / 255.0f))) : qi[k];
        lo[k] = _mm256_sub_epi32(qi[k], _mm256_mullo_epi32(hi[k], _mm256_set1_epi32(255)));
    }
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* the packs' 4-byte runs back in order */
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(hi[0], hi[1]),
                                                                                     _mm256_packs_epi32(hi[2], hi[3])),
                                                                  order));
    if (i16)
        _mm256_storeu_si256((__m256i *)(q + BLOCK),
                            _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(lo[0], lo[1]),
                                                                           _mm256_packs_epi32(lo[2], lo[3])),
                                                        order));
    const __m256i h = _mm256_add_epi32(qi[0], qi[1]), all = _mm256_add_epi32(h, _mm256_add_epi32(qi[2], qi[3]));
    int32_t hs[8], as[8];
    _mm256_storeu_si256((__m256i *)hs, h);
    _mm256_storeu_si256((__m256i *)as, all);
    *half_sum = *q_sum = 0;
    for (int i = 0; i < 8; i++) *half_sum += hs[i], *q_sum += as[i];
    return scale;
#else
    float xf[BLOCK];
    for (int i = 0; i < BLOCK; i++) xf[i] = load_act(x, at + i, act);
    if (i16) return quantize_block16(xf, q, q + BLOCK, q_sum, half_sum);
    const float scale = quantize_block(xf, q, q_sum);
    *half_sum = 0;
    for (int i = 0; i < 16; i++) *half_sum += q[i];
    return scale;
#endif
}

/* The next groups' weights (their quants, scales and offsets: three runs of cache lines), prefetched a slice per block
 * while this group's (or n-tile's) products run: a thread's groups are read one after the other, and without it each
 * one's widening waited on its loads while the products that came before had left the memory idle (measured: a
 * 16-row SmolLM2 Q4_0 step spent 19% of its time in those loads). */
typedef struct {
    const char *at[3];
    size_t lines[3];
    size_t slice[3]; /* lines a block: lines / nb rounded up (no division in the block loop) */
} next_lines;

/* slice b (of the nb blocks next_groups split the lines into) of the next groups' lines */
INLINE void prefetch_slice(const next_lines *s, int b) {
    for (int r = 0; r < 3 && s; r++) {
        const size_t end = s->slice[r] * (b + 1) < s->lines[r] ? s->slice[r] * (b + 1) : s->lines[r];
        for (size_t l = s->slice[r] * b; l < end; l++) __builtin_prefetch(s->at[r] + l * 64, 0, 3);
    }
}

/* A group of 8 weight rows made ready for the dot products: quants widened to bytes (nb * 8 vectors; Q8_0's read in
 * place from q8), per block the rows' float scales dv (nb, 8) and offsets mv (no, 8: per block, or per half of 16
 * for Q2_K), and the integer half scales sc (nb, 2, 8) of Q6_K, Q3_K and Q2_K */
typedef struct {
    const qv *w;
    const uint8_t *q8;
    const float *dv, *mv;
    const int32_t *sc;
    int no;
    const next_lines *next; /* the next group's lines, prefetched as the blocks go (or NULL) */
} group;

/* one block's sums of a group against the activation block xb (32 int8) */
static inline __attribute__((always_inline)) isum block_sums(group g, int b, const int8_t *xb, const int WIDE) {
    return WIDE == WIDE_U4    ? sums_q4(g.w + (size_t)b * 8, xb)
           : WIDE == WIDE_U5  ? sums_q5(g.w + (size_t)b * 8, xb)
           : WIDE == WIDE_Q6  ? sums_q6(g.w + (size_t)b * 8, xb, g.sc + (size_t)b * 2 * ROWS)
           : WIDE == WIDE_IQ4 ? sums_iq4(g.w + (size_t)b * 8, xb)
                              : sums_q8(g.q8 + (size_t)b * ROWS * BLOCK, xb);
}

/* MT activation rows against one group -> out (MT, 8). xq, xs, xt: the rows' int8 blocks (PLANES 2, int16 mode: each
 * block's hi then lo halves), scales and scale * sum q. MT, WIDE and PLANES are constants where this is inlined, so
 * the accumulators live in registers. */
static inline __attribute__((always_inline)) void group_rows(group g, int nb, const int8_t *xq, const float *xs,
                                                            const float *xt, float *out, const int MT, const int WIDE,
                                                            const int PLANES) {
    f8 acc[MT], off[MT];
    _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) acc[i] = off[i] = F8_ZERO;
    for (int b = 0; b < nb; b++) {
        const f8 db = f8_load(g.dv + (size_t)b * ROWS);
        prefetch_slice(g.next, b);
        _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) {
            const size_t at = (size_t)i * nb + b;
            const int8_t *xb = xq + at * BLOCK * PLANES;
            const isum s = block_sums(g, b, xb, WIDE);
            if (PLANES == 2) acc[i] = f8_scale_fma_f(i16_sum(s, block_sums(g, b, xb + BLOCK, WIDE)), db, xs[at], acc[i]);
            else acc[i] = f8_scale_fma(s, db, xs[at], acc[i]);
        }
    }
    if (g.mv) /* the offsets' term in its own pass, so that the loop above keeps only acc in registers */
        for (int b = 0; b < g.no; b++) {
            const f8 mb = f8_load(g.mv + (size_t)b * ROWS);
            _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) off[i] = f8_fma(mb, xt[(size_t)i * g.no + b], off[i]);
        }
    _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) {
        float a[ROWS], o[ROWS];
        f8_store(a, acc[i]);
        f8_store(o, off[i]);
        for (int r = 0; r < ROWS; r++) out[i * ROWS + r] = a[r] + o[r];
    }
}

/* the widened form of a kind, and the bytes of one block of 8 rows in the interleaved qs */
static int wide_form(int kind) {
    switch (kind) {
    case QKIND_Q4: case QKIND_Q4_K: return WIDE_U4;
    case QKIND_Q5_0: case QKIND_Q5_1: case QKIND_Q5_K: return WIDE_U5;
    case QKIND_Q6_K: case QKIND_Q3_K: case QKIND_Q2_K: return WIDE_Q6;
    case QKIND_IQ4: return WIDE_IQ4;
    default: return WIDE_S8;
    }
}

/* the kinds whose weights carry an offset per block (or half): w = d' q + m' */
static int has_offsets(int kind) {
    return kind == QKIND_Q4 || kind == QKIND_Q5_0 || kind == QKIND_Q5_1 || kind == QKIND_Q4_K || kind == QKIND_Q5_K ||
           kind == QKIND_Q2_K;
}

static size_t block_bytes(int kind) {
    switch (kind) {
    case QKIND_Q4: case QKIND_Q4_K: case QKIND_IQ4: return ROWS * 16;
    case QKIND_Q5_0: case QKIND_Q5_1: case QKIND_Q5_K: return ROWS * 20;
    case QKIND_Q6_K: return ROWS * 24;
    case QKIND_Q2_K: return ROWS * 8;
    case QKIND_Q3_K: return ROWS * 12;
    default: return ROWS * 32;
    }
}

/* the bytes a group of 8 rows' scales (d) and offsets or sub-block scales (m) take for nb blocks (common.h's layouts) */
static void group_scale_bytes(int kind, int nb, size_t *db, size_t *mb) {
    const size_t n = (size_t)nb, nsb = n / 8;
    switch (kind) {
    case QKIND_Q4: case QKIND_Q5_1: *db = *mb = n * ROWS * 2; break;
    case QKIND_Q8: case QKIND_Q5_0: *db = n * ROWS * 2, *mb = 0; break;
    case QKIND_IQ4: *db = n * ROWS * 4, *mb = 0; break;
    case QKIND_Q4_K: case QKIND_Q5_K: case QKIND_Q2_K: *db = nsb * 2 * ROWS * 4, *mb = nsb * 16 * ROWS; break;
    default: *db = nsb * ROWS * 4, *mb = nsb * 16 * ROWS; break; /* Q6_K, Q3_K */
    }
}

/* s <- the runs of groups g .. g + count - 1 (of G; none past the last) */
static void next_groups(next_lines *s, int kind, const uint8_t *qs, const void *d, const void *m, int nb, int G, int g,
                        int count) {
    memset(s, 0, sizeof *s);
    if (g >= G) return;
    const size_t groups = g + count <= G ? (size_t)count : (size_t)(G - g);
    size_t db, mb;
    group_scale_bytes(kind, nb, &db, &mb);
    const size_t bytes[3] = {(size_t)nb * block_bytes(kind), db, mb};
    const char *base[3] = {(const char *)qs, (const char *)d, (const char *)m};
    for (int r = 0; r < 3; r++)
        if (base[r] && bytes[r]) {
            s->at[r] = base[r] + (size_t)g * bytes[r];
            s->lines[r] = (groups * bytes[r] + 63) / 64;
            s->slice[r] = (s->lines[r] + nb - 1) / nb;
        }
}


/* group gi's scales: dv (nb, 8), mv (nb, 8; Q2_K (nb, 2, 8)) floats and, for Q6_K, Q3_K and Q2_K, sc (nb, 2, 8)
 * int32, from its kind's interleaved d and m (common.h, k_qmatmul_kind): the products d sc_j and dmin mn_j are exact
 * in fp32, so these are the weights' own */
static void widen_scales(int kind, const void *d, const void *m, size_t gi, int nb, float *dv, float *mv,
                         int32_t *sc) {
    const int nsb = nb / 8;
    switch (kind) {
    case QKIND_Q4: case QKIND_Q5_1:
        for (int b = 0; b < nb; b++) {
            halves8((const uint16_t *)d + (gi * nb + b) * ROWS, dv + (size_t)b * ROWS);
            halves8((const uint16_t *)m + (gi * nb + b) * ROWS, mv + (size_t)b * ROWS);
        }
        break;
    case QKIND_Q8: case QKIND_Q5_0:
        for (int b = 0; b < nb; b++) halves8((const uint16_t *)d + (gi * nb + b) * ROWS, dv + (size_t)b * ROWS);
        if (kind == QKIND_Q5_0)
            for (size_t i = 0; i < (size_t)nb * ROWS; i++) mv[i] = -16.0f * dv[i]; /* w = d (q - 16): exact */
        break;
    case QKIND_IQ4: /* d (G, K/32, 8) fp32 */
        memcpy(dv, (const float *)d + gi * nb * ROWS, sizeof(float) * (size_t)nb * ROWS);
        break;
    case QKIND_Q4_K: case QKIND_Q5_K: /* d (G, nsb, 2, 8) [d, dmin], m (G, nsb, 16, 8) [8 scales, 8 mins] */
        for (int s = 0; s < nsb; s++) {
            const float *ds = (const float *)d + (gi * nsb + s) * 2 * ROWS;
            const uint8_t *ms = (const uint8_t *)m + (gi * nsb + s) * 16 * ROWS;
            for (int j = 0; j < 8; j++) { /* d sc_j, -(dmin mn_j) of the 8 rows */
                scale8(ds, ms + j * ROWS, dv + (size_t)(s * 8 + j) * ROWS, 0);
                scale8(ds + ROWS, ms + (8 + j) * ROWS, mv + (size_t)(s * 8 + j) * ROWS, 1);
            }
        }
        break;
    case QKIND_Q2_K: /* d (G, nsb, 2, 8) [d, dmin], m (G, nsb, 16, 8) uint8 sc | mn << 4 per 16 quants */
        for (int s = 0; s < nsb; s++) {
            const float *ds = (const float *)d + (gi * nsb + s) * 2 * ROWS;
            const uint8_t *ms = (const uint8_t *)m + (gi * nsb + s) * 16 * ROWS;
            for (int j = 0; j < 8; j++)
                for (int r = 0; r < ROWS; r++) {
                    dv[(s * 8 + j) * ROWS + r] = ds[r];
                    for (int h = 0; h < 2; h++) {
                        const uint8_t byte = ms[(2 * j + h) * ROWS + r];
                        sc[((s * 8 + j) * 2 + h) * ROWS + r] = byte & 0x0F;
                        mv[((s * 8 + j) * 2 + h) * ROWS + r] = -(ds[ROWS + r] * (float)(byte >> 4));
                    }
                }
        }
        break;
    default: /* QKIND_Q6_K, QKIND_Q3_K: d (G, nsb, 8), m (G, nsb, 16, 8) int8, the scale of each 16 quants */
        for (int s = 0; s < nsb; s++) {
            const float *ds = (const float *)d + (gi * nsb + s) * ROWS;
            const int8_t *ms = (const int8_t *)m + (gi * nsb + s) * 16 * ROWS;
            for (int j = 0; j < 8; j++) memcpy(dv + (size_t)(s * 8 + j) * ROWS, ds, sizeof(float) * ROWS);
            for (int h = 0; h < 16; h++) widen8(ms + h * ROWS, sc + (size_t)(s * 16 + h) * ROWS); /* as stored */
        }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define I8_ZMM 1
/* An n-tile of 16 weight rows (groups 2 nt and 2 nt + 1; past G the first again, its results never stored) made
 * ready for the AMX tiles or the 512-bit vector path below: wb (nb, 8, 64) per block 8 rows of 64 bytes, row k
 * quants 4k..4k+3 of the 16 weight rows (the first group's 32 bytes, then the second's); with flip, the signed
 * kinds' quants plus 128 (unsigned bytes for vpdpbusd, which takes unsigned by signed bytes); d16 (nb, 16), m16
 * (no, 16), sc16 (nb, 2, 16) the two groups' scales side by side. Per thread: the n-tile's scratch (and the tiles' C sums and results). */
typedef struct {
    int8_t *wb;
    float *dv, *d16, *m16;
    int32_t *sc, *sc16, *cbuf;
    float *out;
} ntile;

/* one thread's n-tile scratch in one allocation (t->wb; NULL when out of memory) */
static void ntile_alloc(ntile *t, int nb) {
    /* floats and int32 after wb: dv, mv of both groups (2 nf), d16 (16 nb), m16 (32 nb), sc of both groups, sc16 (32 nb
     * each), cbuf (2 x 1024), out (256) */
    const size_t nw = (size_t)nb * 512, nf = (size_t)nb * ROWS * 3;
    memset(t, 0, sizeof *t);
    t->wb = aligned_alloc(64, nw + 4 * (2 * nf + 112 * (size_t)nb + 2304));
    if (!t->wb) return;
    t->dv = (float *)(t->wb + nw), t->d16 = t->dv + 2 * nf, t->m16 = t->d16 + (size_t)nb * 16;
    t->sc = (int32_t *)(t->m16 + (size_t)nb * 32), t->sc16 = t->sc + (size_t)nb * 32, t->cbuf = t->sc16 + (size_t)nb * 32;
    t->out = (float *)(t->cbuf + 2048);
}

/* one block of 8 rows' quants (qb) widened to 8 vectors (vector k: quants 4k..4k+3 of each row) */
static inline void widen_block(int kind, int wide, const uint8_t *qb, qv *v) {
    if (wide == WIDE_U4) unpack_q4(qb, v);
    else if (wide == WIDE_U5) unpack_q5(qb, v);
    else if (wide == WIDE_IQ4) unpack_iq4(qb, v);
    else if (kind == QKIND_Q2_K) unpack_q2(qb, v);
    else if (kind == QKIND_Q3_K) unpack_q3(qb, v);
    else if (wide == WIDE_Q6) unpack_q6(qb, v);
    else
        for (int k = 0; k < 8; k++) v[k] = qv_load(qb + 32 * k); /* Q8_0: as stored */
}

/* Two groups' blocks widened at once, on 512-bit vectors: w[k] = the first group's vector k (widen_block's) in the
 * low 256 bits, the second's in the high; with flip the signed kinds' quants plus 128 (as ntile_prepare's rows).
 * Each 32-byte run of the two groups comes in one vector, so a 4-bit block's 8 vectors for 16 rows take 4 loads
 * and 12 operations (widen_block twice and the inserts: 40); the 5-bit kinds' fifth bits (Q5_0, Q5_1, Q5_K) one
 * more load and 24 (against 88). Q2_K and Q3_K widen each group on 256 bits and join them. b: the second group's
 * block, or a again past the last group (its results are never stored). */
INLINE __m512i pair_load(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

INLINE void pair_q4(const uint8_t *a, const uint8_t *b, __m512i *w) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int k = 0; k < 4; k++) {
        const __m512i v = pair_load(a + 32 * k, b + 32 * k);
        w[k] = _mm512_and_si512(v, mask);
        w[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }
}

/* the 5-bit kinds' fifth bits (add_bits' on 512 bits: the two groups' runs of 32 bytes side by side, each 128-bit lane
 * 4 rows' uint32) as 16 into w */
INLINE void pair_fifth_bits(const uint8_t *a, const uint8_t *b, __m512i *w) {
    const __m512i run = pair_load(a, b), sixteen = _mm512_set1_epi8(16);
    for (int k = 0; k < 8; k++) {
        const char c = (char)(k / 2);
        const __m512i pick = _mm512_broadcast_i32x4(_mm_setr_epi8(c, c, c, c, 4 + c, 4 + c, 4 + c, 4 + c, 8 + c, 8 + c,
                                                                  8 + c, 8 + c, 12 + c, 12 + c, 12 + c, 12 + c));
        const __m512i bit = _mm512_set1_epi32((int)(0x08040201u << (4 * (k % 2))));
        const __mmask64 set = _mm512_test_epi8_mask(_mm512_shuffle_epi8(run, pick), bit);
        w[k] = _mm512_mask_add_epi8(w[k], set, w[k], sixteen);
    }
}

INLINE void widen_pair(int kind, int wide, int flip, const uint8_t *a, const uint8_t *b, __m512i *w) {
    const int flipped = flip && (wide == WIDE_S8 || wide == WIDE_IQ4 || wide == WIDE_Q6);
    const __m512i bias = _mm512_set1_epi8(flipped ? (char)0x80 : 0);
    if (wide == WIDE_U4) {
        pair_q4(a, b, w);
    } else if (wide == WIDE_U5) { /* q = low | fifth << 4 (unpack_q5) */
        pair_q4(a, b, w);
        pair_fifth_bits(a + 128, b + 128, w);
    } else if (wide == WIDE_S8) { /* Q8_0: as stored */
        for (int k = 0; k < 8; k++) w[k] = _mm512_xor_si512(pair_load(a + 32 * k, b + 32 * k), bias);
    } else if (wide == WIDE_IQ4) {
        pair_q4(a, b, w);
        const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)IQ4_VALUES));
        for (int k = 0; k < 8; k++) w[k] = _mm512_xor_si512(_mm512_shuffle_epi8(lut, w[k]), bias);
    } else if (wide == WIDE_Q6 && kind != QKIND_Q2_K && kind != QKIND_Q3_K) { /* Q6_K, as unpack_q6 */
        pair_q4(a, b, w);
        /* q - 32, then plus 128 where flipped: q + 96 (bytes wrap as the xor does) */
        const __m512i m2 = _mm512_set1_epi8(3), off = _mm512_set1_epi8(flipped ? 96 : -32);
        const __m512i h[2] = {pair_load(a + 128, b + 128), pair_load(a + 160, b + 160)};
        for (int k = 0; k < 8; k++) {
            const __m512i high = _mm512_and_si512(_mm512_srli_epi16(h[k % 2], 2 * (k / 2)), m2);
            w[k] = _mm512_add_epi8(_mm512_or_si512(w[k], _mm512_slli_epi16(high, 4)), off);
        }
    } else {
        qv lo[8], hi[8];
        widen_block(kind, wide, a, lo);
        widen_block(kind, wide, b, hi);
        for (int k = 0; k < 8; k++)
            w[k] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo[k]), hi[k], 1), bias);
    }
}

/* 8 of each group's values side by side: fp16 -> 16 floats, 8 floats each, 8 bytes each -> 16 int32 (sign- or
 * zero-extended) */
INLINE __m512 pair_halves(const uint16_t *a, const uint16_t *b) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                   _mm_loadu_si128((const __m128i *)b), 1));
}
INLINE __m512 pair_floats(const float *a, const float *b) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(a))),
                                               _mm256_castps_pd(_mm256_loadu_ps(b)), 1));
}
INLINE __m128i pair_bytes(const void *a, const void *b) {
    return _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)a), _mm_loadl_epi64((const __m128i *)b));
}

/* The n-tile's scales straight into d16, m16, sc16 from groups ga and gb, with widen_scales' float operations on 16
 * lanes (each product rounded once, the same values); 0 for Q2_K (widen_scales per group, then copied side by side) */
static int pair_scales(const ntile *t, int kind, const void *d, const void *m, size_t ga, size_t gb, int nb) {
    const size_t nsb = (size_t)nb / 8;
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u); /* (an integer xor: AVX512DQ's is not in every build) */
    switch (kind) {
    case QKIND_Q4: case QKIND_Q5_1: case QKIND_Q8: case QKIND_Q5_0: /* d, m (G, nb, 8) fp16 */
        for (size_t b = 0; b < (size_t)nb; b++) {
            const __m512 dv =
                pair_halves((const uint16_t *)d + (ga * nb + b) * ROWS, (const uint16_t *)d + (gb * nb + b) * ROWS);
            _mm512_storeu_ps(t->d16 + b * 16, dv);
            if (kind == QKIND_Q5_0) _mm512_storeu_ps(t->m16 + b * 16, _mm512_mul_ps(_mm512_set1_ps(-16.0f), dv));
            else if (kind != QKIND_Q8)
                _mm512_storeu_ps(t->m16 + b * 16, pair_halves((const uint16_t *)m + (ga * nb + b) * ROWS,
                                                              (const uint16_t *)m + (gb * nb + b) * ROWS));
        }
        return 1;
    case QKIND_IQ4: /* d (G, nb, 8) fp32 */
        for (size_t b = 0; b < (size_t)nb; b++)
            _mm512_storeu_ps(t->d16 + b * 16, pair_floats((const float *)d + (ga * nb + b) * ROWS,
                                                          (const float *)d + (gb * nb + b) * ROWS));
        return 1;
    case QKIND_Q4_K: case QKIND_Q5_K: /* d (G, nsb, 2, 8) [d, dmin], m (G, nsb, 16, 8) [8 scales, 8 mins] */
        for (size_t s = 0; s < nsb; s++) {
            const float *da = (const float *)d + (ga * nsb + s) * 2 * ROWS;
            const float *db = (const float *)d + (gb * nsb + s) * 2 * ROWS;
            const uint8_t *ma = (const uint8_t *)m + (ga * nsb + s) * 16 * ROWS;
            const uint8_t *mb = (const uint8_t *)m + (gb * nsb + s) * 16 * ROWS;
            const __m512 dd = pair_floats(da, db), dmin = pair_floats(da + ROWS, db + ROWS);
            for (int j = 0; j < 8; j++) { /* d sc_j, -(dmin mn_j) */
                const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(pair_bytes(ma + j * ROWS, mb + j * ROWS)));
                const __m512 mn =
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(pair_bytes(ma + (8 + j) * ROWS, mb + (8 + j) * ROWS)));
                _mm512_storeu_ps(t->d16 + (s * 8 + j) * 16, _mm512_mul_ps(dd, sc));
                _mm512_storeu_si512(t->m16 + (s * 8 + j) * 16,
                                    _mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(dmin, mn)), sign));
            }
        }
        return 1;
    case QKIND_Q6_K: case QKIND_Q3_K: /* d (G, nsb, 8), m (G, nsb, 16, 8) int8, the scale of each 16 quants */
        for (size_t s = 0; s < nsb; s++) {
            const __m512 dd =
                pair_floats((const float *)d + (ga * nsb + s) * ROWS, (const float *)d + (gb * nsb + s) * ROWS);
            const int8_t *ma = (const int8_t *)m + (ga * nsb + s) * 16 * ROWS;
            const int8_t *mb = (const int8_t *)m + (gb * nsb + s) * 16 * ROWS;
            for (int j = 0; j < 8; j++) _mm512_storeu_ps(t->d16 + (s * 8 + j) * 16, dd);
            for (int h = 0; h < 16; h++) /* half h % 2 of block 8 s + h / 2 */
                _mm512_storeu_si512(t->sc16 + (s * 16 + h) * 16,
                                    _mm512_cvtepi8_epi32(pair_bytes(ma + h * ROWS, mb + h * ROWS)));
        }
        return 1;
    default:
        return 0;
    }
}

/* quants: also widen the quants into wb (else the scales only: the quants are widened where they are used) */
static void ntile_prepare(const ntile *t, int kind, int wide, int flip, int quants, const uint8_t *qs, const void *d,
                          const void *m, int nb, int no, int G, int nt, int offsets) {
    const size_t nf = (size_t)nb * ROWS * 3, group_bytes = (size_t)nb * block_bytes(kind);
    const size_t ga = (size_t)2 * nt, gb = ga + 1 < (size_t)G ? ga + 1 : ga; /* (past G: never stored) */
    const uint8_t *qa = qs + ga * group_bytes, *qb = qs + gb * group_bytes;
    for (int b = 0; b < nb && quants; b++) {
        __m512i w[8]; /* in registers, stored once into the n-tile's rows */
        const size_t at = (size_t)b * block_bytes(kind);
        widen_pair(kind, wide, flip, qa + at, qb + at, w);
        for (int k = 0; k < 8; k++) _mm512_store_si512(t->wb + (size_t)b * 512 + k * 64, w[k]);
    }
    if (pair_scales(t, kind, d, m, ga, gb, nb)) return;
    const int halves = wide == WIDE_Q6;
    for (int h = 0; h < 2; h++) { /* each group's, then side by side: lanes 0..7 the first group's rows */
        widen_scales(kind, d, m, h ? gb : ga, nb, t->dv + h * nf, t->dv + h * nf + (size_t)nb * ROWS,
                     t->sc + (size_t)h * nb * 16);
        for (int b = 0; b < nb; b++) {
            memcpy(t->d16 + (size_t)b * 16 + 8 * h, t->dv + h * nf + (size_t)b * ROWS, sizeof(float) * ROWS);
            for (int j = 0; j < 2 && halves; j++)
                memcpy(t->sc16 + (size_t)b * 32 + 16 * j + 8 * h, t->sc + (size_t)h * nb * 16 + ((size_t)b * 2 + j) * ROWS,
                       sizeof(int32_t) * ROWS);
        }
        for (int o = 0; o < no && offsets; o++)
            memcpy(t->m16 + (size_t)o * 16 + 8 * h, t->dv + h * nf + (size_t)nb * ROWS + (size_t)o * ROWS,
                   sizeof(float) * ROWS);
    }
}

/* an n-tile's two groups' quants as stored (q[1] = q[0] past the last group), to widen block by block where used */
typedef struct {
    const uint8_t *q[2];
    size_t bytes; /* a block's */
    int kind, wide;
} quant_pair;

/* A block's sum of the kinds with halves (Q6_K, Q3_K, Q2_K) from its halves' integer sums lo, hi and their integer
 * scales sl, sh (as floats): lo sl + hi sh on floats, not in int32 (vpmulld: two uops on one port, 10 cycles). The
 * same value bit for bit: |q| <= 127 activations by |w| <= 32 quants, 16 to a half, by |sc| <= 128 make each product
 * at most 2^23 and the sum below 2^24, so the product and the FMA are exact and equal the int32 sum converted (as
 * the 256-bit path's). Measured, 16-row Q6_K matmuls on the tiles: 15-19% faster. */
INLINE __m512 halves_sum(__m512i lo, __m512i hi, __m512 sl, __m512 sh) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), sh, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), sl));
}

/* The 512-bit vector path (where the build has AVX512-VNNI): an n-tile's 16 weight rows at once, in the lanes of one
 * vector (twice the 256-bit path's products an instruction). Per block and x row, vpdpbusd of the n-tile's rows
 * (unsigned) by 4 of the row's int8 x broadcast gives the 16 block sums; the signed kinds' quants come plus 128, so
 * their sums start at -128 times the x block's sum (each half's, for the kinds with halves): the same exact integers
 * as the 256-bit path's. From there every float operation is group_rows' in its order, on 16 lanes. MT x rows (xq
 * their first row's blocks, nb * planes * 32 bytes a row; xs, xt the rows' scales and scale * sum q; xh (MT, nb,
 * planes, 2) the halves' sums of x, for the signed kinds) -> out (MT, 16). */
INLINE void zmm_rows(const int planes, const int wide, const int MT, int nb, int no, const int8_t *xq, const float *xs,
                     const float *xt, const int32_t *xh, const ntile *t, const float *m16, const quant_pair *direct,
                     const next_lines *next, float *out) {
    const int halves = wide == WIDE_Q6, flipped = wide == WIDE_S8 || wide == WIDE_IQ4 || halves;
    const size_t stride = (size_t)nb * planes * BLOCK;
    __m512 acc[MT], off[MT];
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++) acc[i] = off[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i w[8];
        prefetch_slice(next, b);
        if (direct) { /* the two groups' block b widened here, in registers (ntile_prepare's rows) */
            const size_t at = (size_t)b * direct->bytes;
            widen_pair(direct->kind, direct->wide, 1, direct->q[0] + at, direct->q[1] + at, w);
        } else {
            const int8_t *wr = t->wb + (size_t)b * 512;
            for (int k = 0; k < 8; k++) w[k] = _mm512_load_si512(wr + 64 * k);
        }
        const __m512 db = _mm512_load_ps(t->d16 + (size_t)b * 16);
        const __m512 sl = halves ? _mm512_cvtepi32_ps(_mm512_load_si512(t->sc16 + (size_t)b * 32)) : _mm512_setzero_ps();
        const __m512 sh = halves ? _mm512_cvtepi32_ps(_mm512_load_si512(t->sc16 + (size_t)b * 32 + 16)) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int i = 0; i < MT; i++) {
            __m512 s[2];
            for (int p = 0; p < planes; p++) {
                const int8_t *xb = xq + (size_t)i * stride + ((size_t)b * planes + p) * BLOCK;
                const int32_t *c = xh + (((size_t)i * nb + b) * planes + p) * 2; /* the halves' sums of x */
                __m512i lo = flipped ? _mm512_set1_epi32(-128 * (halves ? c[0] : c[0] + c[1])) : _mm512_setzero_si512();
                __m512i hi = flipped && halves ? _mm512_set1_epi32(-128 * c[1]) : _mm512_setzero_si512();
                for (int k = 0; k < 4; k++) {
                    int32_t f0, f1;
                    memcpy(&f0, xb + 4 * k, 4);
                    memcpy(&f1, xb + 16 + 4 * k, 4);
                    lo = _mm512_dpbusd_epi32(lo, w[k], _mm512_set1_epi32(f0));
                    hi = _mm512_dpbusd_epi32(hi, w[4 + k], _mm512_set1_epi32(f1));
                }
                s[p] = halves ? halves_sum(lo, hi, sl, sh) : _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
            }
            const __m512 v = planes == 2 ? _mm512_fmadd_ps(s[0], _mm512_set1_ps(255.0f), s[1]) : s[0];
            acc[i] = _mm512_fmadd_ps(v, _mm512_mul_ps(db, _mm512_set1_ps(xs[(size_t)i * nb + b])), acc[i]);
        }
    }
    for (int o = 0; o < no && m16; o++) {
        const __m512 mo = _mm512_load_ps(m16 + (size_t)o * 16);
#pragma GCC unroll 4
        for (int i = 0; i < MT; i++) off[i] = _mm512_fmadd_ps(mo, _mm512_set1_ps(xt[(size_t)i * no + o]), off[i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(out + 16 * i, _mm512_add_ps(acc[i], off[i]));
}

/* qmatmul_i8 on the 512-bit vector path, from the quantized x (xq (M, nb, planes, 32), xs (M, nb), xt (M, no)) */
static int zmm_i8(int kind, int wide, int planes, const int8_t *xq, const float *xs, const float *xt, int no,
                  const uint8_t *qs, const void *d, const void *m, const float *bias, void *y, int act, int M, int N,
                  int K, int nthreads) {
    const int nb = K / BLOCK, G = (N + ROWS - 1) / ROWS, ntiles = (G + 1) / 2, offsets = has_offsets(kind);
    const int form = wide == WIDE_Q6 ? WIDE_Q6 : wide == WIDE_S8 || wide == WIDE_IQ4 ? WIDE_S8 : WIDE_U4;
    const size_t nx = (size_t)M * nb * planes; /* x's int8 blocks */
    int32_t *xh = form != WIDE_U4 ? malloc(sizeof(int32_t) * nx * 2) : NULL; /* (M, nb, planes, 2) halves' sums */
    if (form != WIDE_U4 && !xh) return AIGC_ERR_NOMEM;
    for (size_t j = 0; xh && j < nx; j++) {
        int lo = 0, hi = 0;
        for (int e = 0; e < 16; e++) lo += xq[j * BLOCK + e], hi += xq[j * BLOCK + 16 + e];
        xh[2 * j] = lo, xh[2 * j + 1] = hi;
    }
    /* one tile of rows of a K-quant widens the quants as it goes; more rows, or other kinds, read them widened once
     * into t.wb (measured, whole model steps at 1 and 4 rows: a Qwen3-0.6B-shaped Q4_K_M 9% and 15% faster widening
     * as it goes, SmolLM2 Q4_K_M and Q6_K the same within noise, SmolLM2 Q4_1 8% slower) */
    const int direct = M <= 4 && qkind_block(kind) == 256;
    const size_t gb = (size_t)nb * block_bytes(kind);
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        ntile t;
        ntile_alloc(&t, nb);
        if (!t.wb) bad = 1;
#pragma omp for schedule(static)
        for (int nt = 0; nt < ntiles; nt++) {
            if (!t.wb) continue;
            const quant_pair pair = {{qs + (size_t)2 * nt * gb, qs + (size_t)(2 * nt + (2 * nt + 1 < G)) * gb},
                                     block_bytes(kind), kind, wide};
            ntile_prepare(&t, kind, wide, 1, !direct, qs, d, m, nb, no, G, nt, offsets);
            /* the next n-tile's lines while its quants are widened here (measured, 1-row steps: SmolLM2 Q4_K_M 7%,
             * a Qwen3-0.6B-shaped one 8% faster; where they were widened first, Q4_0 0.96-0.98x: not worked out) */
            next_lines next;
            if (direct) next_groups(&next, kind, qs, d, m, nb, G, 2 * nt + 2, 2);
            const int cols = N - nt * 16 < 16 ? N - nt * 16 : 16;
            for (int r0 = 0; r0 < M;) {
                const next_lines *ahead = direct && !r0 ? &next : NULL;
                const int left = M - r0, mt = left >= 4 ? 4 : left;
                const int8_t *xr = xq + (size_t)r0 * nb * planes * BLOCK;
                const float *xsr = xs + (size_t)r0 * nb, *xtr = xt + (size_t)r0 * no, *m16 = offsets ? t.m16 : NULL;
                const int32_t *xhr = xh ? xh + (size_t)r0 * nb * planes * 2 : NULL;
#define ZMM_ROWS(P, F, MT) \
    zmm_rows(P, F, MT, nb, no, xr, xsr, xtr, xhr, &t, m16, direct ? &pair : NULL, ahead, t.out)
#define ZMM_FORM(P, F)                                                                                     \
    case (P - 1) * 64 + 4 * 8 + F: ZMM_ROWS(P, F, 4); break;                                               \
    case (P - 1) * 64 + 3 * 8 + F: ZMM_ROWS(P, F, 3); break;                                               \
    case (P - 1) * 64 + 2 * 8 + F: ZMM_ROWS(P, F, 2); break;                                               \
    case (P - 1) * 64 + 1 * 8 + F: ZMM_ROWS(P, F, 1); break
                switch ((planes - 1) * 64 + mt * 8 + form) {
                    ZMM_FORM(1, WIDE_U4);
                    ZMM_FORM(1, WIDE_S8);
                    ZMM_FORM(1, WIDE_Q6);
                    ZMM_FORM(2, WIDE_U4);
                    ZMM_FORM(2, WIDE_S8);
                    ZMM_FORM(2, WIDE_Q6);
                }
#undef ZMM_FORM
#undef ZMM_ROWS
                for (int i = 0; i < mt; i++)
                    for (int c = 0; c < cols; c++) {
                        const int n = nt * 16 + c;
                        store_act(y, (size_t)(r0 + i) * N + n, t.out[i * 16 + c] + (bias ? bias[n] : 0.0f), act);
                    }
                r0 += mt;
            }
        }
        free(t.wb);
    }
    free(xh);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
#endif

#if defined(__AMX_INT8__) && defined(I8_ZMM)

/* AMX-INT8 tiles for the same sums (where the CPU has them, from AMX_I8_MIN_ROWS rows, int16 mode AMX_I16_MIN_ROWS): an n-tile of 16
 * weight rows (two groups) against x tiles of up to 16 rows. Per block, the tiles' B holds the two groups' widened
 * quants as they are (row k: quants 4k..4k+3 of the 16 weight rows, the first group's 32 bytes then the second's),
 * A the x rows' int8 block as quantized (a tile row per x row, read in place), and one product C = A B (x rows x 16
 * weight rows, int32) is each (x row, weight row)'s block sum I_b: the same exact integer as the vector path's (Q6_K,
 * Q3_K, Q2_K: a product per half of 16, then times the integer half scales; int16 mode: a product per int8 half of
 * x). From there every float operation is group_rows' in its order (kernels/common.h), on 16 lanes instead of 8: a
 * result is bit for bit the vector path's, so the tiles may take any batch size. */
#include "amx.h"

/* measured (AMX VM, 2 threads, 576 x 1536 and 1536 x 576 of Q4_1, Q4_K, Q6_K, Q8_0 against the 256-bit vector path):
 * int16 mode's tiles even at 6-16 rows, int8 mode's at 12-16; 1.3-2x faster at 512. Against the 512-bit vector path
 * (whole model steps, SmolLM2 Q4_1 / Q4_K_M / Q6_K / Q8_0 and a Qwen3-0.6B-shaped Q4_K_M, python -m
 * model_core.tools.step_times --batches 6,8,10,12,16): int16 mode's tiles 2-13% slower at 8 rows, even at 10-12
 * (Q8_0's 6% faster at 12), even to 13% faster at 16. */
#ifndef AMX_I8_MIN_ROWS
#define AMX_I8_MIN_ROWS 16
#endif
#ifndef AMX_I16_MIN_ROWS
#define AMX_I16_MIN_ROWS 10
#endif

static int amx_i8_ready(void) { return __builtin_cpu_supports("amx-int8") && amx_granted(); }

/* tiles 0..3: C (rows x 16 int32); 4, 5: A (rows x 32 bytes of x; halves: 16); 6, 7: B (8 x 64 bytes: 32 quants of
 * 16 weight rows; halves: 4 x 64, 16 quants) */
static void configure_i8_tiles(int rows, int halves) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = t < 6 ? rows : halves ? 4 : 8;
        c.colsb[t] = t >= 4 && t < 6 ? (halves ? 16 : 32) : 64;
    }
    _tile_loadconfig(&c);
}

/* block j's sums as stored from the C tiles (cj: the hi (or only) plane's (16, 16) int32, the lo plane's 512 further;
 * halves: quants 0..15 then 16..31 of each, 256 apart) into acc[i] for the mr x rows: group_rows' float operations in
 * its order (kernels/common.h), on 16 lanes */
INLINE void scale_block(const int planes, const int halves, const int mr, const int32_t *cj, const float *d16j,
                        const int32_t *sc16j, const float *xsj, int nb, __m512 *acc) {
    const __m512 db = _mm512_load_ps(d16j);
    const __m512 sl = halves ? _mm512_cvtepi32_ps(_mm512_load_si512(sc16j)) : _mm512_setzero_ps();
    const __m512 sh = halves ? _mm512_cvtepi32_ps(_mm512_load_si512(sc16j + 16)) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) {
        __m512 s[2];
        for (int p = 0; p < planes; p++) {
            const int32_t *c = cj + (size_t)512 * p + 16 * i;
            s[p] = halves ? halves_sum(_mm512_load_si512(c), _mm512_load_si512(c + 256), sl, sh)
                          : _mm512_cvtepi32_ps(_mm512_load_si512(c));
        }
        const __m512 v = planes == 2 ? _mm512_fmadd_ps(s[0], _mm512_set1_ps(255.0f), s[1]) : s[0];
        acc[i] = _mm512_fmadd_ps(v, _mm512_mul_ps(db, _mm512_set1_ps(xsj[(size_t)i * nb])), acc[i]);
    }
}

/* one x tile (mr rows; xq its first row's blocks, nb * planes * 32 bytes a row; xs, xt its rows' scales and scale *
 * sum q) against an n-tile: wb (nb, 8, 64) its B tiles, d16 (nb, 16), m16 (no, 16), sc16 (nb, 2, 16) its scales
 * -> out (mr, 16). planes, halves and (16 or not) mr are constants where it is inlined, so that acc stays in
 * registers. */
INLINE void i8_tile(const int planes, const int halves, const int mr, int nb, int no, const int8_t *xq,
                    const float *xs, const float *xt, const int8_t *wb, const float *d16, const float *m16,
                    const int32_t *sc16, const next_lines *next, int32_t *cbuf, float *out) {
    const size_t stride = (size_t)nb * planes * BLOCK;
    __m512 acc[16]; /* (every loop over them unrolled: one indexed at run time lives on the stack, and so did these,
                     * a load and a store around each FMA: measured, 16-row matmuls 3-5% slower) */
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
    if (!halves) {
        /* block b's products in C tiles b & 1 (its hi or only plane) and 2 + (b & 1) (lo) from B tile 6 + (b & 1),
         * stored while block b + 1's run and scaled while b + 2's do: no store waits for the product just issued,
         * no vector load for the store just made */
        for (int b = 0; b < nb + 2; b++) {
#define I8_PRODUCTS(C_HI, C_LO, B)                                 \
    do {                                                           \
        _tile_loadd(B, w, 64);                                     \
        _tile_loadd(4, xb, stride);                                \
        if (planes == 2) _tile_loadd(5, xb + BLOCK, stride);       \
        _tile_zero(C_HI);                                          \
        _tile_dpbssd(C_HI, 4, B);                                  \
        if (planes == 2) {                                         \
            _tile_zero(C_LO);                                      \
            _tile_dpbssd(C_LO, 5, B);                              \
        }                                                          \
    } while (0)
#define I8_STORE(C_HI, C_LO, cb)                                   \
    do {                                                           \
        _tile_stored(C_HI, cb, 64);                                \
        if (planes == 2) _tile_stored(C_LO, (cb) + 512, 64);       \
    } while (0)
            if (b < nb) {
                const int8_t *xb = xq + (size_t)b * planes * BLOCK, *w = wb + (size_t)b * 512;
                prefetch_slice(next, b);
                if (b & 1) I8_PRODUCTS(1, 3, 7);
                else I8_PRODUCTS(0, 2, 6);
            }
            if (b >= 1 && b <= nb) {
                int32_t *cb = cbuf + (size_t)((b - 1) & 1) * 1024;
                if ((b - 1) & 1) I8_STORE(1, 3, cb);
                else I8_STORE(0, 2, cb);
            }
#undef I8_PRODUCTS
#undef I8_STORE
            if (b >= 2) {
                const int j = b - 2;
                scale_block(planes, 0, mr, cbuf + (size_t)(j & 1) * 1024, d16 + (size_t)j * 16, NULL, xs + j, nb, acc);
            }
        }
    } else {
        /* halves of 16 quants (B 6, 7), a product each: C 0, 1 the hi (or only) plane's, C 2, 3 the lo's; block b's
         * stored right away and scaled while block b + 1's products run */
        for (int b = 0; b <= nb; b++) {
            if (b < nb) {
                const int8_t *xb = xq + (size_t)b * planes * BLOCK, *w = wb + (size_t)b * 512;
                int32_t *cb = cbuf + (size_t)(b & 1) * 1024;
                prefetch_slice(next, b);
                _tile_loadd(6, w, 64);
                _tile_loadd(7, w + 256, 64);
                for (int p = 0; p < planes; p++) {
                    _tile_loadd(4, xb + p * BLOCK, stride);
                    _tile_loadd(5, xb + p * BLOCK + 16, stride);
                    if (p) {
                        _tile_zero(2);
                        _tile_zero(3);
                        _tile_dpbssd(2, 4, 6);
                        _tile_dpbssd(3, 5, 7);
                        _tile_stored(2, cb + 512, 64);
                        _tile_stored(3, cb + 768, 64);
                    } else {
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_dpbssd(0, 4, 6);
                        _tile_dpbssd(1, 5, 7);
                        _tile_stored(0, cb, 64);
                        _tile_stored(1, cb + 256, 64);
                    }
                }
            }
            if (b >= 1) {
                const int j = b - 1;
                scale_block(planes, 1, mr, cbuf + (size_t)(j & 1) * 1024, d16 + (size_t)j * 16,
                            sc16 + (size_t)j * 32, xs + j, nb, acc);
            }
        }
    }
    /* the offsets: sum_o m16[o] xt[i, o] for each row in o's order, the rows' chains side by side */
    __m512 off[16];
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) off[i] = _mm512_setzero_ps();
    for (int o = 0; o < no && m16; o++) {
        const __m512 mo = _mm512_load_ps(m16 + (size_t)o * 16);
#pragma GCC unroll 16
        for (int i = 0; i < mr; i++) off[i] = _mm512_fmadd_ps(mo, _mm512_set1_ps(xt[(size_t)i * no + o]), off[i]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < mr; i++) _mm512_storeu_ps(out + 16 * i, _mm512_add_ps(acc[i], off[i]));
}

static void amx_i8_tile(int wide, int planes, int nb, int no, const int8_t *xq, const float *xs, const float *xt, int mr,
                        const int8_t *wb, const float *d16, const float *m16, const int32_t *sc16,
                        const next_lines *next, int32_t *cbuf, float *out) {
    const int halves = wide == WIDE_Q6;
#define I8_TILE(P, H, MR) i8_tile(P, H, MR, nb, no, xq, xs, xt, wb, d16, m16, sc16, next, cbuf, out)
    if (mr == 16) {
        if (planes == 2) halves ? I8_TILE(2, 1, 16) : I8_TILE(2, 0, 16);
        else halves ? I8_TILE(1, 1, 16) : I8_TILE(1, 0, 16);
    } else {
        if (planes == 2) halves ? I8_TILE(2, 1, mr) : I8_TILE(2, 0, mr);
        else halves ? I8_TILE(1, 1, mr) : I8_TILE(1, 0, mr);
    }
#undef I8_TILE
}

/* qmatmul_i8 on the tiles, from the quantized x (xq (Mp, nb, planes, 32), Mp = M rounded up to 16 past 16 rows, its
 * pad rows zero; xs (M, nb), xt (M, no)) */
static int amx_i8(int kind, int wide, int planes, const int8_t *xq, const float *xs, const float *xt, int no,
                  const uint8_t *qs, const void *d, const void *m, const float *bias, void *y, int act, int M, int N,
                  int K, int nthreads) {
    const int nb = K / BLOCK, G = (N + ROWS - 1) / ROWS, ntiles = (G + 1) / 2, offsets = has_offsets(kind);
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        ntile t; /* per thread: the n-tile's B tiles (its two groups' widened quants) and scales, the C tiles' sums */
        ntile_alloc(&t, nb);
        if (!t.wb) bad = 1;
        else configure_i8_tiles(M < 16 ? M : 16, wide == WIDE_Q6);
#pragma omp for schedule(static)
        for (int nt = 0; nt < ntiles; nt++) {
            if (!t.wb) continue;
            ntile_prepare(&t, kind, wide, 0, 1, qs, d, m, nb, no, G, nt, offsets);
            next_lines next;
            next_groups(&next, kind, qs, d, m, nb, G, 2 * nt + 2, 2);
            const int cols = N - nt * 16 < 16 ? N - nt * 16 : 16;
            for (int r0 = 0; r0 < M; r0 += 16) {
                const int mr = M - r0 < 16 ? M - r0 : 16;
                amx_i8_tile(wide, planes, nb, no, xq + (size_t)r0 * nb * planes * BLOCK, xs + (size_t)r0 * nb,
                            xt + (size_t)r0 * no, mr, (const int8_t *)t.wb, t.d16, offsets ? t.m16 : NULL, t.sc16,
                            r0 ? NULL : &next, t.cbuf, t.out);
                for (int i = 0; i < mr; i++)
                    for (int c = 0; c < cols; c++) {
                        const int n = nt * 16 + c;
                        store_act(y, (size_t)(r0 + i) * N + n, t.out[i * 16 + c] + (bias ? bias[n] : 0.0f), act);
                    }
            }
        }
        free(t.wb);
    }
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
#endif

#if defined(__AVX2__) && !defined(I8_ZMM)
/* int16 mode on the 256-bit path for the signed kinds (Q8_0, IQ4_NL, IQ4_XS, Q6_K, Q3_K): a block's sum as one integer
 * from the 16-bit activations themselves (x = 255 hi + lo; vpmaddwd of int16 pairs of x and of the weights) instead of
 * a sum per int8 plane (whose signed products take two signs, a maddubs and a widening every 4 quants). Over 32 quants,
 * |x| <= 32512 by |w| <= 128, the sum stays far below 2^31, and its conversion rounds the same integer as
 * fma(S_hi, 255, S_lo) does (both planes' sums are exact floats, below 2^24): group_rows' results bit for bit. Q6_K's
 * and Q3_K's halves: each half's sum times its integer scale is exact in int32 (16 x 32512 x 32 x 128 < 2^31), their
 * sum is taken in double (exact) and rounded to float once, as the planes' FMA does.
 * Measured (2 threads, the 256-bit build on the AMX VM, SmolLM2's matmuls): Q8_0 1.6x faster at 16 rows, 1.3x at 4,
 * 1.09x at 2, the same at 1 (which keeps the planes); Q6_K (its halves' conversions through double cost) 1.15x at 16
 * rows, 1.08x at 8, even at 4, 8% slower at 2; the unsigned kinds 5-15% slower at every size (their planes take one
 * maddubs every 4 quants). */
#ifndef AVX2_I16_MIN_ROWS
#define AVX2_I16_MIN_ROWS 2 /* Q8_0, IQ4 */
#endif
#ifndef AVX2_I16_HALVES_MIN_ROWS
#define AVX2_I16_HALVES_MIN_ROWS 8 /* Q6_K, Q3_K */
#endif

/* a block's 8 vectors of 8 rows' signed bytes (vector k: quants 4k..4k+3 of each row) -> 16 of int16 pairs (vector
 * 2k + h: quants 4k + 2h and 4k + 2h + 1 of each row, a 32-bit lane a row) */
static inline void widen16(const qv *v, __m256i *out) {
    const __m256i lo = _mm256_setr_epi8(-1, 0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1, 0, -1, 1, -1, 4,
                                        -1, 5, -1, 8, -1, 9, -1, 12, -1, 13);
    const __m256i hi = _mm256_setr_epi8(-1, 2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1, 2, -1, 3, -1, 6,
                                        -1, 7, -1, 10, -1, 11, -1, 14, -1, 15);
    for (int k = 0; k < 8; k++) { /* each byte into the high half of its 16-bit lane, then shifted down with its sign */
        out[2 * k] = _mm256_srai_epi16(_mm256_shuffle_epi8(v[k], lo), 8);
        out[2 * k + 1] = _mm256_srai_epi16(_mm256_shuffle_epi8(v[k], hi), 8);
    }
}

/* p + q for int32 p, q, rounded to float once (their sum in double: exact) */
static inline isum exact_sum(__m256i p, __m256i q) {
    const __m256d lo = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(p)),
                                     _mm256_cvtepi32_pd(_mm256_castsi256_si128(q)));
    const __m256d hi = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(p, 1)),
                                     _mm256_cvtepi32_pd(_mm256_extracti128_si256(q, 1)));
    return _mm256_castps_si256(_mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)), _mm256_cvtpd_ps(hi), 1));
}

/* MT (<= 4) activation rows (x16 their first row's blocks, (MT, nb, 32) int16) against one group's int16 pairs w16
 * (nb, 16), scales dv (nb, 8) and, with HALVES, integer half scales sc (nb, 2, 8) -> out (MT, 8): group_rows' float
 * operations in its order (no offsets: the signed kinds have none) */
static inline __attribute__((always_inline)) void group_rows16(const __m256i *w16, const float *dv, const int32_t *sc,
                                                              int nb, const int16_t *x16, const float *xs,
                                                              const next_lines *next, float *out, const int MT,
                                                              const int HALVES) {
    f8 acc[4];
    _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) acc[i] = F8_ZERO;
    for (int b = 0; b < nb; b++) {
        const f8 db = f8_load(dv + (size_t)b * ROWS);
        prefetch_slice(next, b);
        __m256i s[4], t[4]; /* each row's sum (with HALVES: t its first half's, then s its second's) */
        _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) s[i] = t[i] = _mm256_setzero_si256();
        for (int k = 0; k < 16; k++) { /* (not unrolled: unrolled, GCC kept each product on the stack first) */
            if (HALVES && k == 8) /* the second half's sums from here */
                _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) t[i] = s[i], s[i] = _mm256_setzero_si256();
            const __m256i w = _mm256_load_si256(w16 + (size_t)b * 16 + k);
            _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) {
                int32_t two; /* x's quants 2k, 2k + 1 */
                memcpy(&two, x16 + ((size_t)i * nb + b) * BLOCK + 2 * k, 4);
                s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(w, _mm256_set1_epi32(two)));
            }
        }
        if (HALVES) {
            const __m256i sl = _mm256_loadu_si256((const __m256i *)(sc + (size_t)b * 2 * ROWS));
            const __m256i sh = _mm256_loadu_si256((const __m256i *)(sc + (size_t)b * 2 * ROWS + ROWS));
            _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) acc[i] = f8_scale_fma_f(
                exact_sum(_mm256_mullo_epi32(t[i], sl), _mm256_mullo_epi32(s[i], sh)), db, xs[(size_t)i * nb + b], acc[i]);
        } else {
            _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) acc[i] = f8_scale_fma(s[i], db, xs[(size_t)i * nb + b], acc[i]);
        }
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < MT; i++) {
        float a[ROWS];
        f8_store(a, acc[i]);
        for (int r = 0; r < ROWS; r++) out[i * ROWS + r] = a[r] + 0.0f; /* (as group_rows' acc + off, off 0) */
    }
}

/* qmatmul_i8's int16 mode on this path for the signed kinds, from the quantized x (xq (M, nb, 2, 32): each block's hi
 * then lo halves; xs (M, nb)) */
static int avx2_i16(int kind, int wide, const int8_t *xq, const float *xs, const uint8_t *qs, const void *d,
                    const void *m, const float *bias, void *y, int act, int M, int N, int K, int nthreads) {
    const int halves = wide == WIDE_Q6;
    const int nb = K / BLOCK, G = (N + ROWS - 1) / ROWS;
    const size_t nblk = (size_t)M * nb, group_bytes = (size_t)nb * block_bytes(kind);
    int16_t *x16 = aligned_alloc(32, nblk * BLOCK * sizeof(int16_t)); /* (M, nb, 32): 255 hi + lo, exact in int16 */
    if (!x16) return AIGC_ERR_NOMEM;
    for (size_t j = 0; j < nblk; j++)
        for (int h = 0; h < 2; h++) { /* 16 values at a time */
            const __m128i hi = _mm_loadu_si128((const __m128i *)(xq + 2 * j * BLOCK + 16 * h));
            const __m128i lo = _mm_loadu_si128((const __m128i *)(xq + (2 * j + 1) * BLOCK + 16 * h));
            _mm256_store_si256((__m256i *)(x16 + j * BLOCK + 16 * h),
                               _mm256_add_epi16(_mm256_mullo_epi16(_mm256_cvtepi8_epi16(hi), _mm256_set1_epi16(255)),
                                                _mm256_cvtepi8_epi16(lo)));
        }
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        /* per thread: the group's int16 pairs, float scales and integer half scales */
        __m256i *w16 = aligned_alloc(32, sizeof(__m256i) * (size_t)nb * 16);
        float *dv = malloc(sizeof(float) * (size_t)nb * ROWS);
        int32_t *sc = halves ? malloc(sizeof(int32_t) * (size_t)nb * 2 * ROWS) : NULL;
        const int ready = w16 && dv && (sc || !halves);
        if (!ready) bad = 1;
#pragma omp for schedule(static)
        for (int gi = 0; gi < G; gi++) {
            if (!ready) continue;
            const uint8_t *qg = qs + (size_t)gi * group_bytes;
            widen_scales(kind, d, m, (size_t)gi, nb, dv, NULL, sc);
            for (int b = 0; b < nb; b++) {
                const uint8_t *qb = qg + (size_t)b * block_bytes(kind);
                qv v[8];
                if (wide == WIDE_IQ4) unpack_iq4(qb, v);
                else if (kind == QKIND_Q6_K) unpack_q6(qb, v);
                else if (kind == QKIND_Q3_K) unpack_q3(qb, v);
                else
                    for (int k = 0; k < 8; k++) v[k] = qv_load(qb + 32 * k); /* Q8_0: as stored */
                widen16(v, w16 + (size_t)b * 16);
            }
            next_lines next;
            next_groups(&next, kind, qs, d, m, nb, G, gi + 1, 1);
            const int cols = N - gi * ROWS < ROWS ? N - gi * ROWS : ROWS;
            float out[4 * ROWS];
            for (int r0 = 0; r0 < M;) {
                const int left = M - r0, mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                const size_t at = (size_t)r0 * nb;
                const next_lines *ahead = r0 ? NULL : &next;
#define ROWS16(MT, H) group_rows16(w16, dv, sc, nb, x16 + at * BLOCK, xs + at, ahead, out, MT, H)
                switch (mt * 2 + halves) {
                case 9: ROWS16(4, 1); break;
                case 8: ROWS16(4, 0); break;
                case 5: ROWS16(2, 1); break;
                case 4: ROWS16(2, 0); break;
                case 3: ROWS16(1, 1); break;
                default: ROWS16(1, 0);
                }
#undef ROWS16
                for (int i = 0; i < mt; i++)
                    for (int c = 0; c < cols; c++) {
                        const int n = gi * ROWS + c;
                        store_act(y, (size_t)(r0 + i) * N + n, out[i * ROWS + c] + (bias ? bias[n] : 0.0f), act);
                    }
                r0 += mt;
            }
        }
        free(w16);
        free(dv);
        free(sc);
    }
    free(x16);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
#endif

#define GROUP_TILE(MT, WIDE, P) group_rows(g, nb, xq + at * BLOCK * P, xs + at, xt + (size_t)r0 * no, out, MT, WIDE, P)
#define TILES_P(WIDE, P)                                                                                         \
    case (P - 1) * 64 + 4 * 8 + WIDE: GROUP_TILE(4, WIDE, P); break;                                             \
    case (P - 1) * 64 + 2 * 8 + WIDE: GROUP_TILE(2, WIDE, P); break;                                             \
    case (P - 1) * 64 + 1 * 8 + WIDE: GROUP_TILE(1, WIDE, P); break
#define TILES(WIDE) TILES_P(WIDE, 1); TILES_P(WIDE, 2)

int qmatmul_i8(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m, const float *bias,
               void *y, int M, int N, int K, int i16, int nthreads) {
    const int nb = K / BLOCK, wide = wide_form(kind), halves = kind == QKIND_Q2_K;
    const int no = halves ? 2 * nb : nb; /* offsets per row: per block, or (Q2_K) per half */
    const int planes = i16 ? 2 : 1;      /* int8 blocks per block of x: its q, or (int16 mode) its hi and lo halves */
    const size_t nblk = (size_t)M * nb;
#if defined(__AMX_INT8__) && defined(__AVX512F__)
    const int tiles = M >= (i16 ? AMX_I16_MIN_ROWS : AMX_I8_MIN_ROWS) && amx_i8_ready();
#else
    const int tiles = 0;
#endif
    const size_t mp = tiles && M > 16 ? (size_t)(M + 15) / 16 * 16 : (size_t)M; /* x rows the tiles read */
    int8_t *xq = calloc(mp * nb * planes, BLOCK); /* (mp, nb, planes, 32) */
    float *xs = malloc(nblk * 3 * sizeof(float)); /* (M, nb) scales, then (M, no) scale * sum q (of each half) */
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return AIGC_ERR_NOMEM;
    }
    float *xt = xs + nblk;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nblk >= 256)
    for (size_t b = 0; b < nblk; b++) {
        int q_sum, lo;
        xs[b] = quantize_x(x, b * BLOCK, act, i16, xq + b * planes * BLOCK, &q_sum, &lo);
        if (halves) {
            xt[2 * b] = xs[b] * (float)lo, xt[2 * b + 1] = xs[b] * (float)(q_sum - lo);
        } else {
            xt[b] = xs[b] * (float)q_sum;
        }
    }
#if defined(__AMX_INT8__) && defined(__AVX512F__)
    if (tiles) {
        const int rc = amx_i8(kind, wide, planes, xq, xs, xt, no, qs, d, m, bias, y, act, M, N, K, nthreads);
        free(xq);
        free(xs);
        return rc;
    }
#endif
#if defined(I8_ZMM)
    const int rc = zmm_i8(kind, wide, planes, xq, xs, xt, no, qs, d, m, bias, y, act, M, N, K, nthreads);
    free(xq);
    free(xs);
    return rc;
#else
#if defined(__AVX2__)
    const int signed_rows = wide == WIDE_S8 || wide == WIDE_IQ4                 ? AVX2_I16_MIN_ROWS
                            : kind == QKIND_Q6_K || kind == QKIND_Q3_K ? AVX2_I16_HALVES_MIN_ROWS
                                                                       : 0; /* 0: the planes at every size */
    if (i16 && signed_rows && M >= signed_rows) {
        const int rc = avx2_i16(kind, wide, xq, xs, qs, d, m, bias, y, act, M, N, K, nthreads);
        free(xq);
        free(xs);
        return rc;
    }
#endif
    const int G = (N + ROWS - 1) / ROWS;
    const size_t group_bytes = (size_t)nb * block_bytes(kind);
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        /* per thread: the group's widened quants, float scales and offsets, integer half scales */
        qv *w = wide != WIDE_S8 ? aligned_alloc(64, ((sizeof(qv) * (size_t)nb * 8 + 63) / 64) * 64) : NULL;
        float *dv = malloc(sizeof(float) * (size_t)nb * ROWS * 3); /* dv (nb, 8), then mv (no, 8) */
        int32_t *sc = wide == WIDE_Q6 ? malloc(sizeof(int32_t) * (size_t)nb * ROWS * 2) : NULL;
        const int ready = dv && (wide == WIDE_S8 || w) && (wide != WIDE_Q6 || sc);
        if (!ready) bad = 1;
        float *mv = dv + (size_t)nb * ROWS;
        const int offsets = has_offsets(kind);
#pragma omp for schedule(static)
        for (int gi = 0; gi < G; gi++) {
            if (!ready) continue;
            const uint8_t *qg = qs + (size_t)gi * group_bytes;
            widen_scales(kind, d, m, (size_t)gi, nb, dv, mv, sc);
            for (int b = 0; b < nb && wide != WIDE_S8; b++) {
                const uint8_t *qb = qg + (size_t)b * block_bytes(kind);
                if (wide == WIDE_U4) unpack_q4(qb, w + (size_t)b * 8);
                else if (wide == WIDE_U5) unpack_q5(qb, w + (size_t)b * 8);
                else if (wide == WIDE_IQ4) unpack_iq4(qb, w + (size_t)b * 8);
                else if (kind == QKIND_Q2_K) unpack_q2(qb, w + (size_t)b * 8);
                else if (kind == QKIND_Q3_K) unpack_q3(qb, w + (size_t)b * 8);
                else unpack_q6(qb, w + (size_t)b * 8);
            }
            next_lines next;
            next_groups(&next, kind, qs, d, m, nb, G, gi + 1, 1);
            group g = {w, qg, dv, offsets ? mv : NULL, sc, no, &next};
            const int cols = N - gi * ROWS < ROWS ? N - gi * ROWS : ROWS;
            float out[4 * ROWS];
            for (int r0 = 0; r0 < M;) {
                const int left = M - r0, mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                const size_t at = (size_t)r0 * nb;
                switch ((planes - 1) * 64 + mt * 8 + wide) {
                    TILES(WIDE_U4);
                    TILES(WIDE_U5);
                    TILES(WIDE_S8);
                    TILES(WIDE_Q6);
                    TILES(WIDE_IQ4);
                }
                for (int i = 0; i < mt; i++)
                    for (int c = 0; c < cols; c++) {
                        const int n = gi * ROWS + c;
                        store_act(y, (size_t)(r0 + i) * N + n, out[i * ROWS + c] + (bias ? bias[n] : 0.0f), act);
                    }
                r0 += mt;
                g.next = NULL;
            }
        }
        free(w);
        free(dv);
        free(sc);
    }
    free(xq);
    free(xs);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
#endif
}
#endif
