/* The AArch64 NEON variants of the kernels (ISA "neon"), chosen at run time by bitnet_kernels.c's dispatch.
 *
 * Integer sums are exact in any order. The float bodies keep the portable code's float32 lanes and order
 * (BK_VEC_DOT_F16_BODY, BK_GEMM_F16_BODY, reduce16 in bitnet_kernels.c): a float32x4_t holds lanes 4i..4i+3
 * of the same recurrences, so each lane sees the same roundings. On other targets this file is empty. */
#include "bk_internal.h"

#ifdef BK_NEON
#include <arm_neon.h>
#include <string.h>

#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20) /* older libc headers */
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

/* SDOT needs armv8.2-a's dotprod extension: compiled for it here, called only when the CPU has it. GCC's
 * arm_neon.h declares vdotq_s32 under its own target pragma (so a function of that target can inline it);
 * clang's (14, at least) only when the whole build targets dotprod, hence the assembler form there. */
#if defined(__ARM_FEATURE_DOTPROD)
#define BK_DOTPROD_ATTR
#define bk_sdot vdotq_s32
#elif defined(__clang__)
#define BK_DOTPROD_ATTR __attribute__((target("dotprod")))
BK_DOTPROD_ATTR static inline int32x4_t bk_sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
    __asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
}
#else
#define BK_DOTPROD_ATTR __attribute__((target("arch=armv8.2-a+dotprod")))
#define bk_sdot vdotq_s32
#endif

int bk_neon_has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    int v = 0;
    size_t n = sizeof v;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, NULL, 0) == 0 && v;
#elif defined(__ARM_FEATURE_DOTPROD)
    return 1; /* the build already assumes it */
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- I2_S row dots
 * A block is 32 packed bytes for 128 values: byte j holds the codes of values j, j+32, j+64, j+96 in bits
 * 7-6, 5-4, 3-2, 1-0. The codes 0..3 are taken as int8 (exact) and multiplied with q. */

int32_t bk_i2s_dot_neon(const uint8_t *w, const int8_t *q, int64_t nb) {
    const uint8x16_t mask = vdupq_n_u8(3);
    int32x4_t acc = vdupq_n_s32(0);
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        /* a product is in [-384, 381]; each int16 lane takes 8 per block, so 8 blocks stay below 2^15 */
        int16x8_t s0 = vdupq_n_s16(0), s1 = s0;
        int64_t b1 = b0 + 8 < nb ? b0 + 8 : nb;
        for (int64_t b = b0; b < b1; b++) {
            const uint8_t *wb = w + 32 * b;
            const int8_t *qb = q + QK_I2S * b;
            for (int h = 0; h < 32; h += 16) {
                uint8x16_t p = vld1q_u8(wb + h);
                int8x16_t c0 = vreinterpretq_s8_u8(vshrq_n_u8(p, 6));
                int8x16_t c1 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 4), mask));
                int8x16_t c2 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 2), mask));
                int8x16_t c3 = vreinterpretq_s8_u8(vandq_u8(p, mask));
                int8x16_t q0 = vld1q_s8(qb + h), q1 = vld1q_s8(qb + 32 + h);
                int8x16_t q2 = vld1q_s8(qb + 64 + h), q3 = vld1q_s8(qb + 96 + h);
                s0 = vmlal_s8(s0, vget_low_s8(c0), vget_low_s8(q0));
                s1 = vmlal_high_s8(s1, c0, q0);
                s0 = vmlal_s8(s0, vget_low_s8(c1), vget_low_s8(q1));
                s1 = vmlal_high_s8(s1, c1, q1);
                s0 = vmlal_s8(s0, vget_low_s8(c2), vget_low_s8(q2));
                s1 = vmlal_high_s8(s1, c2, q2);
                s0 = vmlal_s8(s0, vget_low_s8(c3), vget_low_s8(q3));
                s1 = vmlal_high_s8(s1, c3, q3);
            }
        }
        acc = vpadalq_s16(vpadalq_s16(acc, s0), s1); /* widen before it can wrap */
    }
    return vaddvq_s32(acc);
}

BK_DOTPROD_ATTR int32_t bk_i2s_dot_neon_dp(const uint8_t *w, const int8_t *q, int64_t nb) {
    const uint8x16_t mask = vdupq_n_u8(3);
    int32x4_t a0 = vdupq_n_s32(0), a1 = a0; /* two chains: SDOT's latency */
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + 32 * b;
        const int8_t *qb = q + QK_I2S * b;
        for (int h = 0; h < 32; h += 16) {
            uint8x16_t p = vld1q_u8(wb + h);
            a0 = bk_sdot(a0, vreinterpretq_s8_u8(vshrq_n_u8(p, 6)), vld1q_s8(qb + h));
            a1 = bk_sdot(a1, vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 4), mask)), vld1q_s8(qb + 32 + h));
            a0 = bk_sdot(a0, vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(p, 2), mask)), vld1q_s8(qb + 64 + h));
            a1 = bk_sdot(a1, vreinterpretq_s8_u8(vandq_u8(p, mask)), vld1q_s8(qb + 96 + h));
        }
    }
    return vaddvq_s32(vaddq_s32(a0, a1));
}

/* ---------------------------------------------------------------- F16 rows */

/* 8 f16 (little-endian bytes, any alignment) -> 8 float32, exact. FCVT quiets a signaling NaN; the portable
 * conversion keeps it signaling, so put its quiet bit back to zero. */
