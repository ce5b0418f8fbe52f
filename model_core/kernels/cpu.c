/* What this CPU can run, asked of the CPU itself (CPUID on x86, the kernel's HWCAP on Linux/aarch64), so
 * that it holds under emulators and wherever /proc/cpuinfo is missing or says little. */
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

enum {
    CPU_AVX2 = 1 << 0,       /* avx2 + fma + f16c */
    CPU_AVX512BF16 = 1 << 1, /* avx512f + bw + vl + bf16 (OS saves the state) */
    CPU_NEON = 1 << 2,       /* aarch64 Advanced SIMD */
    CPU_NEON_DOTPROD = 1 << 3,
    CPU_AMX_BF16 = 1 << 4, /* AMX tiles with bf16 (the matmul units oneDNN's bf16 matmuls run fast on) */
    CPU_AVX512F = 1 << 5,  /* AVX-512 foundation (what the BLAS's fp32 matmuls use where present) */
};

int aigc_cpu_features(void) {
    int f = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= CPU_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bf16"))
        f |= CPU_AVX512BF16;
    if (__builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile")) f |= CPU_AMX_BF16;
    if (__builtin_cpu_supports("avx512f")) f |= CPU_AVX512F;
#elif defined(__aarch64__)
    f |= CPU_NEON; /* baseline on aarch64 */
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & (1UL << 20)) f |= CPU_NEON_DOTPROD; /* HWCAP_ASIMDDP */
#elif defined(__ARM_FEATURE_DOTPROD)
    f |= CPU_NEON_DOTPROD;
#endif
#endif
    return f;
}
