/* Decode attention straight from a paged KV cache (SIMD builds): one new query token per sequence
 * attends to all of that sequence's keys, read in place through its row table (no gather copy).
 *
 * kv (one layer): (rows, 2*nkv, hs), K heads then V heads of a token side by side.
 * q, out: (B, nh, hs). rows: (B, Tk) flat row of key position t of sequence b; lens[b] <= Tk keys, of which a
 * window > 0 keeps the last `window` (the rows before it are not read: a windowed call costs what its window does).
 * Scores are scale q.k, soft-capped (softcap tanh(s / softcap), common.h: attention_score) where softcap > 0.
 * Scores are fp32 dot products of exact products (bf16 keys: AVX512-BF16 dot products where the build
 * has them); softmax and the weighted sum of values are fp32.
 *
 * A sequence's keys go in chunks of KEY_CHUNK (from the first key its window keeps), each chunk with every head at
 * once: its cache rows are read whole and in order (a row holds every head's key and value: read head by head, one
 * row in 2 nkv per cache line run, they came in at memory latency, one page per key), the chunk's scores, their max
 * m and sum l of exp(s - m), and the unnormalized sum of exp(s - m) V per head. The chunks then combine in order:
 * M = max m_c, out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c. A key's score never depends on how many keys
 * there are or where it falls among them (bf16: one summation tree for every key), and the chunks are the same
 * whatever the batch, the threads or which thread ran them: a sequence's result is the same in any batch. Threads
 * take whole sequences where there are at least two per thread, else single chunks (then the combine is a second
 * pass over (sequence, head)).
 */
#include <math.h>
#include <stdlib.h>

#include "simd.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define MAX_HS 256
#ifndef KEY_CHUNK
#define KEY_CHUNK 64 /* keys scored together (a multiple of 16); it fixes the combine's order, so the results */
#endif
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 2 /* cache rows ahead */
#endif
/* floats per head of a chunk's partial result: the unnormalized output (hs), then m and l (64-byte aligned) */
#define PART(hs) ((size_t)(hs) + 16)

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

/* the largest of s[0..n) (a NaN score never taken, -inf for none): a max is exact, so any order gives it (but for
 * the sign of a zero, which no result depends on: exp(s - m) is 1 at s = m = 0 either way) */
static float chunk_max(const float *s, int n) {
    vf mv = vset1(-INFINITY);
    int t = 0;
    for (; t + VL <= n; t += VL) mv = vmax(vload(s + t), mv);
    float mx = -INFINITY;
    for (int i = 0; i < VL; i++) mx = mv[i] > mx ? mv[i] : mx;
    for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    return mx;
}

