/* The AVX512-BF16 build's kernel for bf16 activations (qmatmul.c sends them here): y = x W^T for every quantized
 * weight kind (Q4_0, Q4_1, Q8_0, the 5-bit kinds, the K-quants, IQ4), for small batches of rows (decode steps),
 * reading the weights about as compact as in the file.
 *
 * Each block of 32 weights decodes to 32 bfloat16 values whose products with bf16 activations are exact: 4-bit,
 * 5-bit and 6-bit quants as 128 + q (bits 0x4300 | q: exact for q < 128, three or four integer ops), so that for a
 * block with w = d' q + m' and its 32 activations x:
 *     sum_i w_i x_i = d' * sum_i (128 + q_i) x_i + (m' - 128 d') * sum_i x_i
 * (Q6_K, Q3_K, Q2_K: per half of 16, with q - 32, q - 4 or the min folded into the offset); Q8_0's int8 q converted
 * exactly; IQ4's table values looked up as bfloat16. Per row and block: one AVX512-BF16 dot product (exact products, fp32 sums) and one FMA by
 * the block's scale; the offsets times the blocks' sums of x once per row. Threads split the output columns in
 * groups of 4 rows; the result is rounded to bfloat16 (nearest even).
 */
#include <immintrin.h>
#include <stdlib.h>

#include "common.h"

#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 4
#endif
#ifndef AMX_MIN_ROWS
#define AMX_MIN_ROWS 8 /* measured: 1536 x 768, 1 thread: 2x the vector path at 8 rows (1.3x at 4, but a whole
                         * SmolLM2 decode step at 4 rows was slower, and 1.7x slower at 1 row) */
#endif

/* a 4-bit block's 32 weights as bfloat16 (128 + q) */
static inline __m512bh decode_q4(const uint8_t *qs) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs)); /* [qs | qs] */
    const __m512i words = _mm512_cvtepu8_epi16(both);
    const __m512i shifts = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0, 0, 0, 0);
    const __m512i q = _mm512_srlv_epi16(words, shifts); /* words 16..31 take the high nibbles */
    /* (q & 0x000F) | 0x4300 */
    return (__m512bh)_mm512_ternarylogic_epi32(q, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
}

/* an 8-bit block's 32 weights (q) as bfloat16 */
static inline __m512bh decode_q8(const uint8_t *qs) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qs)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* MT rows of x (row stride K) against one weight row (QB bytes of quants per block) -> sums[0..MT) of
 * d * dot(decoded q, x) over its blocks. Two accumulators per row (even and odd blocks) keep the FMA
 * latency off the critical path. */
#define DEFINE_TILE(NAME, DECODE, QB, SCALE, MT)                                                                \
    static void NAME(const uint8_t *qs, const float *d, const uint16_t *x, int K, int nb, __m512 *sums) { \
        __m512 a0[MT], a1[MT];                                                                           \
        for (int i = 0; i < MT; i++) a0[i] = a1[i] = _mm512_setzero_ps();                               \
        int b = 0;                                                                                       \
        for (; b + 2 <= nb; b += 2) {                                                                    \
            const __m512bh w0 = DECODE(qs + (size_t)b * QB), w1 = DECODE(qs + (size_t)(b + 1) * QB);     \
            const __m512 d0 = SCALE(d, b), d1 = SCALE(d, b + 1);                                           \
            _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) {                                      \
                const uint16_t *xb = x + (size_t)i * K + (size_t)b * 32;                                 \
                const __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xb)); \
                const __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), w1, (__m512bh)_mm512_loadu_si512(xb + 32)); \
                a0[i] = _mm512_fmadd_ps(p0, d0, a0[i]);                                                  \
                a1[i] = _mm512_fmadd_ps(p1, d1, a1[i]);                                                  \
            }                                                                                            \
        }                                                                                                \
        if (b < nb) {                                                                                    \
            const __m512bh w0 = DECODE(qs + (size_t)b * QB);                                             \
            const __m512 d0 = SCALE(d, b);                                                               \
            for (int i = 0; i < MT; i++) {                                                               \
                const uint16_t *xb = x + (size_t)i * K + (size_t)b * 32;                                 \
                const __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xb)); \
                a0[i] = _mm512_fmadd_ps(p0, d0, a0[i]);                                                  \
            }                                                                                            \
        }                                                                                                \
        for (int i = 0; i < MT; i++) sums[i] = _mm512_add_ps(a0[i], a1[i]);                              \
    }

