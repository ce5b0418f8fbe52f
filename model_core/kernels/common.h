/* Shared by every build of the kernels library (see model_core/native.py): the exported API (aigc_kernels.h) and
 * what the sources share inside the library (hidden: the library exports only aigc_kernels.h's functions).
 *
 * The library is compiled once per instruction set (ISA) from the same entry points (layer.c):
 *   reference   reference.c: plain C, no SIMD; what the SIMD builds are tested against
 *   avx2        qmatmul.c, attention.c, ops.c with GCC vector types (simd.h) at 8 floats
 *   avx512bf16  the same at 16 floats, plus AVX512-BF16 dot products for bf16 activations
 *   neon        the same at 4 floats (aarch64)
 * The k_* primitives below are what each build implements; layer.c composes them.
 *
 * Activations (act) are float32 (ACT_F32) or bfloat16 (ACT_BF16, stored as uint16_t). In bf16, every
 * op rounds where PyTorch's bf16 modules round (norms, residual adds, SwiGLU, matmul outputs).
 */
#ifndef AIGC_KERNELS_COMMON_H
#define AIGC_KERNELS_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "aigc_kernels.h"

enum { ACT_F32 = 0, ACT_BF16 = 1 };

static inline float bf16_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, NaN stays NaN */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* IEEE half (the GGUF block scales) -> float, exact */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, f = h & 0x3FFu;
    uint32_t u;
    if (e == 0x1F) {
        u = sign | 0x7F800000u | (f << 13); /* inf, NaN */
    } else if (e) {
        u = sign | ((e + 112u) << 23) | (f << 13);
    } else { /* zero or subnormal: f * 2^-24 */
        float v = (float)f * 5.9604644775390625e-8f;
        memcpy(&u, &v, 4);
        u |= sign;
    }
    float r;
    memcpy(&r, &u, 4);
    return r;
}

