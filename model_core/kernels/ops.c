/* The elementwise pieces of a llama decode step (SIMD builds): RMSNorm, residual add, SwiGLU, RoPE.
 * Each computes in fp32 and rounds where PyTorch's modules of the activation dtype round. */
#include <math.h>

#include "simd.h"

/* out = round(round(x / rms(x)) * w) per row of C features (PyTorch's RMSNorm order) */
void k_rmsnorm(const void *x, const void *w, float eps, void *out, int B, int C, int act) {
    for (int b = 0; b < B; b++) {
        const size_t at = (size_t)b * C;
        vf ssv = vset1(0.0f);
        int i = 0;
        for (; i + VL <= C; i += VL) {
            const vf v = vload_act(x, at + i, act);
            ssv += v * v;
        }
        float ss = vsum(ssv);
        for (; i < C; i++) {
            const float v = load_act(x, at + i, act);
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (i = 0; i + VL <= C; i += VL) {
            vf n = vload_act(x, at + i, act) * r;
            if (act == ACT_BF16) n = vround_bf16(n);
            vstore_act(out, at + i, n * vload_act(w, i, act), act);
        }
        for (; i < C; i++)
            store_act(out, at + i, round_act(load_act(x, at + i, act) * r, act) * load_act(w, i, act), act);
    }
}

/* x = round(x + y) */
void k_add(void *x, const void *y, size_t n, int act) {
    size_t i = 0;
    for (; i + VL <= n; i += VL) vstore_act(x, i, vload_act(x, i, act) + vload_act(y, i, act), act);
    for (; i < n; i++) store_act(x, i, load_act(x, i, act) + load_act(y, i, act), act);
}

/* x * sigmoid(x) for any x: sigmoid from e^-|x| (never overflows) */
static inline vf vsilu(vf x) {
    const vf t = vexp_neg(-vabs(x));
    const vf num = vselect(x < 0.0f, t, vset1(1.0f));
    return x * (num / (t + 1.0f));
}

/* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh from e^-2|u| (never overflows) */
static inline vf vgelu_tanh(vf x) {
    const vf u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const vf t = vexp_neg(-2.0f * vabs(u)), th = (1.0f - t) / (1.0f + t); /* tanh |u| */
    return 0.5f * x * (1.0f + vselect(u < 0.0f, -th, th));
}

/* g[b, i] = round(round(act(gate[b, i])) * up[b, i]) for gu (B, 2F) = [gate | up], act SiLU or GELU-tanh (gate) */
void k_swiglu(const void *gu, void *g, int B, int F, int gate_fn, int act) {
    for (int b = 0; b < B; b++) {
        const size_t gate = (size_t)b * 2 * F, up = gate + F, out = (size_t)b * F;
        int i = 0;
        for (; i + VL <= F; i += VL) {
            const vf v = vload_act(gu, gate + i, act);
            vf a = gate_fn == GATE_GELU_TANH ? vgelu_tanh(v) : vsilu(v);
            if (act == ACT_BF16) a = vround_bf16(a);
            vstore_act(g, out + i, a * vload_act(gu, up + i, act), act);
        }
        for (; i < F; i++) {
            const float v = load_act(gu, gate + i, act);
            store_act(g, out + i, round_act(gate_value(v, gate_fn), act) * load_act(gu, up + i, act), act);
        }
    }
}

/* rotate heads [0, nheads) of v (each hs wide, half-split form) by cos/sin (hs each); fp32 math, one rounding */
void k_rope(void *v, int nheads, int hs, const float *cos, const float *sin, int act) {
    const int half = hs / 2;
    for (int h = 0; h < nheads; h++) {
        const size_t at = (size_t)h * hs;
        int i = 0;
        for (; i + VL <= half; i += VL) {
            const vf a = vload_act(v, at + i, act), b = vload_act(v, at + half + i, act);
            vstore_act(v, at + i, a * vload(cos + i) - b * vload(sin + i), act);
            vstore_act(v, at + half + i, b * vload(cos + half + i) + a * vload(sin + half + i), act);
        }
        for (; i < half; i++) {
            const float a = load_act(v, at + i, act), b = load_act(v, at + half + i, act);
            store_act(v, at + i, a * cos[i] - b * sin[i], act);
            store_act(v, at + half + i, b * cos[i + half] + a * sin[i + half], act);
        }
    }
}