/* one cache row's lines (K and V of every head), ahead of their use */
static inline void prefetch_row(const char *row, size_t row_bytes) {
    for (size_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(row + c, 0, 3);
}

/* the chunk's scores of every head: s[hd * KEY_CHUNK + t] for its n keys at rows rb[0..n), q (nh, hs) in act */
INLINE void chunk_scores(const char *q, const char *kv, const int64_t *rb, int n, int64_t ahead, size_t row_bytes,
                         int nkv, int g, int hs, int act, float scale, float softcap, float *s, const int nv) {
    const size_t es = act_size(act);
    for (int t = 0; t < n; t++) {
        if (t + PREFETCH_ROWS < n) prefetch_row(kv + (size_t)rb[t + PREFETCH_ROWS] * row_bytes, row_bytes);
        else if (ahead >= 0 && t + PREFETCH_ROWS == n) prefetch_row(kv + (size_t)ahead * row_bytes, row_bytes);
        const char *row = kv + (size_t)rb[t] * row_bytes;
        for (int h = 0; h < nkv; h++) {
            const char *k = row + (size_t)h * hs * es;
            for (int j = 0; j < g; j++) {
                const int hd = h * g + j;
                const char *qj = q + (size_t)hd * hs * es;
                vf acc = vload_act(qj, 0, act) * scale * vload_act(k, 0, act);
                for (int i = 1; i < nv; i++) acc += vload_act(qj, (size_t)i * VL, act) * scale * vload_act(k, (size_t)i * VL, act);
                s[(size_t)hd * KEY_CHUNK + t] = attention_score(vsum(acc), softcap);
            }
        }
    }
}

/* P (nh, PART(hs)) <- each head's sum of p V over the chunk's n keys (p = s's numerators) */
INLINE void chunk_values(const char *kv, const int64_t *rb, int n, size_t row_bytes, int nkv, int g, int hs, int act,
                         const float *s, float *P, const int nv) {
    const size_t es = act_size(act);
    for (int hd = 0; hd < nkv * g; hd++) {
        const size_t v_off = (size_t)(nkv + hd / g) * hs * es;
        const float *p = s + (size_t)hd * KEY_CHUNK;
        vf o[MAX_HS / VL];
        for (int i = 0; i < nv; i++) o[i] = vset1(0.0f);
        for (int t = 0; t < n; t++) {
            const char *v = kv + (size_t)rb[t] * row_bytes + v_off;
            for (int i = 0; i < nv; i++) o[i] += p[t] * vload_act(v, (size_t)i * VL, act);
        }
        for (int i = 0; i < nv; i++) vstore(P + (size_t)hd * PART(hs) + (size_t)i * VL, o[i]);
    }
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

/* chunk_scores for bf16 (hs % 32 == 0): each key's dot products (AVX512-BF16, 16 lanes) 16 keys at a time into part
 * (nh, 16 keys, 16 lanes; 64-byte aligned), summed by sum16's one tree */
static void chunk_scores_bf16(const uint16_t *q, const char *kv, const int64_t *rb, int n, int64_t ahead,
                              size_t row_bytes, int nkv, int g, int hs, float scale, float softcap, float *s,
                              float *part) {
    const int nc = hs / 32, nh = nkv * g;
    for (int t0 = 0; t0 < n; t0 += 16) {
        const int cnt = n - t0 < 16 ? n - t0 : 16;
        for (int tt = 0; tt < 16; tt++) {
            const int t = t0 + tt;
            if (tt >= cnt) { /* zeros past the last key: the tree sums the same way for every key */
                for (int hd = 0; hd < nh; hd++) _mm512_store_ps(part + (hd * 16 + tt) * 16, _mm512_setzero_ps());
                continue;
            }
            if (t + PREFETCH_ROWS < n) prefetch_row(kv + (size_t)rb[t + PREFETCH_ROWS] * row_bytes, row_bytes);
            else if (ahead >= 0 && t + PREFETCH_ROWS == n) prefetch_row(kv + (size_t)ahead * row_bytes, row_bytes);
            const uint16_t *row = (const uint16_t *)(kv + (size_t)rb[t] * row_bytes);
            for (int h = 0; h < nkv; h++) {
                const uint16_t *k = row + (size_t)h * hs;
                for (int j = 0; j < g; j++) {
                    const int hd = h * g + j;
                    const uint16_t *qj = q + (size_t)hd * hs;
                    __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(qj),
                                                  (__m512bh)_mm512_loadu_si512(k));
                    for (int c = 1; c < nc; c++)
                        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qj + c * 32),
                                               (__m512bh)_mm512_loadu_si512(k + c * 32));
                    _mm512_store_ps(part + (hd * 16 + tt) * 16, acc);
                }
            }
        }
        for (int hd = 0; hd < nh; hd++) {
            float *sh = s + (size_t)hd * KEY_CHUNK + t0;
            _mm512_storeu_ps(sh, _mm512_mul_ps(sum16(part + hd * 256), _mm512_set1_ps(scale)));
            for (int tt = 0; tt < cnt; tt++) sh[tt] = attention_score(sh[tt], softcap);
        }
    }
}

/* gj query heads' (hd0, ...) sums of p V over the chunk's n keys, V at v_off of each row: nv and gj constants where
 * inlined, so that the gj * nv <= 16 sums stay in registers */
INLINE void head_values_bf16(const int nv, const int gj, const char *kv, const int64_t *rb, int n, size_t row_bytes,
                             size_t v_off, int hd0, int hs, const float *s, float *P) {
    __m512 o[16];
    for (int i = 0; i < gj * nv; i++) o[i] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        const uint16_t *v = (const uint16_t *)(kv + (size_t)rb[t] * row_bytes + v_off);
        for (int i = 0; i < nv; i++) {
            const __m512 vi = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + 16 * i))), 16));
            for (int j = 0; j < gj; j++)
                o[j * nv + i] = _mm512_fmadd_ps(_mm512_set1_ps(s[(size_t)(hd0 + j) * KEY_CHUNK + t]), vi, o[j * nv + i]);
        }
    }
    for (int j = 0; j < gj; j++)
        for (int i = 0; i < nv; i++) _mm512_storeu_ps(P + (size_t)(hd0 + j) * PART(hs) + 16 * i, o[j * nv + i]);
}

