/* Runs entry points of a kernels library (model_core/kernels/aigc_kernels.h) on requests read from a file, so that
 * builds for another machine (aarch64 under qemu-user) can be tested from Python: test_native_neon.py.
 *
 *   kernel_driver LIBRARY REQUESTS RESULTS
 *
 * REQUESTS holds any number of calls, one after the other, each (native byte order):
 *   u32 length of the name, the name (no NUL)
 *   u32 nbuf, u32 nint, u32 nflt
 *   nbuf buffers, each: i64 size in bytes (-1: pass NULL), u32 returned (1: written to RESULTS after the call),
 *                       then its bytes
 *   nint i64, then nflt f32
 * The buffers are the entry point's pointer arguments in the order of its signature (llama_decode_layer's w:
 * its W_POINTERS pointers in place of the one: 3 for each of the parts of its 4 projections, NULL past the last), the ints its int and int64_t arguments in order, the floats its float
 * arguments (aigc_kernels.h declares them all; test_native_neon.py takes the order from model_core/native.py).
 * aigc_kernels_isa takes one 64-byte buffer that receives the name; aigc_cpu_features nothing.
 * RESULTS, per call: i32 the entry point's return value, then each returned buffer: i64 size, its bytes.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aigc_kernels.h"

#define MAX_BUF 64
#define W_POINTERS (3 * 4 * AIGC_PROJECTION_PARTS)
_Static_assert(5 + W_POINTERS + 16 == 57, "llama_decode_layer's buffers in ENTRY");
#define MAX_NUM 16

/* the entry points' types, from the library's header (built with -I model_core/kernels) */
typedef __typeof__(aigc_kernels_isa) isa_fn;
typedef __typeof__(aigc_cpu_features) features_fn;
typedef __typeof__(quant_matmul) quant_matmul_fn;
typedef __typeof__(paged_attention_decode) paged_attention_decode_fn;
typedef __typeof__(llama_rmsnorm) llama_rmsnorm_fn;
typedef __typeof__(llama_add_rmsnorm) llama_add_rmsnorm_fn;
typedef __typeof__(llama_swiglu) llama_swiglu_fn;
typedef __typeof__(llama_attention) llama_attention_fn;
typedef __typeof__(llama_decode_layer) llama_decode_layer_fn;
typedef __typeof__(quant_matmul_kind) quant_matmul_kind_fn;
typedef __typeof__(quant_dequantize) quant_dequantize_fn;
typedef __typeof__(lora_add) lora_add_fn;

/* One per entry point: call fn with the request's buffers b, ints i and floats f (in the order above). */
typedef void (*any_fn)(void);
typedef int call_fn(any_fn fn, void **b, const int64_t *i, const float *f);
#define I(k) ((int)i[k])

static int call_isa(any_fn fn, void **b, const int64_t *i, const float *f) {
    (void)i, (void)f;
    snprintf(b[0], 64, "%s", ((isa_fn *)fn)());
    return 0;
}

static int call_cpu_features(any_fn fn, void **b, const int64_t *i, const float *f) {
    (void)b, (void)i, (void)f;
    return ((features_fn *)fn)();
}

static int call_quant_matmul(any_fn fn, void **b, const int64_t *i, const float *f) {
    (void)f;
    return ((quant_matmul_fn *)fn)(b[0], I(0), b[1], b[2], b[3], b[4], b[5], I(1), I(2), I(3), I(4), I(5));
}

static int call_paged_attention_decode(any_fn fn, void **b, const int64_t *i, const float *f) {
    return ((paged_attention_decode_fn *)fn)(b[0], b[1], b[2], b[3], b[4], I(0), I(1), I(2), I(3), I(4), f[0], f[1],
                                             I(5), I(6), I(7));
}

static int call_llama_rmsnorm(any_fn fn, void **b, const int64_t *i, const float *f) {
    return ((llama_rmsnorm_fn *)fn)(b[0], b[1], f[0], b[2], I(0), I(1), I(2));
}

static int call_llama_add_rmsnorm(any_fn fn, void **b, const int64_t *i, const float *f) {
    return ((llama_add_rmsnorm_fn *)fn)(b[0], b[1], b[2], f[0], b[3], I(0), I(1), I(2));
}

static int call_llama_swiglu(any_fn fn, void **b, const int64_t *i, const float *f) {
    (void)f;
    return ((llama_swiglu_fn *)fn)(b[0], b[1], I(0), I(1), I(2), I(3));
}

/* buffers: qkv, q_norm, k_norm, cos, sin, kv, write, rows, lens, att, scratch; floats: eps, scale, softcap */
static int call_llama_attention(any_fn fn, void **b, const int64_t *i, const float *f) {
    return ((llama_attention_fn *)fn)(b[0], I(0), f[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], I(1),
                                      I(2), I(3), I(4), f[1], f[2], I(5), I(6), I(7), b[10], i[8]);
}

/* buffers: x, attn_norm, ffn_norm, post_attn_norm, post_ffn_norm, the W_POINTERS of w, kinds, parts, qkv_bias, q_norm,
 * k_norm, cos, sin, kv, write, rows, lens, scratch, lora_slots, lora_a, lora_bt, lora_ranks */
