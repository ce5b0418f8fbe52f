/* The reference build: every primitive in plain C, one element at a time, written for clarity. The SIMD
 * builds are tested against it (and it against PyTorch); it also runs where no SIMD build applies. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

/* the weight (n, k) of a repacked GGML matrix (see common.h) */
static float weight_at(const uint8_t *qs, const uint16_t *d, const uint16_t *m, int nb, int n, int k) {
    const int b = k / 32, i = k % 32;
    const size_t blk = (size_t)n * nb + b;
    if (m) {
        const uint8_t byte = qs[blk * 16 + i % 16];
        const int q = i < 16 ? byte & 0x0F : byte >> 4;
        return half_to_float(d[blk]) * (float)q + half_to_float(m[blk]);
    }
    return half_to_float(d[blk]) * (float)(int8_t)qs[blk * 32 + i];
}

/* In the int8 mode's layout (interleaved by 8 rows; common.h): the integer factor of weight (n, k) that multiplies
 * its int8 activation, and its block's float scale *dn and offset *mn, so that w = dn q + mn (Q6_K: q = sc (q6 - 32),
 * its half's integer scale times the quant, and w = dn q) */
static int quant8_at(int kind, const uint8_t *qs, const void *d, const void *m, int nb, int n, int k, float *dn,
                     float *mn) {
    const int g = n / 8, r = n % 8, b = k / 32, i = k % 32, nsb = nb / 8, s = b / 8, j = b % 8;
    const size_t blk = (size_t)g * nb + b, sb = (size_t)g * nsb + s;
    const int bytes = kind == QKIND_Q8 ? 32 : kind == QKIND_Q6_K ? 24 : kind == QKIND_Q5_0 || kind == QKIND_Q5_1 || kind == QKIND_Q5_K ? 20
                      : kind == QKIND_Q2_K ? 8 : kind == QKIND_Q3_K ? 12 : 16;
#define BYTE(t) qs[((blk * (bytes / 4) + (t) / 4) * 8 + r) * 4 + (t) % 4] /* byte t of row r's block */
    const uint16_t *dh = d, *mh = m;
    *mn = 0.0f;
    switch (kind) {
    case QKIND_Q4: case QKIND_Q5_1: *dn = half_to_float(dh[blk * 8 + r]), *mn = half_to_float(mh[blk * 8 + r]); break;
    case QKIND_Q8: *dn = half_to_float(dh[blk * 8 + r]); break;
    case QKIND_Q5_0: *dn = half_to_float(dh[blk * 8 + r]), *mn = -16.0f * *dn; break;
    case QKIND_Q4_K: case QKIND_Q5_K: {
        const float *sd = d;
        const uint8_t *sm = m;
        *dn = sd[(sb * 2) * 8 + r] * (float)sm[(sb * 16 + j) * 8 + r];
        *mn = -(sd[(sb * 2 + 1) * 8 + r] * (float)sm[(sb * 16 + 8 + j) * 8 + r]);
        break;
    }
    case QKIND_IQ4: *dn = ((const float *)d)[blk * 8 + r]; break;
    case QKIND_Q2_K: { /* w = d (sc q) - dmin mn: the offset per half of 16 */
        const uint8_t byte = ((const uint8_t *)m)[(sb * 16 + 2 * j + i / 16) * 8 + r];
        *dn = ((const float *)d)[(sb * 2) * 8 + r];
        *mn = -(((const float *)d)[(sb * 2 + 1) * 8 + r] * (float)(byte >> 4));
        return (byte & 0x0F) * ((BYTE(i % 8) >> (2 * (i / 8))) & 3);
    }
    default: *dn = ((const float *)d)[sb * 8 + r]; /* QKIND_Q6_K, QKIND_Q3_K */
    }
    if (kind == QKIND_Q3_K) { /* sc (q - 4), q = low | third << 2 */
        const int low = (BYTE(i % 8) >> (2 * (i / 8))) & 3, third = (BYTE(8 + i / 8) >> (i % 8)) & 1;
        return ((const int8_t *)m)[(sb * 16 + 2 * j + i / 16) * 8 + r] * ((low | third << 2) - 4);
    }
    if (kind == QKIND_Q8) return (int8_t)BYTE(i);
    const int nib = i < 16 ? BYTE(i % 16) & 0x0F : BYTE(i % 16) >> 4;
    if (kind == QKIND_IQ4) return IQ4_VALUES[nib];
    if (kind == QKIND_Q4 || kind == QKIND_Q4_K) return nib;
    if (kind == QKIND_Q6_K) {
        const int hi = (BYTE(16 + i % 8) >> (2 * (i / 8))) & 3, sc = ((const int8_t *)m)[(sb * 16 + 2 * j + i / 16) * 8 + r];
        return sc * (nib + (hi << 4) - 32);
    }
    return nib | (((BYTE(16 + i / 8) >> (i % 8)) & 1) << 4); /* the 5-bit kinds */
#undef BYTE
}