#define DEFINE_TILES(Q, QB, SCALE)                          \
    DEFINE_TILE(tile_##Q##_1, decode_##Q, QB, SCALE, 1)     \
    DEFINE_TILE(tile_##Q##_2, decode_##Q, QB, SCALE, 2)     \
    DEFINE_TILE(tile_##Q##_4, decode_##Q, QB, SCALE, 4)     \
    DEFINE_TILE(tile_##Q##_8, decode_##Q, QB, SCALE, 8)

/* a block's scale: one d per block, or (Q6_K) one per half of 16, lanes 0-7 of the dot product (weights 0..15) and
 * lanes 8-15 (16..31) */
#define BLOCK_SCALE(d, b) _mm512_set1_ps((d)[b])
#define HALF_SCALES(d, b) _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps((d)[2 * (b)]), _mm512_set1_ps((d)[2 * (b) + 1]))

/* a 5-bit block's 32 weights (20 bytes: a 4-bit block's nibbles, then the fifth bits as a little-endian uint32, bit i
 * weight i) as bfloat16 (128 + q, q in 0..31: exact): word i gets 16 where bit i is set */
static inline __m512bh decode_q5(const uint8_t *qs) {
    uint32_t fifth;
    memcpy(&fifth, qs + 16, 4);
    const __m512i w = (__m512i)decode_q4(qs);
    return (__m512bh)_mm512_mask_add_epi16(w, (__mmask32)fifth, w, _mm512_set1_epi16(16));
}

/* a Q6_K sub-block's 32 weights (24 bytes: 16 of low nibbles in the 4-bit order, 8 of high bit pairs: byte 16 + i
 * bits 2s..2s+1 hold weight 8s + i's) as bfloat16 128 + q (q in 0..63: exact; the weight is d sc (q - 32), so the
 * caller's offsets take -160 d sc times the half's sum of x) */
static inline __m512bh decode_q6(const uint8_t *qs) {
    const __m512i low = (__m512i)decode_q4(qs); /* words: 0x4300 | the low 4 bits */
    long long pairs;
    memcpy(&pairs, qs + 16, 8);
    const __m512i hb = _mm512_cvtepu8_epi16(_mm256_set1_epi64x(pairs)); /* word i: byte i % 8 */
    const __m512i shifts = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
    /* low | ((hb >> shift) & 3) << 4 */
    return (__m512bh)_mm512_ternarylogic_epi32(low, _mm512_slli_epi16(_mm512_srlv_epi16(hb, shifts), 4),
                                               _mm512_set1_epi16(0x30), 0xF8);
}

/* an IQ4 block's 32 weights: the indices (the 4-bit order) as words, looked up in IQ4_VALUES as bfloat16 (exact:
 * integers of at most 8 bits) */
static inline __m512bh decode_iq4(const uint8_t *qs) {
    /* IQ4_VALUES (common.h) as bfloat16 bits, words 0..15 (each value's fp32 bits, whose low half is zero, >> 16) */
    static const int16_t table[32] = {(int16_t)0xC2FE, (int16_t)0xC2D0, (int16_t)0xC2A6, (int16_t)0xC282,
                                      (int16_t)0xC244, (int16_t)0xC20C, (int16_t)0xC1B0, (int16_t)0xC120,
                                      0x3F80, 0x4150, 0x41C8, 0x4218, 0x4254, 0x428A, 0x42B2, 0x42E2};
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs)); /* [qs | qs] */
    const __m512i shifts = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0, 0, 0, 0);
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(both), shifts), _mm512_set1_epi16(0x0F));
    return (__m512bh)_mm512_permutexvar_epi16(idx, _mm512_loadu_si512(table));
}

/* a Q2_K sub-block's 32 weights (8 bytes of 2-bit q: byte i bits 2s..2s+1 hold weight 8s + i's) as bfloat16 128 + q
 * (q in 0..3); Q3_K (then 4 bytes of third bits, a little-endian uint32, bit i weight i) 128 + q with q in 0..7
 * (the weight d sc (q - 4): the caller's offsets take -132 d sc) */
static inline __m512bh decode_q2(const uint8_t *qs) {
    long long pairs;
    memcpy(&pairs, qs, 8);
    const __m512i hb = _mm512_cvtepu8_epi16(_mm256_set1_epi64x(pairs)); /* word i: byte i % 8 */
    const __m512i shifts = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
    /* ((hb >> shift) & 3) | 0x4300 */
    return (__m512bh)_mm512_ternarylogic_epi32(_mm512_srlv_epi16(hb, shifts), _mm512_set1_epi16(0x0003),
                                               _mm512_set1_epi16(0x4300), 0xEA);
}

static inline __m512bh decode_q3(const uint8_t *qs) {
    uint32_t third;
    memcpy(&third, qs + 8, 4);
    const __m512i w = (__m512i)decode_q2(qs);
    return (__m512bh)_mm512_mask_add_epi16(w, (__mmask32)third, w, _mm512_set1_epi16(4));
}

DEFINE_TILES(q4, 16, BLOCK_SCALE)
DEFINE_TILES(iq4, 16, BLOCK_SCALE)
DEFINE_TILES(q8, 32, BLOCK_SCALE)
DEFINE_TILES(q5, 20, BLOCK_SCALE)
DEFINE_TILES(q6, 24, HALF_SCALES)
DEFINE_TILES(q2, 8, HALF_SCALES)
DEFINE_TILES(q3, 12, HALF_SCALES)

/* NR weight rows (rb bytes apart, scales ds floats apart) against one row of x -> sums[0..NR): each (row, x) pair
 * summed exactly as the MT = 1 tile sums it (the same operations in the same order), NR chains side by side */
#define NR 4
#define DEFINE_TILE_ROWS(NAME, DECODE, QB, SCALE)                                                              \
    static void NAME(const uint8_t *qs, size_t rb, const float *d, size_t ds, const uint16_t *x, int nb,      \
                     __m512 *sums) {                                                                           \
        __m512 a0[NR], a1[NR];                                                                                 \
        for (int r = 0; r < NR; r++) a0[r] = a1[r] = _mm512_setzero_ps();                                     \
        int b = 0;                                                                                             \
        for (; b + 2 <= nb; b += 2) {                                                                          \
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + (size_t)b * 32);                              \
            const __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + (size_t)b * 32 + 32);                         \
            _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) {                                             \
                const uint8_t *q = qs + r * rb + (size_t)b * QB;                                               \
                const __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), DECODE(q), x0);                        \
                const __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), DECODE(q + QB), x1);                   \
                a0[r] = _mm512_fmadd_ps(p0, SCALE(d + r * ds, b), a0[r]);                                      \
                a1[r] = _mm512_fmadd_ps(p1, SCALE(d + r * ds, b + 1), a1[r]);                                  \
            }                                                                                                  \
        }                                                                                                      \
        if (b < nb) {                                                                                          \
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + (size_t)b * 32);                              \
            for (int r = 0; r < NR; r++) {                                                                     \
                const __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), DECODE(qs + r * rb + (size_t)b * QB), x0); \
                a0[r] = _mm512_fmadd_ps(p0, SCALE(d + r * ds, b), a0[r]);                                      \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < NR; r++) sums[r] = _mm512_add_ps(a0[r], a1[r]);                                   \
    }

