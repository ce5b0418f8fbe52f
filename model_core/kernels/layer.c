/* The library's entry points (every build): the primitives, and a llama decoder layer for a decode step
 * (one new token per sequence) composed of them:
 *   h = rmsnorm(x) * w_attn;  q, k, v = h Wqkv;  rotate q, k;  store k, v in the paged cache;
 *   x += attention(q, cache) Wo;  h = rmsnorm(x) * w_ffn;  x += (silu(h Wg) * (h Wu)) Wd
 * with the four projections on quantized weights and attention read in place from the cache; or its
 * pieces, between PyTorch's own matmuls. Activations are `act` (fp32 or bf16, see common.h), rounded
 * where PyTorch's modules round, so the result matches the module path up to fp32 summation order.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#ifndef AIGC_ISA
#define AIGC_ISA "unknown"
#endif

/* which build this is: "reference", "avx2", "avx512bf16", "neon" */
const char *aigc_kernels_isa(void) { return AIGC_ISA; }

int quant_matmul(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
                 void *y, int M, int N, int K, int i8, int nthreads) {
    return k_qmatmul(x, act, qs, d, m, bias, y, M, N, K, i8, nthreads);
}

int paged_attention_decode(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out, int B,
                           int nh, int nkv, int hs, int Tk, float scale, int act, int nthreads) {
    return k_attention(q, kv, rows, lens, out, B, nh, nkv, hs, Tk, scale, act, nthreads);
}

/* out = rmsnorm(x) * w, (B, C) */
int llama_rmsnorm(const void *x, const void *w, float eps, void *out, int B, int C, int act) {
    k_rmsnorm(x, w, eps, out, B, C, act);
    return 0;
}

/* x = x + y; then, when w is given, out = rmsnorm(x) * w (the next sublayer's input) */
int llama_add_rmsnorm(void *x, const void *y, const void *w, float eps, void *out, int B, int C, int act) {
    k_add(x, y, (size_t)B * C, act);
    if (w) k_rmsnorm(x, w, eps, out, B, C, act);
    return 0;
}

/* g (B, F) = silu(gate) * up of gu (B, 2F) = [gate | up] */
int llama_swiglu(const void *gu, void *g, int B, int F, int act) {
    k_swiglu(gu, g, B, F, act);
    return 0;
}

/* qkv (B, (nh + 2 nkv) hs) -> att (B, nh hs): rotate q and k heads (in place), store k, v at the rows
 * `write` of this layer's cache kv, attend from the paged rows. */
int llama_attention(void *qkv, int B, const float *cos, const float *sin, void *kv, const int64_t *write,
                    const int64_t *rows, const int32_t *lens, void *att, int Tk, int nh, int nkv, int hs, int act,
                    int nthreads) {
    const size_t es = act_size(act), qkv_n = (size_t)(nh + 2 * nkv) * hs, q_n = (size_t)nh * hs;
    const size_t row = (size_t)2 * nkv * hs;
    char *q = malloc(es * (size_t)B * q_n);
    if (!q) return -1;
    for (int b = 0; b < B; b++) {
        char *r = (char *)qkv + es * (size_t)b * qkv_n; /* [q heads | k heads | v heads] */
        k_rope(r, nh + nkv, hs, cos + (size_t)b * hs, sin + (size_t)b * hs, act);
        memcpy(q + es * (size_t)b * q_n, r, es * q_n);
        memcpy((char *)kv + es * (size_t)write[b] * row, r + es * q_n, es * row);
    }
    const int rc = k_attention(q, kv, rows, lens, att, B, nh, nkv, hs, Tk, 1.0f / sqrtf((float)hs), act, nthreads);
    free(q);
    return rc;
}

/* The whole layer with its four projections on quantized weights.
 * w: the 12 pointers (qs, d, m; m NULL for Q8_0) of Wqkv, Wo, Wgate|up, Wdown; kv: this layer's store (rows, 2*nkv, hs);
 * write: (B,) rows for this step's k, v; rows: (B, Tk) key rows; lens: (B,) keys per sequence;
 * cos, sin: (B, hs) fp32 for each sequence's position; i8: the matmuls' mode (k_qmatmul). x (B, C) is updated
 * in place. 0, or -1. */
int llama_decode_layer(void *x, int B, int C, const void *attn_norm, const void *ffn_norm, float eps,
                       const void *const *w, const float *cos, const float *sin, void *kv, const int64_t *write,
                       const int64_t *rows, const int32_t *lens, int Tk, int nh, int nkv, int hs, int F, int act,
                       int i8, int nthreads) {
    if (B <= 0 || C % 32 || F % 32 || (nh * hs) % 32 || hs % 16 || nh % nkv) return -1;
    const size_t es = act_size(act), qkv_n = (size_t)(nh + 2 * nkv) * hs, q_n = (size_t)nh * hs;
    void *h = malloc(es * (size_t)B * (C > F ? C : F));
    void *qkv = malloc(es * (size_t)B * qkv_n);
    void *att = malloc(es * (size_t)B * q_n);
    void *gu = malloc(es * (size_t)B * 2 * F);
    void *o = malloc(es * (size_t)B * C);
    int rc = -1;
    if (!h || !qkv || !att || !gu || !o) goto done;
#define W(i) ((const uint8_t *)w[3 * (i)]), ((const uint16_t *)w[3 * (i) + 1]), ((const uint16_t *)w[3 * (i) + 2])
    k_rmsnorm(x, attn_norm, eps, h, B, C, act);
    if (k_qmatmul(h, act, W(0), NULL, qkv, B, (int)qkv_n, C, i8, nthreads)) goto done;
    if (llama_attention(qkv, B, cos, sin, kv, write, rows, lens, att, Tk, nh, nkv, hs, act, nthreads)) goto done;
    if (k_qmatmul(att, act, W(1), NULL, o, B, C, (int)q_n, i8, nthreads)) goto done;
    k_add(x, o, (size_t)B * C, act);
    k_rmsnorm(x, ffn_norm, eps, h, B, C, act);
    if (k_qmatmul(h, act, W(2), NULL, gu, B, 2 * F, C, i8, nthreads)) goto done;
    k_swiglu(gu, h, B, F, act);
    if (k_qmatmul(h, act, W(3), NULL, o, B, C, F, i8, nthreads)) goto done;
    k_add(x, o, (size_t)B * C, act);
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