static int ref_qmatmul_i8(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m,
                          const float *bias, void *y, int M, int N, int K, int i16) {
    const int nb = K / 32;
    float xf[32], *scale = malloc((size_t)nb * 4 * sizeof(float));
    int8_t *xq = malloc((size_t)K * 2); /* per block: q (int16 mode: hi, then lo) */
    int rc = scale && xq ? AIGC_OK : AIGC_ERR_NOMEM;
    for (int r = 0; r < M && !rc; r++) {
        float *t = scale + nb, *t_half = t + nb; /* scale * sum q: of the block, of its first 16, of its last 16 */
        for (int b = 0; b < nb; b++) {
            int q_sum, half = 0;
            for (int i = 0; i < 32; i++) xf[i] = load_act(x, (size_t)r * K + b * 32 + i, act);
            if (i16) {
                scale[b] = quantize_block16(xf, xq + b * 64, xq + b * 64 + 32, &q_sum, &half);
            } else {
                scale[b] = quantize_block(xf, xq + b * 32, &q_sum);
                for (int i = 0; i < 16; i++) half += xq[b * 32 + i];
            }
            t[b] = scale[b] * (float)q_sum;
            t_half[b] = scale[b] * (float)half;
            t_half[nb + b] = scale[b] * (float)(q_sum - half);
        }
        const int planes = i16 ? 2 : 1;
        for (int n = 0; n < N; n++) {
            float acc = 0.0f, off = 0.0f;
            for (int b = 0; b < nb; b++) {
                float dn = 0.0f, mn = 0.0f;
                int sum[2] = {0, 0};
                for (int i = 0; i < 32; i++) {
                    const int w = quant8_at(kind, qs, d, m, nb, n, b * 32 + i, &dn, &mn);
                    for (int p = 0; p < planes; p++) sum[p] += w * xq[(b * planes + p) * 32 + i];
                    if (kind == QKIND_Q2_K && i == 15) off = fmaf(mn, t_half[b], off); /* an offset per half */
                    if (kind == QKIND_Q2_K && i == 31) off = fmaf(mn, t_half[nb + b], off);
                }
                const float s = i16 ? fmaf((float)sum[0], 255.0f, (float)sum[1]) : (float)sum[0];
                acc = fmaf(s, dn * scale[b], acc);
                if (kind != QKIND_Q2_K) off = fmaf(mn, t[b], off);
            }
            store_act(y, (size_t)r * N + n, acc + off + (bias ? bias[n] : 0.0f), act);
        }
    }
    free(scale);
    free(xq);
    return rc;
}

int k_qmatmul(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
              void *y, int M, int N, int K, int i8, int nthreads) {
    (void)nthreads;
    if (K % 32 || M <= 0 || N <= 0) return AIGC_ERR_ARGS;
    if (i8 & AIGC_INT8) return ref_qmatmul_i8(x, act, m ? QKIND_Q4 : QKIND_Q8, qs, d, m, bias, y, M, N, K, i8 & AIGC_INT16);
    for (int r = 0; r < M; r++)
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += weight_at(qs, d, m, K / 32, n, k) * load_act(x, (size_t)r * K + k, act);
            store_act(y, (size_t)r * N + n, s + (bias ? bias[n] : 0.0f), act);
        }
    return AIGC_OK;
}

