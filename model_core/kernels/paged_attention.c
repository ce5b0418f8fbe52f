/* Decode attention straight from a paged KV cache: one new query token per sequence attends to
 * all of that sequence's keys, read in place through its row table (no gather copy).
 *
 * kv (one layer): (rows, 2*nkv, hs), K heads then V heads of a token side by side.
 * q, out: (B, nh, hs). rows: (B, Tk) flat row of key position t of sequence b; lens[b] <= Tk keys.
 * Query head j reads kv head j / (nh / nkv) (grouped-query attention). Softmax and sums in fp32;
 * activations are float32 or bfloat16 (round to nearest even). Threads split (sequence, head) pairs.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define MAX_HS 256

/* 16 activations (float32 or bfloat16) at p -> fp32 */
static inline __m512 load16(const void *p, int bf16) {
    return bf16 ? load_bf16x16((const uint16_t *)p) : _mm512_loadu_ps(p);
}

int paged_attention_decode(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out,
                           int B, int nh, int nkv, int hs, int Tk, float scale, int bf16, int nthreads) {
    if (hs % 16 || hs > MAX_HS || nh % nkv || B <= 0 || Tk <= 0) return -1;
    const int g = nh / nkv, nv = hs / 16, es = bf16 ? 2 : 4;
    const size_t row_elems = (size_t)2 * nkv * hs;
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *s = aligned_alloc(64, ((size_t)Tk * sizeof(float) + 64 + 63) / 64 * 64);
        if (!s) bad = 1;
#pragma omp for schedule(static)
        for (int u = 0; u < B * nh; u++) {
            if (!s) continue;
            const int b = u / nh, j = u % nh, h = j / g, n = lens[b];
            if (n <= 0 || n > Tk) {
                bad = 1;
                continue;
            }
            const int64_t *rb = rows + (size_t)b * Tk;
            __m512 qv[MAX_HS / 16];
            for (int i = 0; i < nv; i++)
                qv[i] = _mm512_mul_ps(load16((const char *)q + ((size_t)u * hs + i * 16) * es, bf16),
                                      _mm512_set1_ps(scale));
            float mx = -INFINITY;
            for (int t = 0; t < n; t++) {
                const char *k = (const char *)kv + ((size_t)rb[t] * row_elems + (size_t)h * hs) * es;
                __m512 acc = _mm512_mul_ps(qv[0], load16(k, bf16));
                for (int i = 1; i < nv; i++) acc = _mm512_fmadd_ps(qv[i], load16(k + i * 16 * es, bf16), acc);
                s[t] = _mm512_reduce_add_ps(acc);
                mx = s[t] > mx ? s[t] : mx;
            }
            const __m512 mxv = _mm512_set1_ps(mx);
            __m512 sumv = _mm512_setzero_ps();
            int t = 0;
            for (; t + 16 <= n; t += 16) {
                const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + t), mxv));
                _mm512_storeu_ps(s + t, e);
                sumv = _mm512_add_ps(sumv, e);
            }
            if (t < n) {
                const __mmask16 m = (__mmask16)((1u << (n - t)) - 1u);
                const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), mxv));
                _mm512_mask_storeu_ps(s + t, m, e);
                sumv = _mm512_add_ps(sumv, _mm512_maskz_mov_ps(m, e));
            }
            const float inv = 1.0f / _mm512_reduce_add_ps(sumv);
            __m512 o[MAX_HS / 16];
            for (int i = 0; i < nv; i++) o[i] = _mm512_setzero_ps();
            for (t = 0; t < n; t++) {
                const char *v = (const char *)kv + ((size_t)rb[t] * row_elems + (size_t)(nkv + h) * hs) * es;
                const __m512 p = _mm512_set1_ps(s[t]);
                for (int i = 0; i < nv; i++) o[i] = _mm512_fmadd_ps(p, load16(v + i * 16 * es, bf16), o[i]);
            }
            char *dst = (char *)out + (size_t)u * hs * es;
            for (int i = 0; i < nv; i++) {
                const __m512 r = _mm512_mul_ps(o[i], _mm512_set1_ps(inv));
                if (bf16) {
                    store_bf16x16((uint16_t *)dst + i * 16, r);
                } else {
                    _mm512_storeu_ps((float *)dst + i * 16, r);
                }
            }
        }
        free(s);
    }
    return bad ? -1 : 0;
}
