/* AMX tiles (the builds compiled with -mamx-tile): a tile configuration, and Linux's leave to use the tile registers
 * (a process asks for it once: ARCH_REQ_XCOMP_PERM). */
#ifndef AIGC_KERNELS_AMX_H
#define AIGC_KERNELS_AMX_H

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* the CPU has AMX tiles and this process may use them (asked of Linux once per file that asks) */
static inline int amx_granted(void) {
    static int state; /* 0: not asked yet, 1: granted, -1: not (benign race: every thread asks the same) */
    if (!state)
        state = __builtin_cpu_supports("amx-tile") && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
                    ? 1
                    : -1;
    return state > 0;
}

#endif