int k_attention(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out, int B, int nh,
                int nkv, int hs, int Tk, float scale, float softcap, int window, int act, int nthreads) {
    (void)nthreads;
    if (hs % 16 || nh % nkv || B <= 0 || Tk <= 0 || !attention_params_ok(softcap, window)) return AIGC_ERR_ARGS;
    const size_t row = (size_t)2 * nkv * hs; /* elements per cache row: K heads, then V heads */
    float *s = malloc((size_t)(window > 0 && window < Tk ? window : Tk) * sizeof(float)); /* a window's scores */
    if (!s) return AIGC_ERR_NOMEM;
    int rc = AIGC_OK;
    for (int b = 0; b < B && !rc; b++) {
        const int n = lens[b];
        if (n <= 0 || n > Tk) {
            rc = AIGC_ERR_ARGS;
            break;
        }
        const int t0 = attention_window(n, window); /* keys t0..n-1: s[t - t0] */
        for (int h = 0; h < nh; h++) {
            const int kvh = h / (nh / nkv);
            const size_t qat = ((size_t)b * nh + h) * hs;
            float mx = -INFINITY, sum = 0.0f;
            for (int t = t0; t < n; t++) {
                const size_t k = (size_t)rows[(size_t)b * Tk + t] * row + (size_t)kvh * hs;
                float dot = 0.0f;
                for (int i = 0; i < hs; i++) dot += load_act(q, qat + i, act) * load_act(kv, k + i, act);
                s[t - t0] = attention_score(dot * scale, softcap);
                mx = s[t - t0] > mx ? s[t - t0] : mx;
            }
            for (int t = t0; t < n; t++) sum += (s[t - t0] = expf(s[t - t0] - mx));
            for (int i = 0; i < hs; i++) {
                float o = 0.0f;
                for (int t = t0; t < n; t++) {
                    const size_t v = (size_t)rows[(size_t)b * Tk + t] * row + (size_t)(nkv + kvh) * hs;
                    o += s[t - t0] * load_act(kv, v + i, act);
                }
                store_act(out, qat + i, o / sum, act);
            }
        }
    }
    free(s);
    return rc;
}

void k_rmsnorm(const void *x, const void *w, float eps, void *out, int B, int C, int act) {
    for (int b = 0; b < B; b++) {
        const size_t at = (size_t)b * C;
        float ss = 0.0f;
        for (int i = 0; i < C; i++) ss += load_act(x, at + i, act) * load_act(x, at + i, act);
        const float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (int i = 0; i < C; i++)
            store_act(out, at + i, round_act(load_act(x, at + i, act) * r, act) * load_act(w, i, act), act);
    }
}

void k_add(void *x, const void *y, size_t n, int act) {
    for (size_t i = 0; i < n; i++) store_act(x, i, load_act(x, i, act) + load_act(y, i, act), act);
}

void k_swiglu(const void *gu, void *g, int B, int F, int gate_fn, int act) {
    for (int b = 0; b < B; b++)
        for (int i = 0; i < F; i++) {
            const float gate = load_act(gu, (size_t)b * 2 * F + i, act), up = load_act(gu, (size_t)b * 2 * F + F + i, act);
            store_act(g, (size_t)b * F + i, round_act(gate_value(gate, gate_fn), act) * up, act);
        }
}

void k_rope(void *v, int nheads, int hs, const float *cos, const float *sin, int act) {
    const int half = hs / 2;
    for (int h = 0; h < nheads; h++)
        for (int i = 0; i < half; i++) {
            const size_t at = (size_t)h * hs + i;
            const float a = load_act(v, at, act), b = load_act(v, at + half, act);
            store_act(v, at, a * cos[i] - b * sin[i], act);
            store_act(v, at + half, b * cos[i + half] + a * sin[i + half], act);
        }
}

/* the weight (n, k) of a repacked 5-bit matrix (QKIND_Q5_0, QKIND_Q5_1, QKIND_Q5_K; common.h, k_qmatmul_kind):
 * w = fma(q, d', m') */
static float weight_at_q5(int kind, const uint8_t *qs, const void *d, const void *m, int K, int n, int k) {
    const size_t sub = (size_t)n * (K / 32) + k / 32; /* block (or sub-block) of 32 */
    const int i = k % 32;
    const uint8_t *b = qs + sub * 20;
    const int q = (i < 16 ? b[i] & 0x0F : b[i - 16] >> 4) | (((b[16 + i / 8] >> (i % 8)) & 1) << 4);
    if (kind == QKIND_Q5_K) {
        const size_t sb = (size_t)n * (K / 256) + k / 256;
        const int j = (k % 256) / 32;
        const float *sd = d;
        const uint8_t *sm = m;
        return fmaf((float)q, sd[2 * sb] * (float)sm[sb * 16 + j], -(sd[2 * sb + 1] * (float)sm[sb * 16 + 8 + j]));
    }
    const float db = half_to_float(((const uint16_t *)d)[sub]);
    return fmaf((float)q, db, kind == QKIND_Q5_1 ? half_to_float(((const uint16_t *)m)[sub]) : -16.0f * db);
}

/* the weight (n, k) of a repacked K-quant matrix (QKIND_Q4_K, QKIND_Q6_K, QKIND_Q2_K, QKIND_Q3_K; common.h,
 * k_qmatmul_kind) */
