/* The library's entry points (every build): the primitives, and a llama decoder layer for a decode step
 * (one new token per sequence) composed of them:
 *   h = rmsnorm(x) * w_attn;  q, k, v = h Wqkv (+ bias: Qwen 2);  q, k heads rmsnorm'd (QK-norm: Qwen 3);
 *   rotate q, k;  store k, v in the paged cache;
 *   x += attention(q, cache) Wo;  h = rmsnorm(x) * w_ffn;  x += (silu(h Wg) * (h Wu)) Wd
 * with the four projections on quantized weights and attention read in place from the cache; or its
 * pieces, between PyTorch's own matmuls. Activations are `act` (fp32 or bf16, see common.h), rounded
 * where PyTorch's modules round, so the result matches the module path up to fp32 summation order.
 * The declarations, with their arguments and statuses, are in aigc_kernels.h.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define PARTS AIGC_PROJECTION_PARTS

#ifndef AIGC_ISA
#define AIGC_ISA "unknown"
#endif

/* which build this is: "reference", "avx2", "avx512bf16", "neon" */
const char *aigc_kernels_isa(void) { return AIGC_ISA; }

int quant_matmul(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias,
                 void *y, int M, int N, int K, int i8, int nthreads) {
    return k_qmatmul(x, act, qs, d, m, bias, y, M, N, K, i8, nthreads);
}

int quant_matmul_kind(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m,
                      const float *bias, void *y, int M, int N, int K, int i8, int nthreads) {
    return k_qmatmul_kind(x, act, kind, qs, d, m, bias, y, M, N, K, i8, nthreads);
}

int quant_dequantize(int kind, const uint8_t *qs, const void *d, const void *m, void *out, int N, int K, int act,
                     int nthreads) {
    return k_dequantize(kind, qs, d, m, out, N, K, act, nthreads);
}

int paged_attention_decode(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out, int B,
                           int nh, int nkv, int hs, int Tk, float scale, float softcap, int window, int act,
                           int nthreads) {
    return k_attention(q, kv, rows, lens, out, B, nh, nkv, hs, Tk, scale, softcap, window, act, nthreads);
}

int llama_rmsnorm(const void *x, const void *w, float eps, void *out, int B, int C, int act) {
    if (B < 0 || C < 1 || !x || !w || !out) return AIGC_ERR_ARGS;
    k_rmsnorm(x, w, eps, out, B, C, act);
    return AIGC_OK;
}

int llama_add_rmsnorm(void *x, const void *y, const void *w, float eps, void *out, int B, int C, int act) {
    if (B < 0 || C < 1 || !x || !y || (w && !out)) return AIGC_ERR_ARGS;
    k_add(x, y, (size_t)B * C, act);
    if (w) k_rmsnorm(x, w, eps, out, B, C, act);
    return AIGC_OK;
}

int llama_swiglu(const void *gu, void *g, int B, int F, int gate, int act) {
    if (B < 0 || F < 1 || !gu || !g || (gate != GATE_SILU && gate != GATE_GELU_TANH)) return AIGC_ERR_ARGS;
    k_swiglu(gu, g, B, F, gate, act);
    return AIGC_OK;
}

/* The decode layer's elementwise steps on many rows (prompt chunks, big batches) split by rows among the threads: the
 * same per-row arithmetic, so the same results. Below these sizes (values) one thread does them: a parallel region
 * costs more than the work. */
#define ROWS_PARALLEL_SWIGLU 8192
#define ROWS_PARALLEL_NORM 32768

static void swiglu_rows(const void *gu, void *g, int B, int F, int gate, int act, int nthreads) {
    const size_t es = act_size(act);
#pragma omp parallel for num_threads(nthreads) schedule(static) if ((long)B * F >= ROWS_PARALLEL_SWIGLU)
    for (int b = 0; b < B; b++) k_swiglu((const char *)gu + es * 2 * F * b, (char *)g + es * F * b, 1, F, gate, act);
}

