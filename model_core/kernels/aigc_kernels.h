/* The kernels library's exported functions: every symbol the library exports is declared here, and nothing else
 * (it is built with -fvisibility=hidden; AIGC_API marks these). model_core/native.py holds the same list as its
 * ctypes table (ENTRY_POINTS: argument names and types, return type) and tests/model_core/test_native.py checks
 * the two against each other; every kernel source includes this header (through common.h), so the compiler
 * checks each definition against its declaration.
 *
 * Conventions: shapes are in elements; activations (act) are float32 (ACT_F32) or bfloat16 (ACT_BF16, stored as
 * uint16_t), see common.h; nthreads is the OpenMP team size. Every function returning int returns an AIGC_*
 * status: 0 (AIGC_OK), or a negative code saying why it did nothing usable (its outputs are then undefined).
 * Pointers are read only during the call: the library keeps none.
 */
#ifndef AIGC_KERNELS_H
#define AIGC_KERNELS_H

#include <stdint.h>

#define AIGC_API __attribute__((visibility("default")))

/* the status codes (model_core/native.py: STATUS) */
enum {
    AIGC_OK = 0,
    AIGC_ERR_ARGS = -1,        /* a shape, size or argument outside what the kernel takes */
    AIGC_ERR_NOMEM = -2,       /* an allocation failed */
    AIGC_ERR_UNSUPPORTED = -3, /* this build lacks the mode asked for (AIGC_INT8 without integer dot products) */
};

/* aigc_cpu_features() bits (model_core/native.py: CPU_*) */
enum {
    CPU_AVX2 = 1 << 0,       /* avx2 + fma + f16c */
    CPU_AVX512BF16 = 1 << 1, /* avx512f + bw + vl + bf16 (OS saves the state) */
    CPU_NEON = 1 << 2,       /* aarch64 Advanced SIMD */
    CPU_NEON_DOTPROD = 1 << 3,
    CPU_AMX_BF16 = 1 << 4, /* AMX tiles with bf16 (the matmul units oneDNN's bf16 matmuls run fast on) */
    CPU_AVX512F = 1 << 5,  /* AVX-512 foundation (what the BLAS's fp32 matmuls use where present) */
    CPU_AVX512VNNI = 1 << 6, /* avx512f + bw + vl + vnni: vpdpbusd (the int8 dot products, 4 products a lane) */
};

/* Which build this is: "reference", "avx2", "avx512bf16", "neon", "neon-dotprod" (a static string). */
AIGC_API const char *aigc_kernels_isa(void);

/* What this CPU runs: CPU_* bits (CPUID on x86, HWCAP on Linux/aarch64). Not a status: never fails. */
AIGC_API int aigc_cpu_features(void);

/* The matmuls' mode (the i8 argument of quant_matmul, quant_matmul_kind and llama_decode_layer): AIGC_INT8 or not
 * (the exact products), and AIGC_EVERY_BATCH: the same method at every batch size, so that a row's result never
 * depends on the batch (the batch-invariant mode); without it a build may change method with the batch (the
 * AVX512-BF16 build's exact products on AMX tiles from a few rows, where the CPU has them: another summation order).
 * AIGC_INT16 (with AIGC_INT8): x rounded to 16 bits per block instead of 8 (two int8 halves, common.h
 * quantize_block16): twice the integer products, activations as precise as fp32's to about 1e-4 of a block's
 * largest; the results as bit-identical across builds and batches as int8 mode's. */
enum { AIGC_INT8 = 1, AIGC_EVERY_BATCH = 2, AIGC_INT16 = 4 };

/* y (M, N) = x (M, K) W^T (+ bias, N fp32, or NULL), W quantized (common.h, k_qmatmul): qs, d and m (m NULL for
 * 8-bit weights); i8 & AIGC_INT8: x rounded to int8 per block, W interleaved by 8 rows.
 * AIGC_ERR_ARGS: K not a multiple of 32, M or N < 1. AIGC_ERR_UNSUPPORTED: i8 & AIGC_INT8 in a build without int8 mode.
 * AIGC_ERR_NOMEM. */
