/* LoRA deltas added to a projection's output rows, per row its own adapter (model_core/lora.py): for row i with slot
 * g = choice[i] >= 0, t = A_g x_i (r_g values), then out_i += B_g t (the slots' A_g and B_g^T stacked by rows in
 * slot order), every product and sum in double (a product of two float32 values, or a bf16 activation and a
 * float32 weight, is exact in double) and each output rounded once to the activations' dtype (through float, as
 * PyTorch's double -> bf16 conversion). Rows with choice -1 are not
 * read or written. A row's sums run in one order whatever the rows beside it, the threads or the batch: a row's
 * result is the same in any batch. Plain C: every build compiles it alike (the compiler vectorizes the sums).
 */
#include <stdlib.h>

#include "common.h"

#define OUT_CHUNK 64 /* outputs of a row per unit of work */

/* t[j] = sum_k A[j, k] x[k] for j < r (xd: the row in double): 8 partial sums, k's lane k % 8, joined by one tree
 * (a fixed order the compiler keeps in vectors) */
static void down_project(const float *A, const double *xd, int r, int n_in, double *t) {
    for (int j = 0; j < r; j++) {
        const float *a = A + (size_t)j * n_in;
        double p[8] = {0};
        int k = 0;
        for (; k + 8 <= n_in; k += 8)
            for (int l = 0; l < 8; l++) p[l] += (double)a[k + l] * xd[k + l];
        for (; k < n_in; k++) p[k % 8] += (double)a[k] * xd[k];
        t[j] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    }
}

int lora_add(const void *x, void *out, int N, int n_in, int n_out, int act, const int32_t *choice, int G,
             const float *A, const float *Bt, const int32_t *ranks, int nthreads) {
    if (N < 0 || n_in <= 0 || n_out <= 0 || G < 1 || (act != ACT_F32 && act != ACT_BF16) || !choice || !ranks)
        return AIGC_ERR_ARGS;
    int rmax = 0, rsum = 0;
    for (int g = 0; g < G; g++) {
        if (ranks[g] < 0) return AIGC_ERR_ARGS;
        rmax = ranks[g] > rmax ? ranks[g] : rmax;
        rsum += ranks[g];
    }
    if (rsum && (!A || !Bt)) return AIGC_ERR_ARGS;
    for (int i = 0; i < N; i++)
        if (choice[i] < -1 || choice[i] >= G) return AIGC_ERR_ARGS;
    if (!N || !rmax) return AIGC_OK;
    /* (N, rmax) each row's A x, then the G slots' first rows in A and Bt */
    double *t = malloc(sizeof(double) * (size_t)N * rmax);
    int *first = malloc(sizeof(int) * (size_t)G);
    if (!t || !first) {
        free(t);
        free(first);
        return AIGC_ERR_NOMEM;
    }
    for (int g = 0, at = 0; g < G; at += ranks[g], g++) first[g] = at;
    const int chunks = (n_out + OUT_CHUNK - 1) / OUT_CHUNK;
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        double *xd = malloc(sizeof(double) * (size_t)n_in);
        if (!xd) bad = 1;
#pragma omp for schedule(static)
        for (int i = 0; i < N; i++) {
            const int g = choice[i];
            if (!xd || g < 0 || !ranks[g]) continue;
            for (int k = 0; k < n_in; k++) xd[k] = (double)load_act(x, (size_t)i * n_in + k, act);
            down_project(A + (size_t)first[g] * n_in, xd, ranks[g], n_in, t + (size_t)i * rmax);
        }
#pragma omp for schedule(static) collapse(2)
        for (int i = 0; i < N; i++)
            for (int c = 0; c < chunks; c++) {
                const int g = choice[i];
                if (g < 0 || !ranks[g]) continue;
                const int r = ranks[g], o0 = c * OUT_CHUNK, n = n_out - o0 < OUT_CHUNK ? n_out - o0 : OUT_CHUNK;
                const double *ti = t + (size_t)i * rmax;
                double s[OUT_CHUNK] = {0}; /* s[o] = sum_j B^T[j, o] t[j], j in order */
                for (int j = 0; j < r; j++) {
                    const float *bj = Bt + (size_t)(first[g] + j) * n_out + o0;
                    for (int o = 0; o < n; o++) s[o] += (double)bj[o] * ti[j];
                }
                for (int o = 0; o < n; o++) {
                    const size_t at = (size_t)i * n_out + o0 + o;
                    store_act(out, at, (float)((double)load_act(out, at, act) + s[o]), act);
                }
            }
        free(xd);
    }
    free(t);
    free(first);
    return bad ? AIGC_ERR_NOMEM : AIGC_OK;
}