/* out = rmsnorm(x) w per row; with y, x += y first (each row's add, then its norm) */
static void add_norm_rows(void *x, const void *y, const void *w, float eps, void *out, int B, int C, int act,
                          int nthreads) {
    const size_t es = act_size(act);
#pragma omp parallel for num_threads(nthreads) schedule(static) if ((long)B * C >= ROWS_PARALLEL_NORM)
    for (int b = 0; b < B; b++) {
        char *xb = (char *)x + es * C * b;
        if (y) k_add(xb, (const char *)y + es * C * b, (size_t)C, act);
        if (w) k_rmsnorm(xb, w, eps, (char *)out + es * C * b, 1, C, act);
    }
}

/* The scratch of a decode layer: its buffers, each at a multiple of 64 bytes. */
enum { SCRATCH_H, SCRATCH_QKV, SCRATCH_ATT, SCRATCH_GU, SCRATCH_O, SCRATCH_Q, SCRATCH_PART, SCRATCH_N };

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* the bytes of each buffer (sizes[SCRATCH_N]); returns their total, 0 for shapes out of range */
static size_t scratch_layout(int B, int C, int nh, int nkv, int hs, int F, int act, size_t *sizes) {
    if (B < 1 || C < 1 || nh < 1 || nkv < 1 || hs < 1 || F < 1) return 0;
    const size_t es = act_size(act), b = (size_t)B, q_n = (size_t)nh * hs;
    sizes[SCRATCH_H] = align64(es * b * (size_t)(C > F ? C : F));
    sizes[SCRATCH_QKV] = align64(es * b * (size_t)(nh + 2 * nkv) * hs);
    sizes[SCRATCH_ATT] = align64(es * b * q_n);
    sizes[SCRATCH_GU] = align64(es * b * 2 * (size_t)F);
    sizes[SCRATCH_O] = align64(es * b * (size_t)C);
    sizes[SCRATCH_Q] = align64(es * b * q_n);
    const size_t widest = (size_t)(nh + 2 * nkv) * hs > (size_t)2 * F ? (size_t)(nh + 2 * nkv) * hs : (size_t)2 * F;
    sizes[SCRATCH_PART] = align64(es * b * (widest > (size_t)C ? widest : (size_t)C)); /* a part's rows (project) */
    size_t total = 0;
    for (int i = 0; i < SCRATCH_N; i++) total += sizes[i];
    return total;
}

int64_t llama_decode_scratch_bytes(int B, int C, int nh, int nkv, int hs, int F, int act) {
    size_t sizes[SCRATCH_N];
    return (int64_t)scratch_layout(B, C, nh, nkv, hs, F, act, sizes);
}

/* QK-norm (where q_norm / k_norm are given) + rope + cache write + attention, with the query copy in q (B, nh hs).
 * The norms run over each head's hs values in place (k_rmsnorm with a head as a row), before the rotation. */
static int attention_step(void *qkv, int B, float eps, const void *q_norm, const void *k_norm, const float *cos,
                          const float *sin, void *kv, const int64_t *write, const int64_t *rows, const int32_t *lens,
                          void *att, int Tk, int nh, int nkv, int hs, float scale, float softcap, int window, int act,
                          int nthreads, char *q) {
    const size_t es = act_size(act), qkv_n = (size_t)(nh + 2 * nkv) * hs, q_n = (size_t)nh * hs;
    const size_t row = (size_t)2 * nkv * hs;
    for (int b = 0; b < B; b++) {
        char *r = (char *)qkv + es * (size_t)b * qkv_n; /* [q heads | k heads | v heads] */
        if (q_norm) k_rmsnorm(r, q_norm, eps, r, nh, hs, act);
        if (k_norm) k_rmsnorm(r + es * q_n, k_norm, eps, r + es * q_n, nkv, hs, act);
        k_rope(r, nh + nkv, hs, cos + (size_t)b * hs, sin + (size_t)b * hs, act);
        memcpy(q + es * (size_t)b * q_n, r, es * q_n);
        memcpy((char *)kv + es * (size_t)write[b] * row, r + es * q_n, es * row);
    }
    return k_attention(q, kv, rows, lens, att, B, nh, nkv, hs, Tk, scale, softcap, window, act, nthreads);
}

