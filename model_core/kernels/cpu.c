/* What this CPU can run, asked of the CPU itself (CPUID on x86, the kernel's HWCAP on Linux/aarch64), so
 * that it holds under emulators and wherever /proc/cpuinfo is missing or says little. */
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include "common.h" /* aigc_kernels.h: the CPU_* bits */

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
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        f |= CPU_AVX512VNNI;
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