AIGC_API int quant_matmul(const void *x, int act, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
                          const float *bias, void *y, int M, int N, int K, int i8, int nthreads);

/* out (B, nh, hs) = softmax(scores) V for q (B, nh, hs), keys and values read in place from a paged layer kv
 * (rows, 2 nkv, hs) through rows (B, Tk) int64, lens[b] (int32) keys of sequence b (its key positions 0..lens[b]-1
 * in order). The attention parameters (the same three, in this order, right before act, in every entry point
 * that attends: llama_attention, llama_decode_layer):
 *   scale    each score is s = scale q.k (1/sqrt(hs) for most models; Gemma: query_pre_attn_scalar^-1/2)
 *   softcap  0: none; > 0: s becomes softcap tanh(s / softcap) before the softmax (Gemma 2's logit soft-capping)
 *   window   0: every key; > 0: sequence b sees only its last `window` keys, positions >= lens[b] - window (sliding
 *            window attention: Mistral, Gemma 2/3 local layers). The keys before the window are not read at all: a
 *            windowed call costs O(min(window, lens[b])) per query, whatever the context. The query's own key (the
 *            last) is always in the window, so no row is ever empty.
 * AIGC_ERR_ARGS: hs not a multiple of 16 (SIMD builds: or of the vector width, or > 256), nh not a multiple of nkv,
 * B or Tk < 1, a lens[b] outside [1, Tk], softcap < 0, infinite or NaN, window < 0. AIGC_ERR_NOMEM. */
AIGC_API int paged_attention_decode(const void *q, const void *kv, const int64_t *rows, const int32_t *lens, void *out,
                                    int B, int nh, int nkv, int hs, int Tk, float scale, float softcap, int window,
                                    int act, int nthreads);

/* out (B, C) = rmsnorm(x) * w. AIGC_ERR_ARGS: B < 0, C < 1, or a NULL buffer. */
AIGC_API int llama_rmsnorm(const void *x, const void *w, float eps, void *out, int B, int C, int act);

/* x (B, C) += y; then, when w is given, out = rmsnorm(x) * w (the next sublayer's input; out unused without w).
 * AIGC_ERR_ARGS: B < 0, C < 1, x or y NULL, or w given without out. */
AIGC_API int llama_add_rmsnorm(void *x, const void *y, const void *w, float eps, void *out, int B, int C, int act);

/* a gated FFN's activation f (llama_swiglu's and llama_decode_layer's gate): f(x W_gate) * (x W_up) */
enum { GATE_SILU = 0, GATE_GELU_TANH = 1 };

/* g (B, F) = f(gate) * up of gu (B, 2F) = [gate | up], f SiLU or GELU-tanh (gate: GATE_*; each rounded to act as
 * PyTorch's modules round: f's output, then the product). AIGC_ERR_ARGS: B < 0, F < 1, an unknown gate, or a NULL
 * buffer. */
AIGC_API int llama_swiglu(const void *gu, void *g, int B, int F, int gate, int act);

/* Bytes of scratch that llama_decode_layer and llama_attention take for these shapes (0 for bad shapes). A caller
 * that passes a buffer of at least this size spares the library its allocations; one buffer serves any call with
 * these or smaller shapes, so callers keep one and grow it. */
AIGC_API int64_t llama_decode_scratch_bytes(int B, int C, int nh, int nkv, int hs, int F, int act);