DEFINE_TILE_ROWS(rows_q4, decode_q4, 16, BLOCK_SCALE)
DEFINE_TILE_ROWS(rows_iq4, decode_iq4, 16, BLOCK_SCALE)
DEFINE_TILE_ROWS(rows_q8, decode_q8, 32, BLOCK_SCALE)
DEFINE_TILE_ROWS(rows_q5, decode_q5, 20, BLOCK_SCALE)
DEFINE_TILE_ROWS(rows_q6, decode_q6, 24, HALF_SCALES)
DEFINE_TILE_ROWS(rows_q2, decode_q2, 8, HALF_SCALES)
DEFINE_TILE_ROWS(rows_q3, decode_q3, 12, HALF_SCALES)

/* how a kind's blocks decode: 0 decode_q4 (Q4_0, Q4_1, Q4_K), 1 decode_q5 (the 5-bit kinds), 2 decode_q6, 3 decode_q8,
 * 4 decode_iq4, 5 decode_q2, 6 decode_q3; 2, 5 and 6 with a scale per half of 16 */
static int block_form(int kind) {
    switch (kind) {
    case QKIND_Q4: case QKIND_Q4_K: return 0;
    case QKIND_Q6_K: return 2;
    case QKIND_Q8: return 3;
    case QKIND_IQ4: return 4;
    case QKIND_Q2_K: return 5;
    case QKIND_Q3_K: return 6;
    default: return 1;
    }
}

static __mmask16 first(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* one weight row's scales d32 (per block; Q6_K, Q3_K, Q2_K per half) and offsets o32 (o = m' - 128 d' per block;
 * Q6_K -160 d', Q3_K -132 d', Q2_K -(dmin mn) - 128 d' per half; none for Q8_0 and IQ4), from its d and m in the
 * kind's layout */
static void row_scales(int kind, const uint8_t *dn, const uint8_t *mn, int nb, float *d32, float *o32) {
    const int nsb = nb / 8;
    switch (kind) {
    case QKIND_IQ4: memcpy(d32, dn, sizeof(float) * (size_t)nb); break;
    case QKIND_Q4: case QKIND_Q8: case QKIND_Q5_0: case QKIND_Q5_1:
        for (int b = 0; b < nb; b += 16) { /* fp16 d (and m), 16 blocks at a time */
            const __m512 db = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(nb - b), (const uint16_t *)dn + b));
            _mm512_storeu_ps(d32 + b, db);
            if (kind == QKIND_Q8) continue;
            const __m512 mb = kind == QKIND_Q5_0
                                  ? _mm512_mul_ps(db, _mm512_set1_ps(-16.0f))
                                  : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(nb - b), (const uint16_t *)mn + b));
            _mm512_storeu_ps(o32 + b, _mm512_fmadd_ps(db, _mm512_set1_ps(-128.0f), mb));
        }
        break;
    case QKIND_Q6_K: case QKIND_Q3_K:
        for (int s = 0; s < nsb; s++) { /* d sc for 16 halves; -160 d sc (Q3_K: -132 d sc), exact (17 + 6 bits) */
            const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(mn + (size_t)s * 16)));
            const __m512 ds = _mm512_mul_ps(_mm512_set1_ps(((const float *)dn)[s]), _mm512_cvtepi32_ps(sc));
            _mm512_storeu_ps(d32 + s * 16, ds);
            _mm512_storeu_ps(o32 + s * 16, _mm512_mul_ps(ds, _mm512_set1_ps(kind == QKIND_Q3_K ? -132.0f : -160.0f)));
        }
        break;
    case QKIND_Q2_K:
        for (int s = 0; s < nsb; s++) { /* d sc and -(dmin mn) for 16 halves (exact), o = m' - 128 d' */
            const float *ds = (const float *)dn + 2 * s;
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mn + (size_t)s * 16)));
            const __m512 dj = _mm512_mul_ps(_mm512_set1_ps(ds[0]),
                                            _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F))));
            const __m512 mj = _mm512_mul_ps(_mm512_set1_ps(-ds[1]), _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)));
            _mm512_storeu_ps(d32 + s * 16, dj);
            _mm512_storeu_ps(o32 + s * 16, _mm512_fmadd_ps(dj, _mm512_set1_ps(-128.0f), mj));
        }
        break;
    default: /* Q4_K, Q5_K */
        for (int s = 0; s < nsb; s++) { /* the 8 sub-blocks' d sc_j and -(dmin mn_j) (exact), o = m' - 128 d' */
            const float *ds = (const float *)dn + 2 * s;
            const __m128i sm = _mm_loadu_si128((const __m128i *)(mn + (size_t)s * 16)); /* 8 scales, 8 mins */
            const __m256 dj = _mm256_mul_ps(_mm256_set1_ps(ds[0]), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
            const __m256 mj = _mm256_mul_ps(_mm256_set1_ps(-ds[1]),
                                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))));
            _mm256_storeu_ps(d32 + s * 8, dj);
            _mm256_storeu_ps(o32 + s * 8, _mm256_fmadd_ps(dj, _mm256_set1_ps(-128.0f), mj));
        }
    }
}

