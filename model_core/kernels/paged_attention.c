/* Decode attention straight from a paged KV cache: one new query token per sequence attends to
 * all of that sequence's keys, read in place through its row table (no gather copy).
 *
 * kv (one layer): (rows, 2*nkv, hs), K heads then V heads of a token side by side.
 * q, out: (B, nh, hs). rows: (B, Tk) flat row of key position t of sequence b; lens[b] <= Tk keys.
 * Scores of bf16 inputs are AVX512-BF16 dot products (exact products, fp32 sums); softmax and the
 * weighted sum of values are fp32. Activations are float32 or bfloat16 (rounded to nearest even).
 * Threads split (sequence, kv head) pairs; the query heads sharing a kv head run back to back.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define MAX_HS 256

/* 16 activations (float32 or bfloat16) at p -> fp32 */
static inline __m512 load16(const void *p, int bf16) {
    return bf16 ? load_bf16x16((const uint16_t *)p) : _mm512_loadu_ps(p);
}

/* s[t] = exp(s[t] - max) for t < n, returns the sum */
static float softmax_numerators(float *s, int n, float mx) {
    const __m512 mxv = _mm512_set1_ps(mx);
    __m512 sumv = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
        const __mmask16 m = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1u);
        const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), mxv));
        _mm512_mask_storeu_ps(s + t, m, e);
        sumv = _mm512_add_ps(sumv, _mm512_maskz_mov_ps(m, e));
    }
    return _mm512_reduce_add_ps(sumv);
}

/* One query head over the n keys of its sequence: out = softmax(scale q.K) V. Inlined with a constant nv
 * (hs / 16) so that q and the output stay in registers; s is scratch for n scores. */
static inline __attribute__((always_inline)) void attend_head(const char *q, const char *kv, const int64_t *rb,
                                                              int n, size_t row_bytes, size_t k_off, size_t v_off,
                                                              float scale, int bf16, float *s, char *dst,
                                                              const int nv) {
    const int es = bf16 ? 2 : 4;
    float mx = -INFINITY;
    if (bf16 && nv % 2 == 0) { /* bf16 pairs: dot products straight on the stored keys, exact products */
        __m512bh qb[MAX_HS / 32];
        for (int c = 0; c < nv / 2; c++) qb[c] = (__m512bh)_mm512_loadu_si512((const uint16_t *)q + c * 32);
        for (int t = 0; t < n; t++) {
            const uint16_t *k = (const uint16_t *)(kv + (size_t)rb[t] * row_bytes + k_off);
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[0], (__m512bh)_mm512_loadu_si512(k));
            for (int c = 1; c < nv / 2; c++)
                acc = _mm512_dpbf16_ps(acc, qb[c], (__m512bh)_mm512_loadu_si512(k + c * 32));
            s[t] = _mm512_reduce_add_ps(acc) * scale;
            mx = s[t] > mx ? s[t] : mx;
        }
    } else {
        __m512 qv[MAX_HS / 16];
        for (int i = 0; i < nv; i++) qv[i] = _mm512_mul_ps(load16(q + (size_t)i * 16 * es, bf16), _mm512_set1_ps(scale));
        for (int t = 0; t < n; t++) {
            const char *k = kv + (size_t)rb[t] * row_bytes + k_off;
            __m512 acc = _mm512_mul_ps(qv[0], load16(k, bf16));
            for (int i = 1; i < nv; i++) acc = _mm512_fmadd_ps(qv[i], load16(k + (size_t)i * 16 * es, bf16), acc);
            s[t] = _mm512_reduce_add_ps(acc);
            mx = s[t] > mx ? s[t] : mx;
        }
    }
    const float inv = 1.0f / softmax_numerators(s, n, mx);
    __m512 o[MAX_HS / 16];
    for (int i = 0; i < nv; i++) o[i] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        const char *v = kv + (size_t)rb[t] * row_bytes + v_off;
        const __m512 p = _mm512_set1_ps(s[t]);
        for (int i = 0; i < nv; i++) o[i] = _mm512_fmadd_ps(p, load16(v + (size_t)i * 16 * es, bf16), o[i]);
    }
    for (int i = 0; i < nv; i++) {
        const __m512 r = _mm512_mul_ps(o[i], _mm512_set1_ps(inv));
        if (bf16)
            store_bf16x16((uint16_t *)dst + i * 16, r);
        else
            _mm512_storeu_ps((float *)dst + i * 16, r);
    }
}

int paged_attention_decode(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out,
                           int B, int nh, int nkv, int hs, int Tk, float scale, int bf16, int nthreads) {
    if (hs % 16 || hs > MAX_HS || nh % nkv || B <= 0 || Tk <= 0) return -1;
    const int g = nh / nkv, nv = hs / 16, es = bf16 ? 2 : 4;
    const size_t row_bytes = (size_t)2 * nkv * hs * es;
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *s = aligned_alloc(64, ((size_t)Tk * sizeof(float) + 63) / 64 * 64);
        if (!s) bad = 1;
        /* units are (sequence, kv head): its g query heads run back to back on rows still in cache */
#pragma omp for schedule(static)
        for (int u = 0; u < B * nkv; u++) {
            const int b = u / nkv, h = u % nkv, n = lens[b];
            if (!s || n <= 0 || n > Tk) {
                bad = 1;
                continue;
            }
            const int64_t *rb = rows + (size_t)b * Tk;
            const size_t k_off = (size_t)h * hs * es, v_off = (size_t)(nkv + h) * hs * es;
            for (int j = 0; j < g; j++) {
                const size_t at = ((size_t)b * nh + (size_t)h * g + j) * hs * es;
                const char *qj = (const char *)q + at;
                char *dst = (char *)out + at;
                switch (nv) {
                case 4: attend_head(qj, kv, rb, n, row_bytes, k_off, v_off, scale, bf16, s, dst, 4); break;
                case 8: attend_head(qj, kv, rb, n, row_bytes, k_off, v_off, scale, bf16, s, dst, 8); break;
                default: attend_head(qj, kv, rb, n, row_bytes, k_off, v_off, scale, bf16, s, dst, nv); break;
                }
            }
        }
        free(s);
    }
    return bad ? -1 : 0;
}
