/* Internal to the native kernels (not part of the cffi interface): the thread pool and the pieces the
 * source files share. */
#ifndef BK_INTERNAL_H
#define BK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#define BK_X86 1
#define BK_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512vnni"
#endif
#if defined(__aarch64__)
#define BK_NEON 1 /* Advanced SIMD is part of every AArch64 CPU: no run-time check for the base set */
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

/* A grow-only buffer of at least `bytes` bytes (64-byte aligned) of the calling thread's slot, kept across calls so
 * that large per-call buffers do not pay their page faults every time; NULL if it cannot grow. Its contents are
 * undefined, and the next request for the same slot on the same thread may move it. Slots: */
enum { BK_SCRATCH_LAYER, BK_SCRATCH_GEMM, BK_SCRATCH_ATTENTION, BK_SCRATCH_SLOTS };
void *bk_scratch(int slot, size_t bytes);

/* the instruction set the kernels dispatch to */
enum { ISA_AUTO = -1, ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_VNNI = 2, ISA_NEON = 3 };
int bk_current_isa(void);

#ifdef BK_X86
/* bk_i2s_gemm.c: bk_i2s_raw for many tokens as a GEMM (32-row panels x 12-token tiles of zmm accumulators);
 * only when bk_current_isa() == ISA_VNNI. The same int32 sums; BK_ENOMEM if its buffers (t*k bytes of
 * repacked tokens, 8*k + 1 KiB a thread) cannot be allocated. */
int bk_i2s_gemm_vnni(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                     int nthreads);
#endif

/* bitnet_kernels.c: bk_i2s_raw for n <= BK_I2S_MANY matrices (w[m]: r[m] rows of k) on the same activations,
 * their rows handed out in one parallel region (a decoded token's Q, K, V, or gate and up: one wake-up of the
 * pool instead of n); the same int32 sums, out[m] as bk_i2s_raw's out. Many tokens (the GEMM) and small
 * products run one call each. */
#define BK_I2S_MANY 4
int bk_i2s_raw_many(const int8_t *q, int64_t t, int64_t k, int n, const uint8_t *const *w, const int64_t *r,
                    int32_t *const *out, int nthreads);

/* tokens per call of the F16 GEMM's multi-token dot (f16_dotn_fn) */
#define BK_GEMM_NU 8

#ifdef BK_NEON
/* bk_neon.c: the NEON variants, bit for bit the portable ones (same float32 lanes and order) */
int bk_neon_has_dotprod(void); /* the CPU has SDOT (HWCAP_ASIMDDP) */
int32_t bk_i2s_dot_neon(const uint8_t *w, const int8_t *q, int64_t nb);    /* SMLAL, any AArch64 */
int32_t bk_i2s_dot_neon_dp(const uint8_t *w, const int8_t *q, int64_t nb); /* SDOT: only if bk_neon_has_dotprod() */
void bk_f16_row_neon(const uint8_t *src, float *dst, int64_t n);
float bk_vec_dot_f16_neon(const float *x, const float *w, int64_t k);
float bk_gemm_f16_neon(const float *x, const float *w, int64_t k);
void bk_gemmn_f16_neon(const float *x, int64_t xs, const float *w, int64_t k, float *out);
#endif

/* gate = gate / (1 + expf(-gate)) * up, float32 step by step with ggml's vector expf (ggml_vec_swiglu_f32;
 * bk_attention.c, where that expf lives) */
void bk_silu_mul(float *gate, const float *up, int64_t n);

/* float32 -> f16 bits, round to nearest even (bk_layer.c) */
uint16_t bk_f32_to_f16_bits(float f);
/* f16 bits -> float32, exact; a NaN keeps its payload, as vcvtph2ps does (bitnet_kernels.c) */
float bk_f16_bits_to_f32(uint16_t h);

/* shared with the llama-cpp profile's layer (bk_ggml_layer.c, bk_attention_f32.c): */
/* bk_layer.c: ggml's rms_norm times the gain, NeoX RoPE (fma form), relu(gate)^2 * up, row-parallel work */
void bk_rms_norm(const float *x, int64_t t, int64_t n, const float *gain, float eps, float *y, int nthreads);
void bk_rope(float *x, int64_t t, int64_t heads, int64_t d, const float *cs, const float *sn, int nthreads);
void bk_relu2_mul(float *gate, const float *up, int64_t n);
void bk_for_rows(void (*fn)(void *ctx, int64_t i0, int64_t i1), void *ctx, int64_t t, int nthreads);
/* bk_attention.c: ggml's soft_max of one score row w[0, ns) in place, keys nvis.. masked (ns a multiple of 16) */
void bk_softmax_ggml(float *w, int64_t nvis, int64_t ns);
/* bitnet_kernels.c: the 256 codes (value + 1) of one TQ1_0 / TQ2_0 block, in value order */
void bk_tq_codes(int type, const uint8_t *blk, uint8_t *c);

#endif