#if defined(__AMX_BF16__) && defined(__linux__)
/* ---- The AMX tile path: the same decoded blocks, multiplied 16 weight rows by 16 activation rows at a time.
 *
 * Per block of 32 (Q6_K, Q3_K, Q2_K: per half of 16): A = the block decoded for 16 weight rows (16 x 32 bf16, as above), B = the
 * block's activations of 16 x rows (pairs of bf16 side by side, the tiles' layout; prepared once per call), one tile
 * product C = A B (16 x 16 fp32: exact products, fp32 sums, the tile unit's order), then per weight row n an FMA by
 * the block's scale into that row's 16 sums (acc_n += d'_nb C_n), and the offsets o times the blocks' sums of x as in
 * the vector path. A result depends on its weight row and x row only: not on the batch, the tile it fell in or the
 * thread; but it is summed in another order than the vector path's, so a call takes it from AMX_MIN_ROWS rows only
 * where a row's result may depend on the batch, and at every size with AIGC_EVERY_BATCH (the batch-invariant mode: one
 * method at every size, and prompt chunks at the tiles' speed), where the CPU has AMX and Linux grants the tile state
 * (qmatmul_amx_ready; elsewhere the vector path at every size). */
#include "amx.h"

/* the CPU has AMX-BF16 and this process may use the tile registers */
static int qmatmul_amx_ready(void) { return __builtin_cpu_supports("amx-bf16") && amx_granted(); }

/* *buf grown to at least n bytes (64-byte aligned), kept for the next call: the calling thread's (or the OpenMP
 * worker's) scratch, so that a call allocates nothing once warm; NULL if there is no memory */
static void *grown(void **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        free(*buf);
        *cap = 0;
        if (!(*buf = aligned_alloc(64, (n + 63) & ~(size_t)63))) return NULL;
        *cap = n;
    }
    return *buf;
}

/* for one_row: tiles 0..3 C (16 weight rows x 1 row of x, fp32); 4, 5 A (16 weight rows x 32 bf16; halves: x 16);
 * 6, 7 B (16 pairs x 1 row of x; halves: 8 pairs) */
static void configure_one_row(int halves) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = t >= 6 && halves ? 8 : 16;
        c.colsb[t] = t >= 4 && t < 6 ? (halves ? 32 : 64) : 4;
    }
    _tile_loadconfig(&c);
}

/* tiles 0, 1: C (16 weight rows x cols rows of x, fp32); 2, 3: A (16 weight rows x 32 bf16; Q6_K: x 16, a half
 * each); 4, 5: B (16 pairs x cols rows of x; Q6_K: 8 pairs, a half each) */
static void configure_tiles(int halves, int cols) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {
        c.rows[t] = t >= 4 && halves ? 8 : 16;
        c.colsb[t] = t >= 2 && t < 4 ? (halves ? 32 : 64) : 4 * cols;
    }
    _tile_loadconfig(&c);
}

/* 16 weight rows' block of 32 decoded (as the vector path) into a (16 x 32 bf16, rows 64 bytes apart); rows past nr
 * zero */
static inline __attribute__((always_inline)) void decode_rows(int form, const uint8_t *q, size_t row_bytes, int nr,
                                                              uint16_t *a) {
    for (int r = 0; r < 16; r++) {
        const uint8_t *qr = q + (size_t)r * row_bytes;
        const __m512i w = r >= nr      ? _mm512_setzero_si512()
                          : form == 0 ? (__m512i)decode_q4(qr)
                          : form == 1 ? (__m512i)decode_q5(qr)
                          : form == 2 ? (__m512i)decode_q6(qr)
                          : form == 3 ? (__m512i)decode_q8(qr)
                          : form == 5 ? (__m512i)decode_q2(qr)
                          : form == 6 ? (__m512i)decode_q3(qr)
                                      : (__m512i)decode_iq4(qr);
        _mm512_store_si512(a + r * 32, w);
    }
}

/* amx_kind's n-tile (the 16 weight rows at q, row_bytes apart, nr of them) against a single row of x (M = 1, its bf16
 * pairs at x): each block decoded just before its product (a: a ring of 4 decoded blocks, where the general loop decodes
 * the n-tile's blocks first for all its x tiles), x read as stored (a tile row per pair), and each block's C (16 weight
 * rows x 1) stored as one vector whose lanes are the weight rows, so that one FMA applies the 16 rows' scales (dt, ot:
 * d32, o32 transposed, a block's 16 rows side by side) where the general loop takes one per row. Every (weight row, x
 * row) pair gets the same operations in the same order as there: a row's result is the same alone as in any batch.
 * next, lines: the next n-tile's weights, prefetched a slice per block. */