int llama_attention(void *qkv, int B, float eps, const void *q_norm, const void *k_norm, const float *cos,
                    const float *sin, void *kv, const int64_t *write, const int64_t *rows, const int32_t *lens, void *att,
                    int Tk, int nh, int nkv, int hs, float scale, float softcap, int window, int act, int nthreads,
                    void *scratch, int64_t scratch_bytes) {
    if (B < 1 || nh < 1 || nkv < 1 || hs < 1 || nh % nkv || !attention_params_ok(softcap, window)) return AIGC_ERR_ARGS;
    const size_t need = align64(act_size(act) * (size_t)B * (size_t)nh * hs);
    char *q = scratch;
    if (q && (scratch_bytes < 0 || (uint64_t)scratch_bytes < need)) return AIGC_ERR_ARGS;
    if (!q && !(q = malloc(need))) return AIGC_ERR_NOMEM;
    const int rc = attention_step(qkv, B, eps, q_norm, k_norm, cos, sin, kv, write, rows, lens, att, Tk, nh, nkv, hs,
                                  scale, softcap, window, act, nthreads, q);
    if (q != scratch) free(q);
    return rc;
}

/* projection i's parts (1 without parts, else 1..PARTS) and the rows of its part j */
static int nparts(const int32_t *parts, int i) {
    if (!parts) return 1;
    int n = 0;
    while (n < PARTS && parts[PARTS * i + n] > 0) n++;
    return n;
}

static int part_rows(const int32_t *parts, int i, int j, int N) { return parts ? parts[PARTS * i + j] : N; }

/* parts (NULL, or 4 x PARTS rows: each projection's parts, then zeros) cover each projection's N[i] rows, and w's
 * parts are of known kinds (QKIND_*) for inputs of K[i] features: K a multiple of the kind's block, its buffers given
 * (d but for the float kinds, m but for those and qkind_no_m's) */
static int projections_ok(const int32_t *kinds, const int32_t *parts, const void *const *w, const int *N,
                          const int *K) {
    if (parts && !kinds) return 0;
    for (int i = 0, slot = 0; i < 4; i++) {
        const int n = nparts(parts, i);
        long rows = 0;
        for (int j = 0; j < (parts ? PARTS : 1); j++) {
            if (parts && parts[PARTS * i + j] < 0) return 0;
            if (j >= n && parts && parts[PARTS * i + j]) return 0; /* a part after the end */
        }
        for (int j = 0; j < n; j++, slot++) {
            rows += part_rows(parts, i, j, N[i]);
            if (!kinds) continue;
            const int kind = kinds[slot], block = kind == QKIND_Q4 || kind == QKIND_Q8 ? 32 : qkind_block(kind);
            if (!block || K[i] % block || !w[3 * slot]) return 0;
            if (!qkind_float(kind) && (!w[3 * slot + 1] || (!w[3 * slot + 2] && !qkind_no_m(kind)))) return 0;
        }
        if (n < 1 || rows != N[i]) return 0;
    }
    return 1;
}

/* out (B, N) = in (B, K) W_i^T (+ bias) for projection i of the layer, part by part: each part's kind's kernel (as
 * quant_matmul_kind, or quant_matmul's without kinds) into its columns of out, through tmp (B, rows of the part) where
 * the rows of out are not contiguous columns of it (B > 1) */