static inline void f16x8_to_f32(const uint8_t *src, float *dst) {
    uint16x8_t h = vreinterpretq_u16_u8(vld1q_u8(src));
    float16x8_t f = vreinterpretq_f16_u16(h);
    uint32x4_t lo = vreinterpretq_u32_f32(vcvt_f32_f16(vget_low_f16(f)));
    uint32x4_t hi = vreinterpretq_u32_f32(vcvt_high_f32_f16(f));
    uint16x8_t snan = vandq_u16(vceqq_u16(vandq_u16(h, vdupq_n_u16(0x7e00)), vdupq_n_u16(0x7c00)),
                                vtstq_u16(h, vdupq_n_u16(0x01ff)));
    if (vmaxvq_u16(snan)) {
        const uint32x4_t quiet = vdupq_n_u32(0x00400000u);
        lo = veorq_u32(lo, vandq_u32(vreinterpretq_u32_s32(vmovl_s16(vreinterpret_s16_u16(vget_low_u16(snan)))), quiet));
        hi = veorq_u32(hi, vandq_u32(vreinterpretq_u32_s32(vmovl_high_s16(vreinterpretq_s16_u16(snan))), quiet));
    }
    vst1q_f32(dst, vreinterpretq_f32_u32(lo));
    vst1q_f32(dst + 4, vreinterpretq_f32_u32(hi));
}

void bk_f16_row_neon(const uint8_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) f16x8_to_f32(src + 2 * i, dst + i);
    if (i < n) { /* the tail through a zero-padded copy: no read past the row */
        uint8_t buf[16] = {0};
        float f[8];
        memcpy(buf, src + 2 * i, (size_t)(2 * (n - i)));
        f16x8_to_f32(buf, f);
        memcpy(dst + i, f, sizeof(float) * (size_t)(n - i));
    }
}

/* reduce16 (_mm512_reduce_add_ps) on lanes v[0] = 0..3, v[1] = 4..7, v[2] = 8..11, v[3] = 12..15:
 * a = s[8..16) + s[0..8), b = a[4..8) + a[0..4), then (b0 + b2) + (b1 + b3) */
static inline float reduce16_neon(float32x4_t v0, float32x4_t v1, float32x4_t v2, float32x4_t v3) {
    float32x4_t b = vaddq_f32(vaddq_f32(v3, v1), vaddq_f32(v2, v0));
    float32x2_t d = vadd_f32(vget_low_f32(b), vget_high_f32(b));
    return vget_lane_f32(d, 0) + vget_lane_f32(d, 1);
}

/* BK_VEC_DOT_F16_BODY: float32 lanes l = 0..63 as 16 vectors, acc = acc + x*w (no fusion, as the portable
 * build), lanes combined (a0+a2)+(a1+a3), reduce16, the tail added in double */
float bk_vec_dot_f16_neon(const float *x, const float *w, int64_t k) {
    float32x4_t a[16];
    for (int i = 0; i < 16; i++) a[i] = vdupq_n_f32(0.0f);
    int64_t body = k & ~(int64_t)63;
    for (int64_t c = 0; c < body; c += 64) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) a[i] = vaddq_f32(a[i], vmulq_f32(vld1q_f32(x + c + 4 * i), vld1q_f32(w + c + 4 * i)));
    }
    float32x4_t s[4];
    for (int i = 0; i < 4; i++) s[i] = vaddq_f32(vaddq_f32(a[i], a[8 + i]), vaddq_f32(a[4 + i], a[12 + i]));
    double r = (double)reduce16_neon(s[0], s[1], s[2], s[3]);
    for (int64_t i = body; i < k; i++) r = r + (double)x[i] * (double)w[i];
    return (float)r;
}

/* BK_GEMM_F16_BODY: acc = fmaf(x, w, acc) per lane, as FMLA (fused, one rounding) */
float bk_gemm_f16_neon(const float *x, const float *w, int64_t k) {
    float32x4_t a[4];
    for (int i = 0; i < 4; i++) a[i] = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < k; c += 16) {
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) a[i] = vfmaq_f32(a[i], vld1q_f32(x + c + 4 * i), vld1q_f32(w + c + 4 * i));
    }
    return reduce16_neon(a[0], a[1], a[2], a[3]);
}

/* BK_GEMM_NU tokens, 4 at a time (each token's chain is independent, so grouping changes no rounding):
 * 16 accumulators and the row's 16 values fit the 32 vector registers */
_Static_assert(BK_GEMM_NU % 4 == 0, "bk_gemmn_f16_neon takes tokens in fours");
void bk_gemmn_f16_neon(const float *x, int64_t xs, const float *w, int64_t k, float *out) {
    for (int u0 = 0; u0 < BK_GEMM_NU; u0 += 4) {
        float32x4_t a[4][4];
        for (int u = 0; u < 4; u++)
            for (int i = 0; i < 4; i++) a[u][i] = vdupq_n_f32(0.0f);
        for (int64_t c = 0; c < k; c += 16) {
            float32x4_t wv[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) wv[i] = vld1q_f32(w + c + 4 * i);
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                const float *xu = x + (u0 + u) * xs + c;
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) a[u][i] = vfmaq_f32(a[u][i], vld1q_f32(xu + 4 * i), wv[i]);
            }
        }
        for (int u = 0; u < 4; u++) out[u0 + u] = reduce16_neon(a[u][0], a[u][1], a[u][2], a[u][3]);
    }
}

#else
typedef int bk_neon_unused; /* ISO C wants a non-empty translation unit */
#endif
