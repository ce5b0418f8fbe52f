/* A llama decoder layer for a decode step (one new token per sequence), in C:
 *   h = rmsnorm(x) * w_attn;  q, k, v = h Wqkv;  rotate q, k;  store k, v in the paged cache;
 *   x += attention(q, cache) Wo;  h = rmsnorm(x) * w_ffn;  x += (silu(h Wg) * (h Wu)) Wd
 * with the four projections on quantized weights (quant_matmul_bf16) and attention read in place from the
 * cache (paged_attention_decode); or its pieces, between PyTorch's own matmuls. Activations are
 * bfloat16, rounded where PyTorch's bf16 modules round them (norms, residual adds, SwiGLU), so the
 * result matches the module path up to fp32 summation order; RoPE is fp32 from fp32 cos/sin.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

/* out = bf16(bf16(x / rms(x)) * w) per row of C features (PyTorch's bf16 RMSNorm order) */
static void rmsnorm_rows(const uint16_t *x, const uint16_t *w, float eps, uint16_t *out, int B, int C) {
    for (int b = 0; b < B; b++) {
        const uint16_t *xr = x + (size_t)b * C;
        float ss = 0.0f;
        for (int i = 0; i < C; i++) {
            const float v = bf16_to_float(xr[i]);
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (int i = 0; i < C; i++) {
            const float n = bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * r));
            out[(size_t)b * C + i] = float_to_bf16(n * bf16_to_float(w[i]));
        }
    }
}

/* rotate heads [0, nheads) of row b (each hs wide, half-split form) by cos/sin (hs each) */
static void rope_heads(uint16_t *v, int nheads, int hs, const float *cos, const float *sin) {
    const int half = hs / 2;
    for (int h = 0; h < nheads; h++) {
        uint16_t *p = v + (size_t)h * hs;
        for (int i = 0; i < half; i++) {
            const float a = bf16_to_float(p[i]), b = bf16_to_float(p[i + half]);
            p[i] = float_to_bf16(a * cos[i] - b * sin[i]);
            p[i + half] = float_to_bf16(b * cos[i + half] + a * sin[i + half]);
        }
    }
}

/* x[i] = bf16(x[i] + y[i]) */
static void add_into(uint16_t *x, const uint16_t *y, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) store_bf16x16(x + i, _mm512_add_ps(load_bf16x16(x + i), load_bf16x16(y + i)));
    for (; i < n; i++) x[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(y[i]));
}

/* x * sigmoid(x) for any x: sigmoid from e^-|x| (never overflows) */
static inline __m512 silu(__m512 x) {
    const __m512 t = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __m512 one = _mm512_set1_ps(1.0f);
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_blend_ps(neg, one, t);
    return _mm512_mul_ps(x, _mm512_div_ps(num, _mm512_add_ps(one, t)));
}

/* g[b, i] = bf16(bf16(silu(gu[b, i])) * gu[b, F + i]) (PyTorch: F.silu(gate) * up, each rounded) */
static void swiglu_rows(const uint16_t *gu, uint16_t *g, int B, int F) {
    for (int b = 0; b < B; b++) {
        const uint16_t *gate = gu + (size_t)b * 2 * F, *up = gate + F;
        uint16_t *out = g + (size_t)b * F;
        int i = 0;
        for (; i + 16 <= F; i += 16) {
            const __m512 a = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(silu(load_bf16x16(gate + i))));
            store_bf16x16(out + i, _mm512_mul_ps(a, load_bf16x16(up + i)));
        }
        for (; i < F; i++) {
            const float x = bf16_to_float(gate[i]);
            const float a = bf16_to_float(float_to_bf16(x / (1.0f + expf(-x))));
            out[i] = float_to_bf16(a * bf16_to_float(up[i]));
        }
    }
}

/* The pieces of a decode step's layer, exported for the path that keeps PyTorch's dense matmuls
 * (batches too big for the quantized kernel): each replaces several small PyTorch ops. */

/* out = rmsnorm(x) * w, (B, C) bf16 */
int llama_rmsnorm(const uint16_t *x, const uint16_t *w, float eps, uint16_t *out, int B, int C) {
    rmsnorm_rows(x, w, eps, out, B, C);
    return 0;
}

/* x = bf16(x + y); then, when w is given, out = rmsnorm(x) * w (the next sublayer's input) */
int llama_add_rmsnorm(uint16_t *x, const uint16_t *y, const uint16_t *w, float eps, uint16_t *out, int B, int C) {
    add_into(x, y, (size_t)B * C);
    if (w) rmsnorm_rows(x, w, eps, out, B, C);
    return 0;
}