/* qkv (B, (nh + 2 nkv) hs) -> att (B, nh hs): normalise the q and k heads where q_norm / k_norm are given, rotate
 * them by cos, sin (B, hs) fp32 (both in place: qkv is overwritten), store k, v at the rows write (B,) int64 of this
 * layer's cache kv (rows, 2 nkv, hs), attend from the paged rows (B, Tk) int64 with lens (B,) int32 keys each (the
 * new token's key is the last), with scale, softcap and window as paged_attention_decode.
 * The QK-norm (the same two arguments, right before cos and sin, in both entry points that rotate: llama_attention
 * and llama_decode_layer; Qwen 3, Gemma 3):
 *   q_norm   NULL: none; else hs weights in act: each query head becomes rmsnorm(head) * q_norm (RMSNorm over its hs
 *            values with epsilon eps, computed as llama_rmsnorm computes a row: in bf16 normalised in fp32, rounded,
 *            then scaled), before RoPE
 *   k_norm   the same for each key head (the key is stored normalised and rotated)
 * eps is unused without them. scratch: NULL (allocated per call) or scratch_bytes >= llama_decode_scratch_bytes(...)
 * bytes. AIGC_ERR_ARGS: as paged_attention_decode, or scratch too small. AIGC_ERR_NOMEM. */
AIGC_API int llama_attention(void *qkv, int B, float eps, const void *q_norm, const void *k_norm, const float *cos,
                             const float *sin, void *kv, const int64_t *write, const int64_t *rows,
                             const int32_t *lens, void *att, int Tk, int nh, int nkv, int hs, float scale,
                             float softcap, int window, int act, int nthreads, void *scratch, int64_t scratch_bytes);

/* A whole llama decoder layer, one token per sequence, x (B, C) updated in place:
 *   h = rmsnorm(x) attn_norm;  qkv = h Wqkv (+ qkv_bias);  QK-norm the q, k heads;  rotate them;  cache write;
 *   o = attention(q, cache) Wo;  x += post_attn_norm ? rmsnorm(o) post_attn_norm : o;
 *   h = rmsnorm(x) ffn_norm;  o = (f(h Wg) * (h Wu)) Wd;  x += post_ffn_norm ? rmsnorm(o) post_ffn_norm : o
 * with f SiLU (gate GATE_SILU) or GELU-tanh (GATE_GELU_TANH: Gemma); post_attn_norm, post_ffn_norm: NULL (none) or C
 * weights in act, the norms after each sublayer of Gemma 2 and 3 (both or neither).
 * w: the 12 pointers (qs, d, m; m NULL for Q8_0) of Wqkv, Wo, Wgate|up, Wdown; kinds: NULL (the four are 4/8-bit blocks
 * as quant_matmul takes them: m NULL for 8-bit) or their 4 kinds (QKIND_*, int32), each projection then run as
 * quant_matmul_kind runs that kind (the same kernel: the same results), its w in the kind's layout (a Q4_K_M file's mix
 * of Q5_0, Q4_K, Q6_K and Q8_0 runs as one call); parts: NULL (each projection one weight, as above) or, with kinds,
 * 4 x AIGC_PROJECTION_PARTS int32: the rows of each projection's parts in turn (parts[AIGC_PROJECTION_PARTS i + j]: part
 * j of projection i, then zeros; each projection's rows add up to its outputs (nh + 2 nkv) hs, C, 2 F, C), for weights
 * stacked by rows from parts of different kinds (a Q4_K_M file's QKV: q, k in Q4_K, v in Q6_K); w and kinds then hold
 * (qs, d, m) and the kind of every part in that order, each part run by its kind's kernel into its columns; qkv_bias: NULL (none) or (nh + 2 nkv) hs fp32 values added to the qkv
 * projection in fp32 before its output is rounded to act, as quant_matmul adds its bias (Qwen 2); q_norm, k_norm: the
 * QK-norm as llama_attention (NULL: none), with the layer's eps; the rest as llama_attention (scale, softcap, window:
 * the attention's, as paged_attention_decode); i8: the matmuls' mode (quant_matmul_kind), one for all four: exact (0)
 * or int8 (AIGC_INT8, every w interleaved), for any mix of kinds, with or without AIGC_EVERY_BATCH. scratch: NULL (allocated per call) or scratch_bytes >=
 * llama_decode_scratch_bytes(B, C, nh, nkv, hs, F, act) bytes. lora_slots: NULL (no LoRA) or each row's adapter
 * slot (B int32, -1: none), with lora_ranks (4, lora_G) int32 and lora_a, lora_bt float32: the LoRA pairs of Wqkv,
 * Wo, Wgate|up, Wdown in turn, each projection's as lora_add takes them (its A then the next projection's; rank 0:
 * not targeted); each projection's output then gets its rows' deltas as lora_add adds them, before anything reads it.
 * AIGC_ERR_ARGS also: lora_slots given with lora_G < 1 or lora_ranks NULL, or as lora_add.
 * AIGC_ERR_ARGS: B < 1; C, F or nh hs not a multiple of 32; hs not of 16; nh not a multiple of nkv; softcap or window
 * out of range; an unknown gate; one post norm without the other; with kinds, an unknown kind, a projection's input
 * features (C, nh hs, C, F) not a multiple of its kind's block, or a NULL weight buffer the kind needs; parts without
 * kinds, a negative part, a part after a zero or a projection's parts not adding up to its outputs (all these checked
 * before anything is written); scratch too small; or as the matmuls and attention.
 * AIGC_ERR_UNSUPPORTED, AIGC_ERR_NOMEM: as quant_matmul. */