static void one_row(int form, int halves, int offsets, int nb, int no, int qb, size_t ds, const uint8_t *q,
                    size_t row_bytes, int nr, const uint8_t *next, size_t lines, const uint32_t *x, const float *xs,
                    const float *d32, const float *o32, float *dt, float *ot, uint16_t *a, float *cbuf,
                    const float *bias, uint16_t *y) {
    for (int o = 0; o < no; o++)
        for (int r = 0; r < 16; r++) {
            dt[o * 16 + r] = d32[r * ds + o];
            ot[o * 16 + r] = o32[r * ds + o];
        }
    /* (configure_one_row's tiles) C tiles 0..3 take blocks in turn, their sums scaled 3 blocks later (halves: the pairs
     * 0, 1 and 2, 3, one block later), so that several products are under way and the vector loads of a stored C find
     * it written; A tiles 4, 5 and B tiles 6, 7 alternate */
#define ONE_BLOCK(C, A, B, AB, XB)         \
    do {                                   \
        _tile_loadd(A, AB, 64);            \
        _tile_loadd(B, XB, 4);             \
        _tile_zero(C);                     \
        _tile_dpbf16ps(C, A, B);           \
        _tile_stored(C, cbuf + 16 * C, 4); \
    } while (0)
#define HALF_BLOCKS(C0, C1, AB, XB)          \
    do {                                     \
        _tile_loadd(4, AB, 64);              \
        _tile_loadd(5, (AB) + 16, 64);       \
        _tile_loadd(6, XB, 4);               \
        _tile_loadd(7, (XB) + 8, 4);         \
        _tile_zero(C0);                      \
        _tile_zero(C1);                      \
        _tile_dpbf16ps(C0, 4, 6);            \
        _tile_dpbf16ps(C1, 5, 7);            \
        _tile_stored(C0, cbuf + 16 * C0, 4); \
        _tile_stored(C1, cbuf + 16 * C1, 4); \
    } while (0)
    const int lag = halves ? 1 : 3;
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < nb + lag; b++) {
        if (b < nb) {
            uint16_t *ab = a + (size_t)(b & 3) * 512;
            const uint32_t *xb = x + (size_t)b * 16;
            decode_rows(form, q + (size_t)b * qb, row_bytes, nr, ab);
            for (size_t l = lines * b / nb; l < lines * (b + 1) / nb; l++)
                _mm_prefetch((const char *)next + l * 64, _MM_HINT_T0);
            if (halves) {
                if (b & 1) HALF_BLOCKS(2, 3, ab, xb);
                else HALF_BLOCKS(0, 1, ab, xb);
            } else {
                switch (b & 3) {
                case 0: ONE_BLOCK(0, 4, 6, ab, xb); break;
                case 1: ONE_BLOCK(1, 5, 7, ab, xb); break;
                case 2: ONE_BLOCK(2, 4, 6, ab, xb); break;
                default: ONE_BLOCK(3, 5, 7, ab, xb); break;
                }
            }
        }
        const int j = b - lag; /* the block whose sums are scaled now */
        if (j < 0) continue;
        if (halves) {
            const float *cj = cbuf + 32 * (j & 1);
            acc = _mm512_fmadd_ps(_mm512_load_ps(cj), _mm512_load_ps(dt + 32 * j), acc);
            acc = _mm512_fmadd_ps(_mm512_load_ps(cj + 16), _mm512_load_ps(dt + 32 * j + 16), acc);
        } else
            acc = _mm512_fmadd_ps(_mm512_load_ps(cbuf + 16 * (j & 3)), _mm512_load_ps(dt + 16 * j), acc);
    }
#undef ONE_BLOCK
#undef HALF_BLOCKS
    for (int o = 0; o < no && offsets; o++) /* + the offsets times their sums of x, in block order */
        acc = _mm512_fmadd_ps(_mm512_load_ps(ot + 16 * o), _mm512_set1_ps(xs[16 * o]), acc);
    _mm512_store_ps(cbuf, acc);
    for (int r = 0; r < nr; r++) y[r] = float_to_bf16(cbuf[r] + (bias ? bias[r] : 0.0f));
}