static inline float load_act(const void *p, size_t i, int act) {
    return act == ACT_BF16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_act(void *p, size_t i, float v, int act) {
    if (act == ACT_BF16)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* v as the activation dtype holds it */
static inline float round_act(float v, int act) { return act == ACT_BF16 ? bf16_to_float(float_to_bf16(v)) : v; }

static inline size_t act_size(int act) { return act == ACT_BF16 ? 2 : 4; }

/* 32 activations -> int8 q with x ~ scale * q: scale = max|x| / 127, q = x / scale rounded to nearest even
 * (nearbyintf in the default rounding mode; the SIMD builds' conversions round the same way). Returns the
 * scale; q_sum gets the sum of q. */
static inline float quantize_block(const float *x, int8_t *q, int *q_sum) {
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    int s = 0;
    for (int i = 0; i < 32; i++) {
        q[i] = (int8_t)nearbyintf(x[i] * inv);
        s += q[i];
    }
    *q_sum = s;
    return scale;
}

/* 32 activations -> 16-bit q with x ~ scale * q, held as two int8 halves q = 255 hi + lo (both in -127..127): scale =
 * max|x| / 32512 (= 255 * 127 + 127), q = x / scale rounded to nearest even; hi = q / 255 rounded to nearest (never a tie),
 * lo = q - 255 hi. A block's sum with integer weights w is then S = 255 S_hi + S_lo, S_hi and S_lo the
 * int8 sums (exact), taken as fma(S_hi, 255, S_lo) in fp32 by every build. Returns the scale; q_sum gets the sum of
 * q, half_sum that of q's first 16. */
static inline float quantize_block16(const float *x, int8_t *hi, int8_t *lo, int *q_sum, int *half_sum) {
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float scale = amax / 32512.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    int s = 0, h = 0;
    for (int i = 0; i < 32; i++) {
        const int q = (int)nearbyintf(x[i] * inv), a = q < 0 ? -q : q, top = (a + 127) / 255;
        hi[i] = (int8_t)(q < 0 ? -top : top);
        lo[i] = (int8_t)(q - 255 * hi[i]);
        s += q;
        h += i < 16 ? q : 0;
    }
    *q_sum = s;
    *half_sum = h;
    return scale;
}

/* The attention parameters (aigc_kernels.h, paged_attention_decode), shared by every build so that they treat
 * scores and windows alike. softcap finite and >= 0 (0: none; NaN and infinity refused: inf tanh(s / inf) is NaN),
 * window >= 0 (0: none). */
static inline int attention_params_ok(float softcap, int window) {
    return softcap >= 0.0f && softcap <= 3.40282347e38f && window >= 0;
}

/* a score (scale q.k) soft-capped: softcap tanh(s / softcap) for softcap > 0, else s unchanged */
static inline float attention_score(float s, float softcap) {
    return softcap > 0.0f ? softcap * tanhf(s / softcap) : s;
}

/* the first of a sequence's n keys that a query sees: n - window for a window shorter than n, else 0 */
static inline int attention_window(int n, int window) { return window > 0 && window < n ? n - window : 0; }

/* The primitives every build implements. Shapes in elements; all activations in `act`.
 * k_qmatmul: y (M, N) = x (M, K) W^T (+ bias fp32), W as GGML blocks of 32 repacked (see
 *   model_core/qmatmul.py): 4-bit qs (N, K/32, 16) nibbles with fp16 d, m (N, K/32), w = d q + m;
 *   8-bit (m NULL) qs (N, K/32, 32) int8 with fp16 d, w = d q.
 *   i8 = 0: the exact products with x. i8 = 1 (builds with integer dot products: AVX2, NEON dotprod, and the
 *   reference): x is rounded to int8 per block of 32 (quantize_block) and W comes interleaved by 8 rows
 *   (model_core/qmatmul.py, QuantWeight.interleave): rows padded to G = ceil(N/8) groups; 4-bit qs
 *   (G, K/32, 4, 8, 4) = [group][block][k][row][bytes 4k..4k+3 of the row's 16], 8-bit qs (G, K/32, 8, 8, 4)
 *   = [group][block][k][row][bytes 4k..4k+3 of 32]; d, m (G, K/32, 8). Per output (row i, column n) with block
 *   sums I_b = sum_j w_j q_j (exact integers), scales s_b of x and t_b = s_b * sum_j q_j, in block order:
 *     acc = fma(I_b, d_b * s_b, acc);  off = fma(m_b, t_b, off);  y = acc + off (+ bias)
 *   which every build computes bit for bit the same way (a row's result never depends on the batch).
 *   Builds without int8 mode return AIGC_ERR_UNSUPPORTED for i8 = 1.
 * k_attention: out (B, nh, hs) = softmax(scores) V for q (B, nh, hs), keys/values read in place from
 *   a paged layer kv (rows, 2 nkv, hs) through rows (B, Tk), lens[b] keys each; score s = scale q.k, then
 *   softcap tanh(s / softcap) where softcap > 0 (attention_score); window > 0: only keys lens[b] - window ..
 *   lens[b] - 1 (attention_window), the others never read.
 * k_rmsnorm: out (B, C) = rmsnorm(x) * w.  k_add: x += y (n).  k_swiglu: g (B, F) = f(gate) * up, f SiLU or
 *   GELU-tanh (gate_fn: GATE_*, aigc_kernels.h)
 *   of gu (B, 2F).  k_rope: rotate nheads heads of hs (half-split form) by fp32 cos, sin (hs).
 * The int-returning ones return an AIGC_* status (aigc_kernels.h). */
int k_qmatmul(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
              void *y, int M, int N, int K, int i8, int nthreads);
/* k_qmatmul_kind: k_qmatmul for a weight of any kind (QKIND_*, aigc_kernels.h); QKIND_Q4 and QKIND_Q8 are
 *   k_qmatmul's two forms (m NULL for QKIND_Q8). The K-quants come in super-blocks of 256 weights (K a multiple of
 *   256, nsb = K/256 per row), repacked at load (model_core/qmatmul.py) so that every weight the kernels use is
 *   gguf.quants.dequantize's float32 bit for bit, at about the file's size:
 *   QKIND_Q4_K (the file: 144 bytes = 4.5 bits a weight; here 152 bytes = 4.75):
 *     qs (N, K/32, 16) uint8: sub-block j (32 weights) in the 4-bit blocks' order (byte i: low nibble weight i,
 *       high nibble weight 16 + i), where the file holds sub-blocks 2i and 2i + 1 as the low and high nibbles of
 *       one 32-byte run;
 *     d (N, nsb, 2) float32: the super-block's d and dmin (the file's fp16, widened);
 *     m (N, nsb, 16) uint8: the 8 sub-blocks' 6-bit scales sc_j, then their 6-bit mins mn_j (unpacked from 12 bytes);
 *     w = (d sc_j) q - (dmin mn_j), computed as fma(q, d sc_j, -(dmin mn_j)): both products are exact in fp32
 *     (11 + 6 + 4 bits), so it rounds once, as gguf's (d sc) q - dmin mn does.
 *   QKIND_Q6_K (the file: 210 bytes = 6.5625 bits a weight; here 212 bytes = 6.625):
 *     qs (N, K/32, 24) uint8 per sub-block of 32: bytes 0..15 the low 4 bits of q in the 4-bit order (byte i: low
 *       nibble weight i, high nibble weight 16 + i), bytes 16..23 the high 2 bits (byte 16 + i: bits 0-1 weight i,
 *       2-3 weight 8 + i, 4-5 weight 16 + i, 6-7 weight 24 + i); q = low | high << 4 in 0..63;
 *     d (N, nsb) float32: the super-block's d (the file's fp16, widened);
 *     m (N, nsb, 16) int8: the scale of each 16 weights;
 *     w = (d sc) (q - 32): exact in fp32 (11 + 7 + 6 bits), in any order.
 *   The 5-bit kinds keep q's fifth bits apart from its low four: qs (N, K/32, 20) uint8 per block (or sub-block) of 32:
 *     bytes 0..15 the low 4 bits in the 4-bit order (byte i: low nibble weight i, high nibble weight 16 + i), bytes
 *     16..19 the fifth bits as a little-endian uint32 (bit i: weight i); q = low | fifth << 4 in 0..31; all three
 *     compute w = fma(q, d', m') for their d', m' below (one rounding, of an exact d' q: gguf's value):
 *   QKIND_Q5_0 (blocks of 32, K a multiple of 32; the file: 22 bytes = 5.5 bits a weight; here 22 bytes = 5.5):
 *     d (N, K/32) fp16, m NULL; w = d (q - 16): d' = d, m' = -16 d (exact in fp32), so w is exact.
 *   QKIND_Q5_1 (blocks of 32; the file: 24 bytes = 6 bits a weight; here 24 bytes = 6):
 *     d, m (N, K/32) fp16; w = d q + m.
 *   QKIND_Q5_K (super-blocks of 256; the file: 176 bytes = 5.5 bits a weight; here 184 bytes = 5.75):
 *     qs as above per sub-block j, d (N, nsb, 2) float32 and m (N, nsb, 16) uint8 as QKIND_Q4_K's;
 *     w = (d sc_j) q - (dmin mn_j): d' = d sc_j (11 + 6 bits), m' = -(dmin mn_j), both exact.
 *   QKIND_IQ4 (IQ4_NL, IQ4_XS; blocks of 32; the files: 4.5 and 4.25 bits a weight, here 5): qs (N, K/32, 16) the
 *     4-bit indices in the 4-bit order, d (N, K/32) float32 (IQ4_NL: the block's fp16 d; IQ4_XS: d (ls - 32), exact),
 *     m NULL; w = d IQ4_VALUES[q] (one rounding, as gguf's).
 *   The 2- and 3-bit K-quants (super-blocks of 256, a scale per 16 weights) keep q's low two bits in 8 bytes per
 *     sub-block of 32: byte i bits 2s..2s+1 hold weight 8s + i's (Q6_K's high pairs' order):
 *   QKIND_Q2_K (the file: 84 bytes = 2.625 bits a weight; here 88 bytes = 2.75):
 *     qs (N, K/32, 8) uint8 the 2-bit q (0..3) as above;
 *     d (N, nsb, 2) float32: the super-block's d and dmin (the file's fp16, widened);
 *     m (N, nsb, 16) uint8: the file's byte per 16 weights, scale sc (bits 0-3) | min mn << 4;
 *     w = (d sc) q - (dmin mn), computed as fma(q, d sc, -(dmin mn)): both products exact (11 + 4 + 2 bits), one
 *     rounding, as gguf's.
 *   QKIND_Q3_K (the file: 110 bytes = 3.4375 bits a weight; here 116 bytes = 3.625):
 *     qs (N, K/32, 12) uint8: bytes 0..7 q's low two bits as above, bytes 8..11 its third bits as a little-endian
 *       uint32 (bit i: weight i); q = low | third << 2 in 0..7 (the file's q3 = q - 4);
 *     d (N, nsb) float32: the super-block's d; m (N, nsb, 16) int8: the 6-bit signed scale sc of each 16 weights;
 *     w = (d sc) (q - 4): exact in fp32 (11 + 6 + 3 bits), in any order.
 *   QKIND_F16, QKIND_BF16 (K a multiple of 32): qs (N, K) the file's IEEE half or bfloat16 weights, d and m NULL; the
 *     exact products in either mode (i8 is ignored: the weights stay in row form, and are never interleaved).
 *   i8 = 1 (the builds with int8 mode): every quantized kind interleaved by 8 rows as k_qmatmul's, per block of 32 (qs (G, K/32,
 *   bytes/4, 8, 4) of the row form's bytes per block: 16, 20 or 24) and with the rows last in d and m: per-32 d, m
 *   (G, K/32, 8) fp16; QKIND_Q4_K, QKIND_Q5_K, QKIND_Q2_K d (G, nsb, 2, 8) fp32, m (G, nsb, 16, 8) uint8; QKIND_Q6_K,
 *   QKIND_Q3_K d (G, nsb, 8) fp32, m (G, nsb, 16, 8) int8 (model_core/qmatmul.py, QuantWeight.interleave). Per block of 32 each kind is
 *   w = d' q + m' with exact d' and m' (Q4_K, Q5_K: d sc_j and -(dmin mn_j); Q5_0: d and -16 d) and sums as k_qmatmul's
 *   4-bit blocks; Q6_K's block sum is the exact integer I_b = sc_lo sum_lo + sc_hi sum_hi (q - 32 by the int8 x of
 *   each half of 16), acc = fma(I_b, d * s_b, acc), no offsets term; Q3_K's the same with q - 4. Q2_K's I_b = sc_lo
 *   sum_lo + sc_hi sum_hi (q by the int8 x), acc as Q6_K's, and an offset per half of 16 instead of per block: with
 *   t_h = s_b * sum_h q_x (the half's int8 x), off = fma(-(dmin mn_lo), t_lo, off), then the same for the high half.
 *   Bit for bit the same in every build.
 */
int k_qmatmul_kind(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m,
                   const float *bias, void *y, int M, int N, int K, int i8, int nthreads);
/* the weights per block of a kind other than QKIND_Q4/QKIND_Q8 (K is a multiple of it); 0: not such a kind */
static inline int qkind_block(int kind) {
    switch (kind) {
    case QKIND_Q4_K: case QKIND_Q5_K: case QKIND_Q6_K: case QKIND_Q2_K: case QKIND_Q3_K: return 256;
    case QKIND_Q5_0: case QKIND_Q5_1: case QKIND_F16: case QKIND_BF16: case QKIND_IQ4: return 32;
    default: return 0;
    }
}
/* the values QKIND_IQ4's 4-bit indices stand for (llama.cpp's kvalues_iq4nl) */
static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
/* the kinds whose m is NULL (besides the float ones) */
static inline int qkind_no_m(int kind) { return kind == QKIND_Q8 || kind == QKIND_Q5_0 || kind == QKIND_IQ4; }
/* float weights (QKIND_F16, QKIND_BF16): qs holds them as stored, d and m are NULL, and i8 does not apply */
static inline int qkind_float(int kind) { return kind == QKIND_F16 || kind == QKIND_BF16; }
/* k_qmatmul_kind's arguments for a kind other than QKIND_Q4/QKIND_Q8: a known kind, K a multiple of its block, M and
 * N >= 1, its buffers given (d but for the float kinds, m but for those and qkind_no_m's) */
static inline int qkind_args_ok(int kind, const void *qs, const void *d, const void *m, int M, int N, int K) {
    const int block = qkind_block(kind);
    if (!block || K % block || M <= 0 || N <= 0 || !qs) return 0;
    return qkind_float(kind) || (d && (m || qkind_no_m(kind)));
}
/* the bytes of one weight row (K weights) of such a kind in qs, d and m (0: no m) */
static inline void qkind_row_bytes(int kind, int K, size_t *qs, size_t *d, size_t *m) {
    const size_t nb = (size_t)K / 32, nsb = (size_t)K / 256;
    if (qkind_float(kind)) {
        *qs = (size_t)K * 2, *d = *m = 0;
        return;
    }
    if (kind == QKIND_IQ4) {
        *qs = nb * 16, *d = nb * 4, *m = 0;
        return;
    }
    if (kind == QKIND_Q2_K || kind == QKIND_Q3_K) {
        *qs = nb * (kind == QKIND_Q2_K ? 8 : 12), *d = nsb * (kind == QKIND_Q2_K ? 8 : 4), *m = nsb * 16;
        return;
    }
    *qs = nb * (kind == QKIND_Q4_K ? 16 : kind == QKIND_Q6_K ? 24 : 20);
    *d = kind == QKIND_Q5_0 || kind == QKIND_Q5_1 ? nb * 2 : nsb * 4 * (kind == QKIND_Q6_K ? 1 : 2);
    *m = kind == QKIND_Q5_1 ? nb * 2 : kind == QKIND_Q5_0 ? 0 : nsb * 16;
}
/* k_dequantize: out (N, K) in act = the weights of a row-form matrix of any kind (as k_qmatmul_kind takes it; QKIND_Q4,
 * QKIND_Q8 as k_qmatmul), gguf's float32 values, rounded to bf16 (nearest even) for ACT_BF16 */
int k_dequantize(int kind, const uint8_t *qs, const void *d, const void *m, void *out, int N, int K, int act,
                 int nthreads);
int k_attention(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out, int B, int nh,
                int nkv, int hs, int Tk, float scale, float softcap, int window, int act, int nthreads);
void k_rmsnorm(const void *x, const void *w, float eps, void *out, int B, int C, int act);
void k_add(void *x, const void *y, size_t n, int act);
void k_swiglu(const void *gu, void *g, int B, int F, int gate_fn, int act);
/* a gate's activation of one value, as k_swiglu's scalar tail and the reference compute it */
static inline float gate_value(float v, int gate_fn) {
    if (gate_fn == GATE_GELU_TANH) return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    return v / (1.0f + expf(-v));
}
void k_rope(void *v, int nheads, int hs, const float *cos, const float *sin, int act);

/* k_qmatmul's int8 mode with integer dot products (qmatmul_i8.c), and the AVX512-BF16 build's kernel for bf16
 * activations (qmatmul_avx512bf16.c): the same arguments and statuses */
#if defined(__AVX2__) || defined(__ARM_FEATURE_DOTPROD)
#define QMATMUL_I8 /* this build has integer dot products for i8 mode */
int qmatmul_i8(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m, const float *bias,
               void *y, int M, int N, int K, int i16, int nthreads);
#endif
#if defined(__AVX512BF16__)
/* every: AIGC_EVERY_BATCH (one method at every batch size: AMX tiles where the CPU has them, else the vector path) or
 * 0 (AMX tiles from AMX_MIN_ROWS rows, where the CPU has them) */
int qmatmul_avx512bf16(const uint16_t *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
                       uint16_t *y, int M, int N, int K, int every, int nthreads);
int qmatmul_avx512bf16_kind(int kind, const uint16_t *x, const uint8_t *qs, const void *d, const void *m,
                            const float *bias, uint16_t *y, int M, int N, int K, int every, int nthreads);
#endif

#endif