enum { AIGC_PROJECTION_PARTS = 3 }; /* llama_decode_layer: the most parts of one projection */
AIGC_API int llama_decode_layer(void *x, int B, int C, const void *attn_norm, const void *ffn_norm,
                                const void *post_attn_norm, const void *post_ffn_norm, float eps,
                                const void *const *w, const int32_t *kinds, const int32_t *parts,
                                const float *qkv_bias,
                                const void *q_norm, const void *k_norm, const float *cos, const float *sin, void *kv,
                                const int64_t *write, const int64_t *rows, const int32_t *lens, int Tk, int nh,
                                int nkv, int hs, int F, int gate, float scale, float softcap, int window, int act,
                                int i8, int nthreads, void *scratch, int64_t scratch_bytes,
                                const int32_t *lora_slots, int lora_G, const float *lora_a, const float *lora_bt,
                                const int32_t *lora_ranks);

/* Every layer of a decode step in one call: llama_decode_layer for layer l = 0 .. L-1 in turn, on the same x, B, C,
 * eps, write, rows, lens, Tk, nh, nkv, hs, F, gate, scale, softcap, act, nthreads and scratch, with layer l's own
 * arguments at layers + AIGC_LAYER_ARGS l, in AIGC_LA_* order (int64: the pointers as addresses, 0 for NULL). The
 * same results as the L calls (it is them): it spares a caller the work between them. The first layer that fails
 * stops the loop: its status is returned and its index written to *failed (where failed is given; -1 when none
 * failed). AIGC_ERR_ARGS also: L < 1 or layers NULL. */
enum {
    AIGC_LA_ATTN_NORM, AIGC_LA_FFN_NORM, AIGC_LA_POST_ATTN_NORM, AIGC_LA_POST_FFN_NORM, AIGC_LA_W, AIGC_LA_KINDS,
    AIGC_LA_PARTS, AIGC_LA_QKV_BIAS, AIGC_LA_Q_NORM, AIGC_LA_K_NORM, AIGC_LA_COS, AIGC_LA_SIN, AIGC_LA_KV,
    AIGC_LA_LORA_SLOTS, AIGC_LA_LORA_A, AIGC_LA_LORA_BT, AIGC_LA_LORA_RANKS, AIGC_LA_WINDOW, AIGC_LA_I8,
    AIGC_LA_LORA_G, AIGC_LAYER_ARGS
};
AIGC_API int llama_decode_layers(int L, const int64_t *layers, void *x, int B, int C, float eps, const int64_t *write,
                                 const int64_t *rows, const int32_t *lens, int Tk, int nh, int nkv, int hs, int F,
                                 int gate, float scale, float softcap, int act, int nthreads, void *scratch,
                                 int64_t scratch_bytes, int32_t *failed);