static int amx_kind(int kind, const uint16_t *x, const uint8_t *qs, const void *d, const void *m, const float *bias,
                    uint16_t *y, int M, int N, int K, int nthreads) {
    const int nb = K / 32, form = block_form(kind), halves = form == 2 || form == 5 || form == 6;
    const int offsets = kind != QKIND_Q8 && kind != QKIND_IQ4;
    const int qb = (int[]){16, 20, 24, 32, 16, 8, 12}[form]; /* bytes of quants per block */
    size_t row_bytes = (size_t)nb * qb, d_bytes = (size_t)nb * 2, m_bytes = (size_t)nb * 2;
    if (kind != QKIND_Q4 && kind != QKIND_Q8) qkind_row_bytes(kind, K, &row_bytes, &d_bytes, &m_bytes);
    const int no = halves ? 2 * nb : nb, span = K / no, mtiles = (M + 15) / 16;
    /* xt (mtiles, nb, 16 pairs, 16 rows) uint32: each x row's bf16 pairs in the tiles' B layout (zeros past M);
     * xs (mtiles, no, 16): the rows' sums of x per offset span */
    static __thread void *xbuf;
    static __thread size_t xcap;
    const size_t xt_bytes = (size_t)mtiles * nb * 1024;
    uint32_t *xt = grown(&xbuf, &xcap, xt_bytes + (size_t)mtiles * no * 64 + 64);
    if (!xt) return AIGC_ERR_NOMEM;
    float *xs = (float *)((char *)xt + xt_bytes);
    if (M > 16 && M % 16) { /* the last tile's columns past M: zeros (a batch of at most 16 takes only its M) */
        memset(xt + (size_t)(mtiles - 1) * nb * 256, 0, (size_t)nb * 1024);
        memset(xs + (size_t)(mtiles - 1) * no * 16, 0, (size_t)no * 64);
    }
    for (int r = 0; r < M; r++) {
        const uint32_t *pairs = (const uint32_t *)(x + (size_t)r * K);
        const int t = r / 16, c = r % 16;
        for (int b = 0; b < nb && M > 1; b++) /* (a single row's tiles read x as stored) */
            for (int k2 = 0; k2 < 16; k2++) xt[(((size_t)t * nb + b) * 16 + k2) * 16 + c] = pairs[b * 16 + k2];
        for (int o = 0; o < no && offsets; o++) {
            float sum = 0.0f;
            for (int i = 0; i < span; i++) sum += bf16_to_float(x[(size_t)r * K + (size_t)o * span + i]);
            xs[((size_t)t * no + o) * 16 + c] = sum;
        }
    }
    const size_t ds = (size_t)2 * nb + 16; /* floats between two rows' scales (and offsets) */
    const int ntiles = (N + 15) / 16;
    const __mmask16 lanes = first(M); /* the columns of x a tile holds (all 16 past the first tile) */
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        /* the n-tile's decoded blocks (nb, 16, 32) bf16; its rows' scales and offsets; two C tiles; the sums' transpose */
        static __thread void *tbuf_;
        static __thread size_t tcap;
        const size_t a_bytes = (size_t)nb * 1024, d_floats = 16 * ds;
        uint16_t *a = grown(&tbuf_, &tcap, a_bytes + 3 * 1024 + sizeof(float) * 4 * d_floats);
        float *cbuf = a ? (float *)((char *)a + a_bytes) : NULL, *tbuf = cbuf ? cbuf + 512 : NULL;
        float *d32 = cbuf ? cbuf + 768 : NULL, *o32 = d32 ? d32 + d_floats : NULL;
        float *dt = o32 ? o32 + d_floats : NULL, *ot = dt ? dt + d_floats : NULL; /* (M = 1: transposed) */
        if (!a) bad = 1;
        else if (M == 1) configure_one_row(halves);
        else configure_tiles(halves, M < 16 ? M : 16);
#pragma omp for schedule(static)
        for (int nt = 0; nt < ntiles; nt++) {
            if (bad) continue;
            const int n0 = nt * 16, nr = N - n0 < 16 ? N - n0 : 16;
            if (nr < 16) memset(d32, 0, sizeof(float) * 16 * ds * 2);
            for (int r = 0; r < nr; r++) {
                const size_t n = (size_t)n0 + r;
                row_scales(kind, (const uint8_t *)d + n * d_bytes, m ? (const uint8_t *)m + n * m_bytes : NULL, nb,
                           d32 + r * ds, o32 + r * ds);
            }
            /* the next n-tile's weights, a slice per block decoded here: ahead of the hardware prefetcher, which does
             * not follow 16 rows read a block at a time (16 streams of 8-32 bytes a step) */
            const size_t n1 = (size_t)n0 + 16, lines = nt + 1 < ntiles ? ((N - n1 < 16 ? N - n1 : 16) * row_bytes + 63) / 64 : 0;
            for (size_t l = 0; lines && l < 16 * d_bytes; l += 64) { /* and its scales (offsets) */
                _mm_prefetch((const char *)d + n1 * d_bytes + l, _MM_HINT_T0);
                if (m && l < 16 * m_bytes) _mm_prefetch((const char *)m + n1 * m_bytes + l, _MM_HINT_T0);
            }
            if (M == 1) {
                one_row(form, halves, offsets, nb, no, qb, ds, qs + (size_t)n0 * row_bytes, row_bytes, nr,
                        qs + n1 * row_bytes, lines, (const uint32_t *)x, xs, d32, o32, dt, ot, a, cbuf,
                        bias ? bias + n0 : NULL, y + n0);
                continue;
            }
            for (int b = 0; b < nb; b++) {
                decode_rows(form, qs + (size_t)n0 * row_bytes + (size_t)b * qb, row_bytes, nr, a + (size_t)b * 512);
                for (size_t l = lines * b / nb; l < lines * (b + 1) / nb; l++)
                    _mm_prefetch((const char *)qs + n1 * row_bytes + l * 64, _MM_HINT_T0);
            }
            for (int t = 0; t < mtiles; t++) {
                __m512 acc[16]; /* per weight row: its sums with the tile's 16 rows of x */
                for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
                const uint32_t *xb = xt + (size_t)t * nb * 256;
                for (int b = 0; b < nb; b++) {
                    if (halves) { /* halves: weights 0..15 (pairs 0..7) and 16..31 (pairs 8..15), a scale each */
                        _tile_loadd(2, a + (size_t)b * 512, 64);
                        _tile_loadd(3, a + (size_t)b * 512 + 16, 64);
                        _tile_loadd(4, xb + (size_t)b * 256, 64);
                        _tile_loadd(5, xb + (size_t)b * 256 + 128, 64);
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_dpbf16ps(0, 2, 4);
                        _tile_dpbf16ps(1, 3, 5);
                        _tile_stored(0, cbuf, 64);
                        _tile_stored(1, cbuf + 256, 64);
                        for (int r = 0; r < 16; r++) {
                            const float *dr = d32 + r * ds + 2 * b;
                            acc[r] = _mm512_fmadd_ps(_mm512_maskz_load_ps(lanes, cbuf + 16 * r), _mm512_set1_ps(dr[0]), acc[r]);
                            acc[r] = _mm512_fmadd_ps(_mm512_maskz_load_ps(lanes, cbuf + 256 + 16 * r), _mm512_set1_ps(dr[1]), acc[r]);
                        }
                        continue;
                    }
                    /* alternate tiles, and the scales of block b - 1 after block b's product is under way: the
                     * vector loads of a tile's stored sums then find them written */
                    const int c = b & 1;
                    if (c) {
                        _tile_loadd(3, a + (size_t)b * 512, 64);
                        _tile_loadd(5, xb + (size_t)b * 256, 64);
                        _tile_zero(1);
                        _tile_dpbf16ps(1, 3, 5);
                        _tile_stored(1, cbuf + 256, 64);
                    } else {
                        _tile_loadd(2, a + (size_t)b * 512, 64);
                        _tile_loadd(4, xb + (size_t)b * 256, 64);
                        _tile_zero(0);
                        _tile_dpbf16ps(0, 2, 4);
                        _tile_stored(0, cbuf, 64);
                    }
                    if (b == 0) continue;
                    const float *cb = cbuf + 256 * (c ^ 1);
                    for (int r = 0; r < 16; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_maskz_load_ps(lanes, cb + 16 * r), _mm512_set1_ps(d32[r * ds + b - 1]),
                                                 acc[r]);
                }
                if (!halves) { /* the last block's scales */
                    const float *cb = cbuf + 256 * ((nb - 1) & 1);
                    for (int r = 0; r < 16; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_maskz_load_ps(lanes, cb + 16 * r),
                                                 _mm512_set1_ps(d32[r * ds + nb - 1]), acc[r]);
                }
                if (offsets) /* + the offsets times their sums of x, in block order */
                    for (int o = 0; o < no; o++) {
                        const __m512 sx = _mm512_maskz_load_ps(lanes, xs + ((size_t)t * no + o) * 16);
                        for (int r = 0; r < 16; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(o32[r * ds + o]), sx, acc[r]);
                    }
                for (int r = 0; r < 16; r++) _mm512_store_ps(tbuf + 16 * r, acc[r]);
                const int mr = M - t * 16 < 16 ? M - t * 16 : 16;
                for (int i = 0; i < mr; i++)
                    for (int r = 0; r < nr; r++)
                        y[(size_t)(t * 16 + i) * N + n0 + r] =
                            float_to_bf16(tbuf[16 * r + i] + (bias ? bias[n0 + r] : 0.0f));
            }
        }
        if (a) _tile_release();
    }
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
#endif