/* chunk_values for bf16 values: the query heads sharing a kv head together (their sums in registers), each value
 * row read once for them */
static void chunk_values_bf16(const char *kv, const int64_t *rb, int n, size_t row_bytes, int nkv, int g, int hs,
                              const float *s, float *P) {
    const int nv = hs / 16, hg = nv >= 16 ? 1 : 16 / nv; /* heads per pass over the values */
    for (int h = 0; h < nkv; h++) {
        const size_t v_off = (size_t)(nkv + h) * hs * 2;
        for (int j0 = 0; j0 < g; j0 += hg) {
            const int gj = g - j0 < hg ? g - j0 : hg, hd0 = h * g + j0;
#define HEADS(NV, GJ) head_values_bf16(NV, GJ, kv, rb, n, row_bytes, v_off, hd0, hs, s, P)
            switch (nv * 16 + gj) { /* head sizes 64, 128, 256 */
            case 4 * 16 + 1: HEADS(4, 1); break;
            case 4 * 16 + 2: HEADS(4, 2); break;
            case 4 * 16 + 3: HEADS(4, 3); break;
            case 4 * 16 + 4: HEADS(4, 4); break;
            case 8 * 16 + 1: HEADS(8, 1); break;
            case 8 * 16 + 2: HEADS(8, 2); break;
            case 16 * 16 + 1: HEADS(16, 1); break;
            default: HEADS(nv, gj);
            }
#undef HEADS
        }
    }
}
#endif

/* One chunk of a sequence's keys (n of them, at rows rb[0..n); `ahead`: the row the next chunk starts at, or -1), every
 * head: P (nh, PART(hs)) <- each head's unnormalized output, max score and sum of exp(s - max). s: scratch for
 * nh KEY_CHUNK scores; part: 64-byte aligned scratch for nh x 256 floats. */
static void attend_chunk(const void *q, const char *kv, const int64_t *rb, int n, int64_t ahead, size_t row_bytes,
                         int nkv, int g, int hs, int act, float scale, float softcap, float *s, float *part, float *P) {
    const int nh = nkv * g, nv = hs / VL;
#if defined(__AVX512BF16__)
    const int bf16 = act == ACT_BF16 && hs % 32 == 0;
    if (bf16) chunk_scores_bf16(q, kv, rb, n, ahead, row_bytes, nkv, g, hs, scale, softcap, s, part);
#else
    const int bf16 = 0;
    (void)part;
#endif
    if (!bf16) {
#define SCORES(nv_) chunk_scores(q, kv, rb, n, ahead, row_bytes, nkv, g, hs, act, scale, softcap, s, nv_)
        switch (nv * VL) {
        case 64: SCORES(64 / VL); break;
        case 128: SCORES(128 / VL); break;
        default: SCORES(nv); break;
        }
#undef SCORES
    }
    for (int hd = 0; hd < nh; hd++) {
        float *sh = s + (size_t)hd * KEY_CHUNK;
        const float mx = chunk_max(sh, n);
        P[(size_t)hd * PART(hs) + hs] = mx;
        P[(size_t)hd * PART(hs) + hs + 1] = softmax_numerators(sh, n, mx);
    }
#if defined(__AVX512BF16__)
    if (bf16) {
        chunk_values_bf16(kv, rb, n, row_bytes, nkv, g, hs, s, P);
        return;
    }
#endif
#define VALUES(nv_) chunk_values(kv, rb, n, row_bytes, nkv, g, hs, act, s, P, nv_)
    switch (nv * VL) {
    case 64: VALUES(64 / VL); break;
    case 128: VALUES(128 / VL); break;
    default: VALUES(nv); break;
    }
#undef VALUES
}

/* head hd's output from its nch chunks' partial results (P: chunk c's at P + c * stride): the chunks in order,
 * M = max m_c, out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c (one chunk: o / l exactly) */