/* g (B, F) = silu(gate) * up of gu (B, 2F) = [gate | up] */
int llama_swiglu(const uint16_t *gu, uint16_t *g, int B, int F) {
    swiglu_rows(gu, g, B, F);
    return 0;
}

/* qkv (B, (nh + 2 nkv) hs) -> att (B, nh hs): rotate q and k heads (in place), store k, v at the rows
 * `write` of this layer's cache kv, attend from the paged rows. */
int llama_attention(uint16_t *qkv, int B, const float *cos, const float *sin, uint16_t *kv, const int64_t *write,
                    const int64_t *rows, const int32_t *lens, uint16_t *att, int Tk, int nh, int nkv, int hs,
                    int nthreads) {
    const int qkv_n = (nh + 2 * nkv) * hs, q_n = nh * hs;
    const size_t row = (size_t)2 * nkv * hs;
    uint16_t *q = malloc(sizeof(uint16_t) * (size_t)B * q_n);
    if (!q) return -1;
    for (int b = 0; b < B; b++) {
        uint16_t *r = qkv + (size_t)b * qkv_n; /* [q heads | k heads | v heads] */
        rope_heads(r, nh + nkv, hs, cos + (size_t)b * hs, sin + (size_t)b * hs);
        memcpy(q + (size_t)b * q_n, r, sizeof(uint16_t) * q_n);
        memcpy(kv + (size_t)write[b] * row, r + q_n, sizeof(uint16_t) * row);
    }
    const int rc = paged_attention_decode(q, kv, rows, lens, att, B, nh, nkv, hs, Tk, 1.0f / sqrtf((float)hs), 1,
                                          nthreads);
    free(q);
    return rc;
}

/* The whole layer with its four projections on quantized weights.
 * w: the 12 pointers (qs, d, m; m NULL for Q8_0) of Wqkv, Wo, Wgate|up, Wdown; kv: this layer's store (rows, 2*nkv, hs);
 * write: (B,) rows for this step's k, v; rows: (B, Tk) key rows; lens: (B,) keys per sequence;
 * cos, sin: (B, hs) fp32 for each sequence's position. x (B, C) is updated in place. 0, or -1. */
int llama_decode_layer(uint16_t *x, int B, int C, const uint16_t *attn_norm, const uint16_t *ffn_norm, float eps,
                       const void *const *w, const float *cos, const float *sin, uint16_t *kv, const int64_t *write,
                       const int64_t *rows, const int32_t *lens, int Tk, int nh, int nkv, int hs, int F,
                       int nthreads) {
    if (B <= 0 || C % 32 || F % 32 || (nh * hs) % 32 || hs % 16 || nh % nkv) return -1;
    const int qkv_n = (nh + 2 * nkv) * hs, q_n = nh * hs;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)B * (C > F ? C : F));
    uint16_t *qkv = malloc(sizeof(uint16_t) * (size_t)B * qkv_n);
    uint16_t *att = malloc(sizeof(uint16_t) * (size_t)B * q_n);
    uint16_t *gu = malloc(sizeof(uint16_t) * (size_t)B * 2 * F);
    uint16_t *o = malloc(sizeof(uint16_t) * (size_t)B * C);
    int rc = -1;
    if (!h || !qkv || !att || !gu || !o) goto done;
#define W(i) ((const uint8_t *)w[3 * (i)]), ((const uint16_t *)w[3 * (i) + 1]), ((const uint16_t *)w[3 * (i) + 2])
    rmsnorm_rows(x, attn_norm, eps, h, B, C);
    if (quant_matmul_bf16(h, W(0), NULL, qkv, B, qkv_n, C, nthreads)) goto done;
    if (llama_attention(qkv, B, cos, sin, kv, write, rows, lens, att, Tk, nh, nkv, hs, nthreads)) goto done;
    if (quant_matmul_bf16(att, W(1), NULL, o, B, C, q_n, nthreads)) goto done;
    add_into(x, o, (size_t)B * C);
    rmsnorm_rows(x, ffn_norm, eps, h, B, C);
    if (quant_matmul_bf16(h, W(2), NULL, gu, B, 2 * F, C, nthreads)) goto done;
    swiglu_rows(gu, h, B, F);
    if (quant_matmul_bf16(h, W(3), NULL, o, B, C, F, nthreads)) goto done;
    add_into(x, o, (size_t)B * C);
    rc = 0;
#undef W
done:
    free(h);
    free(qkv);
    free(att);
    free(gu);
    free(o);
    return rc;
}