static int project(int i, const void *in, void *out, const float *bias, int B, int N, int K, const int32_t *kinds,
                   const int32_t *parts, const void *const *w, void *tmp, int act, int i8, int nthreads) {
    int slot = 0;
    for (int p = 0; p < i; p++) slot += nparts(parts, p);
    const int n = nparts(parts, i);
    const size_t es = act_size(act);
    for (int j = 0, col = 0; j < n; j++, slot++) {
        const int rows = part_rows(parts, i, j, N);
        void *dst = n == 1 || B == 1 ? (char *)out + es * (size_t)col : tmp;
        const float *b = bias ? bias + col : NULL;
        const void *qs = w[3 * slot], *d = w[3 * slot + 1], *m = w[3 * slot + 2];
        const int rc = kinds ? k_qmatmul_kind(in, act, kinds[slot], qs, d, m, b, dst, B, rows, K, i8, nthreads)
                             : k_qmatmul(in, act, qs, d, m, b, dst, B, rows, K, i8, nthreads);
        if (rc) return rc;
        if (dst == tmp)
            for (int r = 0; r < B; r++)
                memcpy((char *)out + es * ((size_t)r * N + col), (char *)tmp + es * (size_t)r * rows, es * rows);
        col += rows;
    }
    return AIGC_OK;
}

/* llama_decode_layer's LoRA arguments as lora_add takes them for each projection (checked before anything is
 * written): slots in -1..G-1, 4 x G ranks >= 0, the stacks given where a rank is */
static int lora_ok(const int32_t *slots, int B, int G, const float *a, const float *bt, const int32_t *ranks) {
    if (G < 1 || !ranks) return 0;
    long total = 0;
    for (int i = 0; i < 4 * G; i++) {
        if (ranks[i] < 0) return 0;
        total += ranks[i];
    }
    for (int b = 0; b < B; b++)
        if (slots[b] < -1 || slots[b] >= G) return 0;
    return !total || (a && bt);
}

int llama_decode_layer(void *x, int B, int C, const void *attn_norm, const void *ffn_norm, const void *post_attn_norm,
                       const void *post_ffn_norm, float eps, const void *const *w, const int32_t *kinds,
                       const int32_t *parts, const float *qkv_bias, const void *q_norm, const void *k_norm,
                       const float *cos, const float *sin, void *kv, const int64_t *write, const int64_t *rows,
                       const int32_t *lens, int Tk, int nh, int nkv, int hs, int F, int gate, float scale,
                       float softcap, int window, int act, int i8, int nthreads, void *scratch, int64_t scratch_bytes,
                       const int32_t *lora_slots, int lora_G, const float *lora_a, const float *lora_bt,
                       const int32_t *lora_ranks) {
    if (B <= 0 || nkv <= 0 || C % 32 || F % 32 || (nh * hs) % 32 || hs % 16 || nh % nkv) return AIGC_ERR_ARGS;
    if (lora_slots && !lora_ok(lora_slots, B, lora_G, lora_a, lora_bt, lora_ranks)) return AIGC_ERR_ARGS;
    if ((gate != GATE_SILU && gate != GATE_GELU_TANH) || !post_attn_norm != !post_ffn_norm) return AIGC_ERR_ARGS;
    if (!attention_params_ok(softcap, window)) return AIGC_ERR_ARGS; /* (before anything is written) */
    const int qkv_n = (nh + 2 * nkv) * hs, q_n = nh * hs;
    if (!projections_ok(kinds, parts, w, (const int[4]){qkv_n, C, 2 * F, C}, (const int[4]){C, q_n, C, F}))
        return AIGC_ERR_ARGS; /* (likewise) */
    size_t sizes[SCRATCH_N];
    const size_t need = scratch_layout(B, C, nh, nkv, hs, F, act, sizes);
    if (!need) return AIGC_ERR_ARGS;
    char *base = scratch;
    if (base && (scratch_bytes < 0 || (uint64_t)scratch_bytes < need)) return AIGC_ERR_ARGS;
    if (!base && !(base = malloc(need))) return AIGC_ERR_NOMEM;
    char *buf[SCRATCH_N];
    for (size_t i = 0, at = 0; i < SCRATCH_N; at += sizes[i], i++) buf[i] = base + at;
    void *h = buf[SCRATCH_H], *qkv = buf[SCRATCH_QKV], *att = buf[SCRATCH_ATT], *gu = buf[SCRATCH_GU];
    void *o = buf[SCRATCH_O];
    int rc;
    const int ins[4] = {C, q_n, C, F}, outs[4] = {qkv_n, C, 2 * F, C};
    const float *la[4] = {lora_a}, *lbt[4] = {lora_bt}; /* each projection's LoRA stacks: after the one before */
    for (int i = 1; i < 4 && lora_slots; i++) {
        int r = 0;
        for (int g = 0; g < lora_G; g++) r += lora_ranks[(i - 1) * lora_G + g];
        la[i] = la[i - 1] + (size_t)r * ins[i - 1];
        lbt[i] = lbt[i - 1] + (size_t)r * outs[i - 1];
    }
#define MATMUL(i, in, bias, out, N, K)                                                                         \
    project(i, in, out, bias, B, N, K, kinds, parts, w, buf[SCRATCH_PART], act, i8, nthreads);                 \
    if (!rc && lora_slots) /* the rows' LoRA deltas on projection i's output, as model_core.lora's hooks add them */ \
        rc = lora_add(in, out, B, K, N, act, lora_slots, lora_G, la[i], lbt[i], lora_ranks + (i) * lora_G, nthreads); \
    if (rc) goto done
    add_norm_rows(x, NULL, attn_norm, eps, h, B, C, act, nthreads);
    rc = MATMUL(0, h, qkv_bias, qkv, qkv_n, C);
    rc = attention_step(qkv, B, eps, q_norm, k_norm, cos, sin, kv, write, rows, lens, att, Tk, nh, nkv, hs, scale,
                        softcap, window, act, nthreads, buf[SCRATCH_Q]);
    if (rc) goto done;
    rc = MATMUL(1, att, NULL, o, C, q_n);
    if (post_attn_norm) /* (in place: a row is read, then written) */
        add_norm_rows(o, NULL, post_attn_norm, eps, o, B, C, act, nthreads);
    add_norm_rows(x, o, ffn_norm, eps, h, B, C, act, nthreads);
    rc = MATMUL(2, h, NULL, gu, 2 * F, C);
    swiglu_rows(gu, h, B, F, gate, act, nthreads);
    rc = MATMUL(3, h, NULL, o, C, F);
    if (post_ffn_norm) add_norm_rows(o, NULL, post_ffn_norm, eps, o, B, C, act, nthreads);
    add_norm_rows(x, o, NULL, eps, NULL, B, C, act, nthreads);
#undef MATMUL
done:
    if (base != (char *)scratch) free(base);
    return rc;
}

