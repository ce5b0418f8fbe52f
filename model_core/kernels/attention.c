/* Decode attention straight from a paged KV cache (SIMD builds): one new query token per sequence
 * attends to all of that sequence's keys, read in place through its row table (no gather copy).
 *
 * kv (one layer): (rows, 2*nkv, hs), K heads then V heads of a token side by side.
 * q, out: (B, nh, hs). rows: (B, Tk) flat row of key position t of sequence b; lens[b] <= Tk keys, of which a
 * window > 0 keeps the last `window` (the rows before it are not read: a windowed call costs what its window does).
 * Scores are scale q.k, soft-capped (softcap tanh(s / softcap), common.h: attention_score) where softcap > 0.
 * Scores are fp32 dot products of exact products (bf16 keys: AVX512-BF16 dot products where the build
 * has them); softmax and the weighted sum of values are fp32. Threads split (sequence, kv head) pairs;
 * the query heads sharing a kv head run back to back (bf16 with AVX512-BF16: together, each key and value read
 * once for all of them, the keys' dot products summed 16 keys at a time by one tree that is the same for every key,
 * so that a key's score never depends on how many keys there are or where it falls among them).
 */
#include <math.h>
#include <stdlib.h>

#include "simd.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define MAX_HS 256
#ifndef PREFETCH_KEYS
#define PREFETCH_KEYS 8 /* keys ahead */
#endif

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
    vf qv[MAX_HS / VL];
    for (int i = 0; i < nv; i++) qv[i] = vload_act(q, (size_t)i * VL, act) * scale;
    for (int t = 0; t < n; t++) {
        const char *k = kv + (size_t)rb[t] * row_bytes + k_off;
        vf acc = qv[0] * vload_act(k, 0, act);
        for (int i = 1; i < nv; i++) acc += qv[i] * vload_act(k, (size_t)i * VL, act);
        s[t] = attention_score(vsum(acc), softcap);
        mx = s[t] > mx ? s[t] : mx;
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

#if defined(__AVX512BF16__)
/* r[i] = the sum of the 16 lanes of v[i] (v: 16 vectors of 16 floats, 64-byte aligned), for i < 16, each by the same
 * tree: within each 128-bit lane (l0 + l2) + (l1 + l3), then across the lanes (L0 + L1) + (L2 + L3) */
static inline __m512 sum16(const float *v) {
    __m512 a[8], c[4];
    for (int i = 0; i < 8; i++) { /* lanes [v2i 0+2, v2i+1 0+2, v2i 1+3, v2i+1 1+3] */
        const __m512 x = _mm512_load_ps(v + 32 * i), y = _mm512_load_ps(v + 32 * i + 16);
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    for (int i = 0; i < 4; i++) { /* c[i] lane L, element j: v[4i + j]'s elements of lane L, summed */
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
    const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

/* The g query heads at q (hs bf16 each, one after the other) of one kv head over the n keys at rows rb[0..n): dst
 * (the heads' outputs, likewise) = softmax(scores) V. Each key's and value's row is read once for the g heads. s:
 * scratch for g (n + 16) scores; part: 64-byte aligned scratch for g x 16 x 16 floats (the dot products of 16 keys). */
static void attend_group_bf16(const uint16_t *q, const char *kv, const int64_t *rb, int n, size_t row_bytes,
                              size_t k_off, size_t v_off, float scale, float softcap, int g, int hs, float *s,
                              float *part, uint16_t *dst) {
    const int nc = hs / 32, stride = n + 16; /* 32-value chunks of a head; scores of head j at s + j stride */
    float mx[g];
    for (int j = 0; j < g; j++) mx[j] = -INFINITY;
    for (int t0 = 0; t0 < n; t0 += 16) {
        const int cnt = n - t0 < 16 ? n - t0 : 16;
        for (int tt = 0; tt < 16; tt++) {
            if (tt >= cnt) { /* zeros past the last key: the tree sums the same way for every key */
                for (int j = 0; j < g; j++) _mm512_store_ps(part + (j * 16 + tt) * 16, _mm512_setzero_ps());
                continue;
            }
            const uint16_t *k = (const uint16_t *)(kv + (size_t)rb[t0 + tt] * row_bytes + k_off);
            if (t0 + tt + PREFETCH_KEYS < n) { /* a later key's row, and its value for the pass over the values */
                const char *ahead = kv + (size_t)rb[t0 + tt + PREFETCH_KEYS] * row_bytes;
                for (int c = 0; c < hs * 2; c += 64) {
                    _mm_prefetch(ahead + k_off + c, _MM_HINT_T0);
                    _mm_prefetch(ahead + v_off + c, _MM_HINT_T0);
                }
            }
            for (int j = 0; j < g; j++) {
                const uint16_t *qj = q + (size_t)j * hs;
                __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(qj),
                                              (__m512bh)_mm512_loadu_si512(k));
                for (int c = 1; c < nc; c++)
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qj + c * 32),
                                           (__m512bh)_mm512_loadu_si512(k + c * 32));
                _mm512_store_ps(part + (j * 16 + tt) * 16, acc);
            }
        }
        for (int j = 0; j < g; j++) {
            float *sj = s + (size_t)j * stride + t0;
            _mm512_storeu_ps(sj, _mm512_mul_ps(sum16(part + j * 256), _mm512_set1_ps(scale)));
            for (int tt = 0; tt < cnt; tt++) {
                sj[tt] = attention_score(sj[tt], softcap);
                mx[j] = sj[tt] > mx[j] ? sj[tt] : mx[j];
            }
        }
    }
    float inv[g];
    for (int j = 0; j < g; j++) inv[j] = 1.0f / softmax_numerators(s + (size_t)j * stride, n, mx[j]);
    const int nv = hs / 16, hg = nv >= 16 ? 1 : 16 / nv; /* heads per pass over the values: their sums in registers */
    for (int j0 = 0; j0 < g; j0 += hg) {
        const int gj = g - j0 < hg ? g - j0 : hg;
        __m512 o[16];
        for (int i = 0; i < gj * nv; i++) o[i] = _mm512_setzero_ps();
        for (int t = 0; t < n; t++) {
            const uint16_t *v = (const uint16_t *)(kv + (size_t)rb[t] * row_bytes + v_off);
            for (int i = 0; i < nv; i++) {
                const __m512 vi = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + 16 * i))), 16));
                for (int j = 0; j < gj; j++)
                    o[j * nv + i] = _mm512_fmadd_ps(_mm512_set1_ps(s[(size_t)(j0 + j) * stride + t]), vi, o[j * nv + i]);
            }
        }
        for (int j = 0; j < gj; j++)
            for (int i = 0; i < nv; i++)
                vstore_bf16(dst + (size_t)(j0 + j) * hs + 16 * i, o[j * nv + i] * inv[j0 + j]);
    }
}
#endif

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
        float *s = malloc(((size_t)n_max + 16) * sizeof(float) * (size_t)g);
        float *part = aligned_alloc(64, sizeof(float) * 256 * (size_t)g);
        if (!s || !part) bad |= 2;
        /* units are (sequence, kv head): its g query heads run back to back on rows still in cache; dealt round robin,
         * since a prompt chunk's rows see 1, 2, 3, ... keys (contiguous halves would give one thread three times the
         * other's keys) */
#pragma omp for schedule(static, 1)
        for (int u = 0; u < B * nkv; u++) {
            const int b = u / nkv, h = u % nkv, n = lens[b];
            if (!s || !part || n <= 0 || n > Tk) {
                bad |= s && part ? 1 : 2;
                continue;
            }
            const int t0 = attention_window(n, window); /* keys t0..n-1 */
            const int64_t *rb = rows + (size_t)b * Tk + t0;
            const size_t k_off = (size_t)h * hs * es, v_off = (size_t)(nkv + h) * hs * es;
#if defined(__AVX512BF16__)
            if (act == ACT_BF16 && hs % 32 == 0) {
                const size_t at = ((size_t)b * nh + (size_t)h * g) * hs;
                attend_group_bf16((const uint16_t *)q + at, kv, rb, n - t0, row_bytes, k_off, v_off, scale, softcap,
                                  g, hs, s, part, (uint16_t *)out + at);
                continue;
            }
#endif
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
        free(part);
    }
    return bad & 1 ? AIGC_ERR_ARGS : bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