static float weight_at_k(int kind, const uint8_t *qs, const float *d, const uint8_t *m, int nsb, int n, int k) {
    const size_t sb = (size_t)n * nsb + k / 256, sub = (size_t)n * nsb * 8 + k / 32; /* super-block, sub-block */
    const int i = k % 32, j = (k % 256) / 32;
    if (kind == QKIND_Q2_K || kind == QKIND_Q3_K) {
        const uint8_t *q = qs + sub * (kind == QKIND_Q2_K ? 8 : 12), byte = m[sb * 16 + (k % 256) / 16];
        const int low = (q[i % 8] >> (2 * (i / 8))) & 3;
        if (kind == QKIND_Q2_K) return fmaf((float)low, d[2 * sb] * (float)(byte & 0x0F), -(d[2 * sb + 1] * (float)(byte >> 4)));
        return d[sb] * (float)(int8_t)byte * (float)((low | ((q[8 + i / 8] >> (i % 8)) & 1) << 2) - 4);
    }
    const uint8_t lo = qs[sub * (kind == QKIND_Q4_K ? 16 : 24) + i % 16];
    const int nib = i < 16 ? lo & 0x0F : lo >> 4;
    if (kind == QKIND_Q4_K) {
        const float scale = d[2 * sb] * (float)m[sb * 16 + j], min = d[2 * sb + 1] * (float)m[sb * 16 + 8 + j];
        return fmaf((float)nib, scale, -min);
    }
    const int hi = (qs[sub * 24 + 16 + i % 8] >> (2 * (i / 8))) & 3;
    const float scale = d[sb] * (float)(int8_t)m[sb * 16 + (k % 256) / 16];
    return scale * (float)(nib + (hi << 4) - 32);
}

/* the weight (n, k) of a row-form matrix of any kind but QKIND_Q4/QKIND_Q8 (common.h, k_qmatmul_kind) */
static float kind_weight_at(int kind, const uint8_t *qs, const void *d, const void *m, int K, int n, int k) {
    const size_t sub = (size_t)n * (K / 32) + k / 32;
    if (qkind_float(kind)) return (kind == QKIND_F16 ? half_to_float : bf16_to_float)(((const uint16_t *)qs)[(size_t)n * K + k]);
    if (kind == QKIND_IQ4)
        return ((const float *)d)[sub] * (float)IQ4_VALUES[k % 32 < 16 ? qs[sub * 16 + k % 16] & 0x0F : qs[sub * 16 + k % 16] >> 4];
    if (kind == QKIND_Q5_0 || kind == QKIND_Q5_1 || kind == QKIND_Q5_K) return weight_at_q5(kind, qs, d, m, K, n, k);
    return weight_at_k(kind, qs, d, m, K / 256, n, k);
}

int k_qmatmul_kind(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m,
                   const float *bias, void *y, int M, int N, int K, int i8, int nthreads) {
    if (kind == QKIND_Q4 || kind == QKIND_Q8)
        return m || kind == QKIND_Q8 ? k_qmatmul(x, act, qs, d, kind == QKIND_Q4 ? m : NULL, bias, y, M, N, K, i8,
                                                 nthreads)
                                     : AIGC_ERR_ARGS;
    if (!qkind_args_ok(kind, qs, d, m, M, N, K)) return AIGC_ERR_ARGS;
    const int fl = qkind_float(kind);
    if ((i8 & AIGC_INT8) && !fl) return ref_qmatmul_i8(x, act, kind, qs, d, m, bias, y, M, N, K, i8 & AIGC_INT16);
    for (int r = 0; r < M; r++)
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += kind_weight_at(kind, qs, d, m, K, n, k) * load_act(x, (size_t)r * K + k, act);
            store_act(y, (size_t)r * N + n, s + (bias ? bias[n] : 0.0f), act);
        }
    return AIGC_OK;
}

int k_dequantize(int kind, const uint8_t *qs, const void *d, const void *m, void *out, int N, int K, int act,
                 int nthreads) {
    (void)nthreads;
    if (kind == QKIND_Q4 || kind == QKIND_Q8) {
        if (K % 32 || N <= 0 || !qs || !d || (kind == QKIND_Q4 && !m)) return AIGC_ERR_ARGS;
    } else if (!qkind_args_ok(kind, qs, d, m, 1, N, K)) {
        return AIGC_ERR_ARGS;
    }
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            store_act(out, (size_t)n * K + k,
                      kind == QKIND_Q4 || kind == QKIND_Q8
                          ? weight_at(qs, d, kind == QKIND_Q4 ? m : NULL, K / 32, n, k)
                          : kind_weight_at(kind, qs, d, m, K, n, k),
                      act);
    return AIGC_OK;
}