int llama_decode_layers(int L, const int64_t *layers, void *x, int B, int C, float eps, const int64_t *write,
                        const int64_t *rows, const int32_t *lens, int Tk, int nh, int nkv, int hs, int F, int gate,
                        float scale, float softcap, int act, int nthreads, void *scratch, int64_t scratch_bytes,
                        int32_t *failed) {
    if (failed) *failed = -1;
    if (L < 1 || !layers) return AIGC_ERR_ARGS;
    for (int l = 0; l < L; l++) {
        const int64_t *a = layers + (size_t)AIGC_LAYER_ARGS * l;
#define P(i) ((void *)(intptr_t)a[AIGC_LA_##i])
        const int rc = llama_decode_layer(
            x, B, C, P(ATTN_NORM), P(FFN_NORM), P(POST_ATTN_NORM), P(POST_FFN_NORM), eps, P(W), P(KINDS), P(PARTS),
            P(QKV_BIAS), P(Q_NORM), P(K_NORM), P(COS), P(SIN), P(KV), write, rows, lens, Tk, nh, nkv, hs, F, gate,
            scale, softcap, (int)a[AIGC_LA_WINDOW], act, (int)a[AIGC_LA_I8], nthreads, scratch, scratch_bytes,
            P(LORA_SLOTS), (int)a[AIGC_LA_LORA_G], P(LORA_A), P(LORA_BT), P(LORA_RANKS));
#undef P
        if (rc) {
            if (failed) *failed = l;
            return rc;
        }
    }
    return AIGC_OK;
}