/* Every kind but the float ones (k_qmatmul's two forms and k_qmatmul_kind's layouts, common.h): each row's blocks
 * (sub-blocks) of 32 decode as above (128 + q; Q8_0 and IQ4: the signed values), with a float scale per block d'
 * (Q6_K, Q3_K, Q2_K: per half of 16) and an offset o = m' - 128 d' per block (Q6_K: -160 d' per half) times the
 * block's (half's) sum of x: Q4_0/Q4_1 d, m; Q4_K, Q5_K d' = d sc_j, m' = -(dmin mn_j); Q5_0 d' = d, m' = -16 d; Q5_1
 * d' = d, m' = m; Q6_K, Q3_K d' = d sc; Q2_K d' = d sc, m' = -(dmin mn) (every product exact). Threads take groups of NR weight rows; a single row of x runs against the
 * group's NR rows at once (rows_*), more rows of x in tiles of up to 8 against each weight row (tile_*): a pair's
 * sum is computed the same way in both. x: (M, K) bf16, y: (M, N) bf16. Returns an AIGC_* status. */
int qmatmul_avx512bf16_kind(int kind, const uint16_t *x, const uint8_t *qs, const void *d, const void *m,
                            const float *bias, uint16_t *y, int M, int N, int K, int every, int nthreads) {
#if defined(__AMX_BF16__) && defined(__linux__)
    if ((every || M >= AMX_MIN_ROWS) && qmatmul_amx_ready()) /* every: one method at every size, the tiles */
        return amx_kind(kind, x, qs, d, m, bias, y, M, N, K, nthreads);
#else
    (void)every;
#endif
    const int nb = K / 32, form = block_form(kind), halves = form == 2 || form == 5 || form == 6;
    const int offsets = kind != QKIND_Q8 && kind != QKIND_IQ4;
    const int qb = (int[]){16, 20, 24, 32, 16, 8, 12}[form]; /* bytes of quants per block */
    size_t row_bytes = (size_t)nb * qb, d_bytes = (size_t)nb * 2, m_bytes = (size_t)nb * 2;
    if (kind != QKIND_Q4 && kind != QKIND_Q8) qkind_row_bytes(kind, K, &row_bytes, &d_bytes, &m_bytes);
    const int no = halves ? 2 * nb : nb, span = K / no; /* offsets per row, each over span x */
    float *xsum = NULL; /* (M, no) sums of x, for the offset term */
    if (offsets) {
        if (!(xsum = malloc(((size_t)M * no + 16) * sizeof(float)))) return AIGC_ERR_NOMEM;
        for (int r = 0; r < M; r++)
            for (int b = 0; b < no; b++) {
                float s = 0.0f;
                for (int i = 0; i < span; i++) s += bf16_to_float(x[(size_t)r * K + (size_t)b * span + i]);
                xsum[(size_t)r * no + b] = s;
            }
    }
    const size_t ds = (size_t)2 * nb + 16; /* floats between two rows' scales (and offsets) */
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int n0 = 0; n0 < N; n0 += NR) {
        const int nr = N - n0 < NR ? N - n0 : NR;
        if (n0 + NR < N) { /* the weight stream of the next group, ahead of the hardware prefetcher */
            const uint8_t *ahead = qs + (size_t)(n0 + NR) * row_bytes;
            for (size_t c = 0; c < row_bytes * NR && c < row_bytes * (size_t)(N - n0 - NR); c += 64)
                _mm_prefetch((const char *)ahead + c, _MM_HINT_T0);
        }
        float d32[NR * ds], o32[NR * ds]; /* the group's rows' scales and offsets */
        for (int r = 0; r < nr; r++) {
            const size_t n = (size_t)n0 + r;
            row_scales(kind, (const uint8_t *)d + n * d_bytes, m ? (const uint8_t *)m + n * m_bytes : NULL, nb,
                       d32 + r * ds, o32 + r * ds);
        }
        const uint8_t *qg = qs + (size_t)n0 * row_bytes;
        __m512 sums[8];
        for (int r0 = 0; r0 < M;) {
            const int left = M - r0, mt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            const uint16_t *xr = x + (size_t)r0 * K;
            for (int r = 0; r < nr; r++) { /* weight row n0 + r against x rows r0 .. r0 + mt - 1 */
                if (mt == 1 && nr == NR && r == 0) { /* all NR rows at once: sums[0..NR) */
                    switch (form) {
                    case 0: rows_q4(qg, row_bytes, d32, ds, xr, nb, sums); break;
                    case 1: rows_q5(qg, row_bytes, d32, ds, xr, nb, sums); break;
                    case 2: rows_q6(qg, row_bytes, d32, ds, xr, nb, sums); break;
                    case 3: rows_q8(qg, row_bytes, d32, ds, xr, nb, sums); break;
                    case 5: rows_q2(qg, row_bytes, d32, ds, xr, nb, sums); break;
                    case 6: rows_q3(qg, row_bytes, d32, ds, xr, nb, sums); break;
                    default: rows_iq4(qg, row_bytes, d32, ds, xr, nb, sums); break;
                    }
                }
                __m512 one[8];
                __m512 *s = mt == 1 && nr == NR ? sums + r : one;
                if (s == one) {
                    const uint8_t *qn = qg + r * row_bytes;
                    const float *dn = d32 + r * ds;
                    switch (mt * 8 + form) {
                    case 64: tile_q4_8(qn, dn, xr, K, nb, one); break;
                    case 32: tile_q4_4(qn, dn, xr, K, nb, one); break;
                    case 16: tile_q4_2(qn, dn, xr, K, nb, one); break;
                    case 8: tile_q4_1(qn, dn, xr, K, nb, one); break;
                    case 65: tile_q5_8(qn, dn, xr, K, nb, one); break;
                    case 33: tile_q5_4(qn, dn, xr, K, nb, one); break;
                    case 17: tile_q5_2(qn, dn, xr, K, nb, one); break;
                    case 9: tile_q5_1(qn, dn, xr, K, nb, one); break;
                    case 66: tile_q6_8(qn, dn, xr, K, nb, one); break;
                    case 34: tile_q6_4(qn, dn, xr, K, nb, one); break;
                    case 18: tile_q6_2(qn, dn, xr, K, nb, one); break;
                    case 10: tile_q6_1(qn, dn, xr, K, nb, one); break;
                    case 67: tile_q8_8(qn, dn, xr, K, nb, one); break;
                    case 35: tile_q8_4(qn, dn, xr, K, nb, one); break;
                    case 19: tile_q8_2(qn, dn, xr, K, nb, one); break;
                    case 11: tile_q8_1(qn, dn, xr, K, nb, one); break;
                    case 69: tile_q2_8(qn, dn, xr, K, nb, one); break;
                    case 37: tile_q2_4(qn, dn, xr, K, nb, one); break;
                    case 21: tile_q2_2(qn, dn, xr, K, nb, one); break;
                    case 13: tile_q2_1(qn, dn, xr, K, nb, one); break;
                    case 70: tile_q3_8(qn, dn, xr, K, nb, one); break;
                    case 38: tile_q3_4(qn, dn, xr, K, nb, one); break;
                    case 22: tile_q3_2(qn, dn, xr, K, nb, one); break;
                    case 14: tile_q3_1(qn, dn, xr, K, nb, one); break;
                    case 68: tile_iq4_8(qn, dn, xr, K, nb, one); break;
                    case 36: tile_iq4_4(qn, dn, xr, K, nb, one); break;
                    case 20: tile_iq4_2(qn, dn, xr, K, nb, one); break;
                    default: tile_iq4_1(qn, dn, xr, K, nb, one); break;
                    }
                }
                const float bn = bias ? bias[n0 + r] : 0.0f;
                for (int i = 0; i < (s == one ? mt : 1); i++) {
                    __m512 acc = s[i];
                    if (offsets) { /* + the offsets times their sums of x */
                        const float *xs = xsum + (size_t)(r0 + i) * no, *on = o32 + r * ds;
                        for (int b = 0; b < no; b += 16)
                            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(first(no - b), on + b),
                                                  _mm512_maskz_loadu_ps(first(no - b), xs + b), acc);
                    }
                    y[(size_t)(r0 + i) * N + n0 + r] = float_to_bf16(_mm512_reduce_add_ps(acc) + bn);
                }
            }
            r0 += mt;
        }
    }
    free(xsum);
    return AIGC_OK;
}

/* x: (M, K) bf16; qs: (N, K/32, 16) uint8 nibbles with d, m: (N, K/32) fp16, or (N, K/32, 32) int8 with d and m = NULL
 * (Q8_0); bias: N fp32 or NULL; y: (M, N) bf16. Returns an AIGC_* status. */
int qmatmul_avx512bf16(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
                       uint16_t *y, int M, int N, int K, int every, int nthreads) {
    if (K % 32 || M <= 0 || N <= 0) return AIGC_ERR_ARGS;
    return qmatmul_avx512bf16_kind(m ? QKIND_Q4 : QKIND_Q8, x, qs, d, m, bias, y, M, N, K, every, nthreads);
}
