/* y = x W^T for GGML block-quantized weights (Q4_0, Q4_1, Q8_0) kept as stored, for small batches of
 * rows (decode steps), in the SIMD builds; fp32 or bf16 activations.
 *
 * Each thread takes weight rows in turn: it dequantizes the row into an fp32 buffer in L1 (w = d q + m,
 * exactly the float32 weights GGUF readers produce) and takes its dot products with every activation
 * row (fp32 FMAs; bf16 activations are widened once per call). The weights stream from memory once per
 * call, at about their stored size. This is the exact mode (k_qmatmul in common.h); the int8 mode goes to
 * qmatmul_i8.c where the build has integer dot products (AIGC_ERR_UNSUPPORTED elsewhere), and the AVX512-BF16
 * build sends bf16 activations to its own kernel (qmatmul_avx512bf16.c).
 */
#include <stdlib.h>

#include "simd.h"

#define PREFETCH_ROWS 4
#define BLOCK 32

/* one weight row of nb blocks -> wf (nb * 32 floats) */
static void dequantize_row(const uint8_t *qs, const uint16_t *d, const uint16_t *m, int nb, float *wf) {
    if (m)
        for (int b = 0; b < nb; b++) dequant_q4(qs + (size_t)b * 16, half_f32(d[b]), half_f32(m[b]), wf + b * 32);
    else
        for (int b = 0; b < nb; b++) dequant_q8(qs + (size_t)b * 32, half_f32(d[b]), wf + b * 32);
}

/* MT activation rows (row stride K) . w -> sums[0..MT). Every row sums its products in the same order
 * whatever MT is (two accumulators, even and odd vectors, then the lanes), so a row's result does not
 * depend on the batch it came in. */
INLINE void dot_rows(const float *w, const float *x, int K, float *sums, const int MT) {
    vf acc[MT][2];
    for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = vset1(0.0f);
    for (int k = 0; k < K; k += 2 * VL) { /* K is a multiple of 32 >= 2 VL */
        const vf w0 = vload(w + k), w1 = vload(w + k + VL);
        for (int i = 0; i < MT; i++) {
            acc[i][0] += w0 * vload(x + (size_t)i * K + k);
            acc[i][1] += w1 * vload(x + (size_t)i * K + k + VL);
        }
    }
    for (int i = 0; i < MT; i++) sums[i] = vsum(acc[i][0] + acc[i][1]);
}

int k_qmatmul(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
              void *y, int M, int N, int K, int i8, int nthreads) {
    if (K % BLOCK || M <= 0 || N <= 0) return AIGC_ERR_ARGS;
#if defined(__AVX512BF16__)
    if (act == ACT_BF16 && !i8) return qmatmul_avx512bf16(x, qs, d, m, bias, y, M, N, K, nthreads);
#endif
#if defined(QMATMUL_I8)
    if (i8) return qmatmul_i8(x, act, qs, d, m, bias, y, M, N, K, nthreads);
#endif
    if (i8) return AIGC_ERR_UNSUPPORTED; /* no integer dot products in this build */
    const int nb = K / BLOCK;
    const size_t row_bytes = (size_t)nb * (m ? 16 : 32);
    const float *xf = x;
    float *widened = NULL;
    if (act == ACT_BF16) { /* (M, K) fp32 copy of the activations */
        widened = malloc((size_t)M * K * sizeof(float));
        if (!widened) return AIGC_ERR_NOMEM;
        for (size_t i = 0; i < (size_t)M * K; i++) widened[i] = bf16_to_float(((const uint16_t *)x)[i]);
        xf = widened;
    }
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        float *wf = malloc((size_t)K * sizeof(float));
        if (!wf) bad = 1;
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            if (!wf) continue;
            if (n + PREFETCH_ROWS < N) { /* a later row's stream, ahead of the hardware prefetcher */
                const uint8_t *ahead = qs + (size_t)(n + PREFETCH_ROWS) * row_bytes;
                for (size_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(ahead + c);
            }
            dequantize_row(qs + (size_t)n * row_bytes, d + (size_t)n * nb, m ? m + (size_t)n * nb : NULL, nb, wf);
            const float bn = bias ? bias[n] : 0.0f;
            float sums[4];
            for (int r0 = 0; r0 < M;) {
                const int left = M - r0, mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
                const float *xr = xf + (size_t)r0 * K;
                switch (mt) {
                case 4: dot_rows(wf, xr, K, sums, 4); break;
                case 2: dot_rows(wf, xr, K, sums, 2); break;
                default: dot_rows(wf, xr, K, sums, 1); break;
                }
                for (int i = 0; i < mt; i++) store_act(y, (size_t)(r0 + i) * N + n, sums[i] + bn, act);
                r0 += mt;
            }
        }
        free(wf);
    }
    free(widened);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