/* The repacked weight forms quant_matmul_kind takes, by value (model_core/qmatmul.py: KINDS, GGML_TYPES; layouts in
 * common.h, k_qmatmul_kind): the 4-bit blocks of 32 (Q4_0, Q4_1), the 8-bit ones (Q8_0), and the K-quants'
 * super-blocks of 256 (Q4_K, Q6_K); the 5-bit blocks of 32 (Q5_0, Q5_1) and super-blocks of 256 (Q5_K); and float
 * weights as stored (F16, BF16: d and m NULL, exact products in either mode, K a multiple of 32); and the non-linear
 * 4-bit blocks of 32 (IQ4_NL, IQ4_XS); the 2- and 3-bit K-quants (Q2_K, Q3_K: super-blocks of 256, a scale per 16). */
enum {
    QKIND_Q4 = 0,
    QKIND_Q8 = 1,
    QKIND_Q4_K = 2,
    QKIND_Q6_K = 3,
    QKIND_Q5_0 = 4,
    QKIND_Q5_1 = 5,
    QKIND_Q5_K = 6,
    QKIND_F16 = 7,
    QKIND_BF16 = 8,
    QKIND_IQ4 = 9, /* IQ4_NL, IQ4_XS: 4-bit indices into a fixed table of 16 int8 values, an fp32 scale per 32 */
    QKIND_Q2_K = 10,
    QKIND_Q3_K = 11,
};

/* quant_matmul for a weight of any kind: y (M, N) = x (M, K) W^T (+ bias, N fp32, or NULL); qs, d, m as the kind's
 * layout (common.h, k_qmatmul_kind; QKIND_Q4 and QKIND_Q8 exactly as quant_matmul's, m NULL for QKIND_Q8).
 * AIGC_ERR_ARGS: an unknown kind, K not a multiple of the kind's block (32, or 256 for the K-quants), M or N < 1, a
 * NULL weight buffer. AIGC_ERR_UNSUPPORTED: i8 & AIGC_INT8 in a build without int8 mode (where a build has it, every kind has
 * it, the weight then interleaved as common.h's k_qmatmul_kind says). AIGC_ERR_NOMEM. */
AIGC_API int quant_matmul_kind(const void *x, int act, int kind, const uint8_t *qs, const void *d, const void *m,
                               const float *bias, void *y, int M, int N, int K, int i8, int nthreads);

/* The weights of a matrix in quant_matmul_kind's row form (not interleaved), as gguf dequantizes them: out (N, K) in
 * act (fp32, or bf16 rounded to nearest even). AIGC_ERR_ARGS as quant_matmul_kind's (M aside); AIGC_ERR_NOMEM. */
AIGC_API int quant_dequantize(int kind, const uint8_t *qs, const void *d, const void *m, void *out, int N, int K,
                              int act, int nthreads);

/* out (N, n_out) += each row's LoRA delta (lora.c; model_core/lora.py): row i with slot g = choice[i] (-1: none, its
 * row untouched) gets B_g (A_g x_i), with A (sum ranks, n_in) and Bt (sum ranks, n_out) float32 holding the G slots'
 * A_g (ranks[g], n_in) and B_g^T (ranks[g], n_out) stacked in slot order (rank 0: the slot has no delta), in double,
 * each output rounded once to act; x (N, n_in) in act. A row's result does not depend on the rows beside it.
 * AIGC_ERR_ARGS: N < 0 (0: nothing to do), n_in or n_out < 1, G < 1, a rank < 0, A or Bt NULL with a rank, a choice
 * outside -1..G-1; AIGC_ERR_NOMEM. */
AIGC_API int lora_add(const void *x, void *out, int N, int n_in, int n_out, int act, const int32_t *choice, int G,
                      const float *A, const float *Bt, const int32_t *ranks, int nthreads);

#endif