static int call_llama_decode_layer(any_fn fn, void **b, const int64_t *i, const float *f) {
    const void *w[W_POINTERS];
    memcpy(w, b + 5, sizeof w);
    void **r = b + 5 + W_POINTERS;
    return ((llama_decode_layer_fn *)fn)(b[0], I(0), I(1), b[1], b[2], b[3], b[4], f[0], w, r[0], r[1], r[2], r[3],
                                         r[4], r[5], r[6], r[7], r[8], r[9], r[10], I(2), I(3), I(4), I(5), I(6), I(7),
                                         f[1], f[2], I(8), I(9), I(10), I(11), r[11], i[12], r[12], I(13), r[13],
                                         r[14], r[15]);
}

static int call_quant_matmul_kind(any_fn fn, void **b, const int64_t *i, const float *f) {
    (void)f;
    return ((quant_matmul_kind_fn *)fn)(b[0], I(0), I(1), b[1], b[2], b[3], b[4], b[5], I(2), I(3), I(4), I(5), I(6));
}

static int call_quant_dequantize(any_fn fn, void **b, const int64_t *i, const float *f) {
    (void)f;
    return ((quant_dequantize_fn *)fn)(I(0), b[0], b[1], b[2], b[3], I(1), I(2), I(3), I(4));
}

static int call_lora_add(any_fn fn, void **b, const int64_t *i, const float *f) {
    (void)f;
    return ((lora_add_fn *)fn)(b[0], b[1], I(0), I(1), I(2), I(3), b[2], I(4), b[3], b[4], b[5], I(5));
}

static const struct {
    const char *name;
    unsigned nbuf, nint, nflt;
    call_fn *call;
} ENTRY[] = {
    {"aigc_kernels_isa", 1, 0, 0, call_isa},
    {"aigc_cpu_features", 0, 0, 0, call_cpu_features},
    {"quant_matmul", 6, 6, 0, call_quant_matmul},
    {"paged_attention_decode", 5, 8, 2, call_paged_attention_decode},
    {"llama_rmsnorm", 3, 3, 1, call_llama_rmsnorm},
    {"llama_add_rmsnorm", 4, 3, 1, call_llama_add_rmsnorm},
    {"llama_swiglu", 2, 4, 0, call_llama_swiglu},
    {"llama_attention", 11, 9, 3, call_llama_attention},
    {"llama_decode_layer", 57, 14, 3, call_llama_decode_layer},
    {"quant_matmul_kind", 6, 7, 0, call_quant_matmul_kind},
    {"quant_dequantize", 4, 5, 0, call_quant_dequantize},
    {"lora_add", 6, 6, 0, call_lora_add},
};

static void die(const char *what, const char *detail) {
    fprintf(stderr, "kernel_driver: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(2);
}

static void read_exact(FILE *in, void *p, size_t n) {
    if (n && fread(p, 1, n, in) != n) die("truncated request", NULL);
}

static void write_exact(FILE *out, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, out) != n) die("cannot write the results", NULL);
}

int main(int argc, char **argv) {
    if (argc != 4) die("usage: kernel_driver LIBRARY REQUESTS RESULTS", NULL);
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) die("dlopen", dlerror());
    FILE *in = fopen(argv[2], "rb"), *out = fopen(argv[3], "wb");
    if (!in || !out) die("cannot open", !in ? argv[2] : argv[3]);
    uint32_t len;
    while (fread(&len, 4, 1, in) == 1) {
        char name[64] = {0};
        if (len >= sizeof name) die("entry point name too long", NULL);
        read_exact(in, name, len);
        uint32_t n[3];
        read_exact(in, n, sizeof n);
        size_t e = 0;
        while (e < sizeof ENTRY / sizeof ENTRY[0] && strcmp(ENTRY[e].name, name)) e++;
        if (e == sizeof ENTRY / sizeof ENTRY[0]) die("unknown entry point", name);
        if (n[0] != ENTRY[e].nbuf || n[1] != ENTRY[e].nint || n[2] != ENTRY[e].nflt)
            die("wrong number of buffers, ints or floats for", name);
        void *buf[MAX_BUF] = {0};
        int64_t size[MAX_BUF], ints[MAX_NUM];
        uint32_t returned[MAX_BUF];
        float flts[MAX_NUM];
        for (uint32_t k = 0; k < n[0]; k++) {
            read_exact(in, &size[k], 8);
            read_exact(in, &returned[k], 4);
            if (size[k] < 0) continue; /* NULL */
            if (!(buf[k] = malloc(size[k] ? (size_t)size[k] : 1))) die("out of memory", NULL);
            read_exact(in, buf[k], (size_t)size[k]);
        }
        read_exact(in, ints, 8 * (size_t)n[1]);
        read_exact(in, flts, 4 * (size_t)n[2]);
        any_fn fn = (any_fn)dlsym(lib, name);
        if (!fn) die("dlsym", dlerror());
        const int32_t rc = ENTRY[e].call(fn, buf, ints, flts);
        write_exact(out, &rc, 4);
        for (uint32_t k = 0; k < n[0]; k++) {
            if (!returned[k]) continue;
            write_exact(out, &size[k], 8);
            if (size[k] > 0) write_exact(out, buf[k], (size_t)size[k]);
        }
        for (uint32_t k = 0; k < n[0]; k++) free(buf[k]);
    }
    if (fclose(out)) die("cannot write the results", NULL);
    fclose(in);
    return 0;
}
