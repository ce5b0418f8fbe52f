/* Decode attention straight from a paged KV cache (SIMD builds): one new query token per sequence
 * attends to all of that sequence's keys, read in place through its row table (no gather copy).
 *
 * kv (one layer): (rows, 2*nkv, hs), K heads then V heads of a token side by side.
 * q, out: (B, nh, hs). rows: (B, Tk) flat row of key position t of sequence b; lens[b] <= Tk keys, of which a
 * window > 0 keeps the last `window` (the rows before it are not read: a windowed call costs what its window does).
 * Scores are scale q.k, soft-capped (softcap tanh(s / softcap), common.h: attention_score) where softcap > 0.
 * Scores are fp32 dot products of exact products (bf16 keys: AVX512-BF16 dot products where the build
 * has them); softmax and the weighted sum of values are fp32. Threads split (sequence, kv head) pairs;
 * the query heads sharing a kv head run back to back.
 */
#include <math.h>
#include <stdlib.h>

#include "simd.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define MAX_HS 256

/* s[t] = exp(s[t] - max) for t < n, returns the sum */
static float softmax_numerators(float *s, int n, float mx) {
    vf sumv = vset1(0.0f);
    int t = 0;
    for (; t + VL <= n; t += VL) {
        const vf e = vexp_neg(vload(s + t) - mx);
        vstore(s + t, e);
        sumv += e;
    }
    float sum = vsum(sumv);
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

/* One query head over the n keys at rows rb[0..n) (its window of its sequence's keys): out = softmax(scores) V,
 * scores scale q.K soft-capped. Inlined with a constant nv (hs / VL) so that q and the output stay in registers; s
 * is scratch for n scores. */
INLINE void attend_head(const char *q, const char *kv, const int64_t *rb, int n, size_t row_bytes, size_t k_off,
                        size_t v_off, float scale, float softcap, int act, float *s, char *dst, const int nv) {
    float mx = -INFINITY;
#if defined(__AVX512BF16__)
    if (act == ACT_BF16 && nv % 2 == 0) { /* bf16 pairs: dot products straight on the stored keys */
        __m512bh qb[MAX_HS / 32];
        for (int c = 0; c < nv / 2; c++) qb[c] = (__m512bh)_mm512_loadu_si512((const uint16_t *)q + c * 32);
        for (int t = 0; t < n; t++) {
            const uint16_t *k = (const uint16_t *)(kv + (size_t)rb[t] * row_bytes + k_off);
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[0], (__m512bh)_mm512_loadu_si512(k));
            for (int c = 1; c < nv / 2; c++)
                acc = _mm512_dpbf16_ps(acc, qb[c], (__m512bh)_mm512_loadu_si512(k + c * 32));
            s[t] = attention_score(_mm512_reduce_add_ps(acc) * scale, softcap);
            mx = s[t] > mx ? s[t] : mx;
        }
    } else
#endif
    {
        vf qv[MAX_HS / VL];
        for (int i = 0; i < nv; i++) qv[i] = vload_act(q, (size_t)i * VL, act) * scale;
        for (int t = 0; t < n; t++) {
            const char *k = kv + (size_t)rb[t] * row_bytes + k_off;
            vf acc = qv[0] * vload_act(k, 0, act);
            for (int i = 1; i < nv; i++) acc += qv[i] * vload_act(k, (size_t)i * VL, act);
            s[t] = attention_score(vsum(acc), softcap);
            mx = s[t] > mx ? s[t] : mx;
        }
    }
    const float inv = 1.0f / softmax_numerators(s, n, mx);
    vf o[MAX_HS / VL];
    for (int i = 0; i < nv; i++) o[i] = vset1(0.0f);
    for (int t = 0; t < n; t++) {
        const char *v = kv + (size_t)rb[t] * row_bytes + v_off;
        const float p = s[t];
        for (int i = 0; i < nv; i++) o[i] += p * vload_act(v, (size_t)i * VL, act);
    }
    for (int i = 0; i < nv; i++) vstore_act(dst, (size_t)i * VL, o[i] * inv, act);
}

int k_attention(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out, int B, int nh,
                int nkv, int hs, int Tk, float scale, float softcap, int window, int act, int nthreads) {
    if (hs % VL || hs % 16 || hs > MAX_HS || nh % nkv || B <= 0 || Tk <= 0 || !attention_params_ok(softcap, window))
        return AIGC_ERR_ARGS;
    const int n_max = window > 0 && window < Tk ? window : Tk; /* the most keys a query sees */
    const int g = nh / nkv, nv = hs / VL;
    const size_t es = act_size(act), row_bytes = (size_t)2 * nkv * hs * es;
    int bad = 0; /* 1: a sequence's lens out of range, 2: no memory */
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *s = malloc(((size_t)n_max + VL) * sizeof(float));
        if (!s) bad |= 2;
        /* units are (sequence, kv head): its g query heads run back to back on rows still in cache */
#pragma omp for schedule(static)
        for (int u = 0; u < B * nkv; u++) {
            const int b = u / nkv, h = u % nkv, n = lens[b];
            if (!s || n <= 0 || n > Tk) {
                bad |= s ? 1 : 2;
                continue;
            }
            const int t0 = attention_window(n, window); /* keys t0..n-1 */
            const int64_t *rb = rows + (size_t)b * Tk + t0;
            const size_t k_off = (size_t)h * hs * es, v_off = (size_t)(nkv + h) * hs * es;
            for (int j = 0; j < g; j++) {
                const size_t at = ((size_t)b * nh + (size_t)h * g + j) * hs * es;
                const char *qj = (const char *)q + at;
                char *dst = (char *)out + at;
#define ATTEND(nv_) attend_head(qj, kv, rb, n - t0, row_bytes, k_off, v_off, scale, softcap, act, s, dst, nv_)
                switch (nv * VL) {
                case 64: ATTEND(64 / VL); break;
                case 128: ATTEND(128 / VL); break;
                default: ATTEND(nv); break;
                }
#undef ATTEND
            }
        }
        free(s);
    }
    return bad & 1 ? AIGC_ERR_ARGS : bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