static void combine_head(const float *P, int nch, size_t stride, int hd, int hs, void *dst, int act) {
    const float *Ph = P + (size_t)hd * PART(hs);
    float M = -INFINITY, L = 0.0f;
    for (int c = 0; c < nch; c++) M = Ph[c * stride + hs] > M ? Ph[c * stride + hs] : M;
    vf o[MAX_HS / VL];
    const int nv = hs / VL;
    for (int i = 0; i < nv; i++) o[i] = vset1(0.0f);
    for (int c = 0; c < nch; c++) {
        const float *pc = Ph + c * stride, w = expf(pc[hs] - M);
        L += pc[hs + 1] * w;
        for (int i = 0; i < nv; i++) o[i] += w * vload(pc + (size_t)i * VL);
    }
    const float inv = 1.0f / L;
    for (int i = 0; i < nv; i++) vstore_act(dst, (size_t)hd * hs + (size_t)i * VL, o[i] * inv, act);
}

int k_attention(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out, int B, int nh,
                int nkv, int hs, int Tk, float scale, float softcap, int window, int act, int nthreads) {
    if (hs % VL || hs % 16 || hs > MAX_HS || nh % nkv || B <= 0 || Tk <= 0 || !attention_params_ok(softcap, window))
        return AIGC_ERR_ARGS;
    for (int b = 0; b < B; b++)
        if (lens[b] <= 0 || lens[b] > Tk) return AIGC_ERR_ARGS;
    const int g = nh / nkv;
    const size_t es = act_size(act), row_bytes = (size_t)2 * nkv * hs * es, stride = (size_t)nh * PART(hs);
    /* few sequences: every chunk its own unit (partials in P, combined in a second pass); else whole sequences */
    const int split = B < 2 * nthreads;
    int *first = malloc(sizeof(int) * ((size_t)B + 1)); /* chunks of sequences before b */
    if (!first) return AIGC_ERR_NOMEM;
    first[0] = 0;
    int most = 0;
    for (int b = 0; b < B; b++) {
        const int nch = (lens[b] - attention_window(lens[b], window) + KEY_CHUNK - 1) / KEY_CHUNK;
        first[b + 1] = first[b] + nch;
        most = nch > most ? nch : most;
    }
    const int units = split ? first[B] : B;
    float *shared = split ? aligned_alloc(64, sizeof(float) * stride * (size_t)first[B]) : NULL;
    if (split && !shared) {
        free(first);
        return AIGC_ERR_NOMEM;
    }
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *s = malloc(sizeof(float) * (size_t)nh * KEY_CHUNK);
        float *part = aligned_alloc(64, sizeof(float) * 256 * (size_t)nh);
        float *own = split ? NULL : aligned_alloc(64, sizeof(float) * stride * (size_t)most);
        const int ready = s && part && (split || own);
        if (!ready) bad = 1;
        /* dealt round robin: a prompt chunk's rows see 1, 2, 3, ... keys (contiguous halves would give one thread
         * three times the other's keys) */
#pragma omp for schedule(static, 1)
        for (int u = 0; u < units; u++) {
            if (!ready) continue;
            int b = u, c0 = 0, c1;
            if (split) { /* the sequence whose chunk u is */
                b = 0;
                while (first[b + 1] <= u) b++;
                c0 = u - first[b], c1 = c0 + 1;
            } else {
                c1 = first[b + 1] - first[b];
            }
            const int n = lens[b], t0 = attention_window(n, window);
            const int64_t *rb = rows + (size_t)b * Tk;
            const char *qb = (const char *)q + (size_t)b * nh * hs * es;
            float *P = split ? shared + (size_t)first[b] * stride : own;
            for (int c = c0; c < c1; c++) {
                const int ts = t0 + c * KEY_CHUNK, cnt = n - ts < KEY_CHUNK ? n - ts : KEY_CHUNK;
                const int64_t ahead = c + 1 < c1 ? rb[ts + KEY_CHUNK] : -1;
                attend_chunk(qb, kv, rb + ts, cnt, ahead, row_bytes, nkv, g, hs, act, scale, softcap, s, part,
                             P + (size_t)c * stride);
            }
            if (!split)
                for (int hd = 0; hd < nh; hd++)
                    combine_head(P, c1, stride, hd, hs, (char *)out + (size_t)b * nh * hs * es, act);
        }
        if (split) {
#pragma omp for schedule(static)
            for (int u = 0; u < B * nh; u++) {
                const int b = u / nh;
                if (ready)
                    combine_head(shared + (size_t)first[b] * stride, first[b + 1] - first[b], stride, u % nh, hs,
                                 (char *)out + (size_t)b * nh * hs * es, act);
            }
        }
        free(s);
        free(part);
        free(own);
    }
    free(first);
    free(shared);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
