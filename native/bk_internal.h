/* Internal to the native kernels (not part of the cffi interface): the thread pool and the pieces the
 * source files share. */
#ifndef BK_INTERNAL_H
#define BK_INTERNAL_H

#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#define BK_X86 1
#define BK_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512vnni"
#endif

#define QK_I2S 128
#define QK_K 256
#define BK_MAX_THREADS 256

/* task i of n: fn(ctx, i, n) */
typedef void (*bk_task_fn)(void *ctx, int ith, int nth);

/* Run fn(ctx, i, n) for i in [0, n) and return when all are done: i = 0 on the calling thread, the others on
 * a persistent pool (started on first use, restarted after fork). Callers are serialized; a call from inside
 * a task runs its n tasks on that thread, one after another. n is clamped to [1, BK_MAX_THREADS]. */
void bk_parallel(bk_task_fn fn, void *ctx, int n);

/* the instruction set the kernels dispatch to */
enum { ISA_AUTO = -1, ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };
int bk_current_isa(void);

#endif
