/* The exact profile's products (bitnet_ref's mathematical definition): float64 activations times ternary
 * weights read packed (TQ1_0, TQ2_0, I2_S x86) or float weights (F32, F16 read in place), float64 sums in
 * one defined order, the order bitnet_ref.exact_sum.lane_dot writes in numpy:
 *
 *   for each scale block b of g = k / nb values (nb = 1: the whole row):
 *       lane[0..8) = 0;  lane[p % 8] += w[p] * x[p] for p = 0, 1, ..., g - 1 (block positions, in order)
 *       s = ((lane0 + lane1) + (lane2 + lane3)) + ((lane4 + lane5) + (lane6 + lane7))
 *       ternary: out = out + s * scale[row][b]   (out starts at +0.0)      float: out = s
 *
 * Every product is rounded to double before it is added (no FMA contraction: -ffp-contract=off). A ternary
 * product w * x is exact (w in {-1, 0, 1}; a malformed TQ2_0 code 3 is 2, still exact), so there an FMA gives
 * the same bits and is used; a lane starts at +0.0 and so is never -0.0, hence adding a ±0 product never changes
 * it. The AVX-512, AVX2 and portable variants compute these very operations, so they agree bit for bit.
 *
 * Work split: the threads take contiguous row ranges; each walks token tiles (TT tokens), row panels (PR
 * rows) and k slices (KB values): the slice of the panel is decoded to double (exact for all these weights)
 * into a per-thread buffer, and a register-blocked micro-kernel adds it into the (row, token) lanes, which
 * live in a per-thread state buffer between slices. The weights are never unpacked beyond one slice. */
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>
#define BK_AVX2_TARGET "avx2,fma,f16c"
#endif

#define TT 32  /* tokens per tile */
#define PR 16  /* rows per panel */
#define KB 256 /* values per k slice */

enum { T_F32 = 0, T_F16 = 1, BK_I2_S = 36 }; /* ggml type ids (I2_S: bitnet.cpp's) */

/* ---------------------------------------------------------------- decoding one slice of one row to double */

static const uint8_t POW3[5] = {1, 3, 9, 27, 81};

static inline __attribute__((always_inline)) void tq2_block(const uint8_t *qs, double *dst) {
    for (int h = 0; h < 2; h++)
        for (int n = 0; n < 4; n++)
            for (int m = 0; m < 32; m++) dst[128 * h + 32 * n + m] = (double)(((qs[32 * h + m] >> (2 * n)) & 3) - 1);
}

/* TQ1_0: qs[0..32) 5 trits each (values 32n+m), qs[32..48) (160+16n+m), qh[4] 4 trits (240+4n+m) */
static inline __attribute__((always_inline)) int tq1_trit(uint8_t q, int n) {
    return (int)(((uint16_t)(uint8_t)(q * POW3[n]) * 3) >> 8);
}
static inline __attribute__((always_inline)) void tq1_block(const uint8_t *b, double *dst) {
    for (int n = 0; n < 5; n++) {
        for (int m = 0; m < 32; m++) dst[32 * n + m] = (double)(tq1_trit(b[m], n) - 1);
        for (int m = 0; m < 16; m++) dst[160 + 16 * n + m] = (double)(tq1_trit(b[32 + m], n) - 1);
    }
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) dst[240 + 4 * n + m] = (double)(tq1_trit(b[48 + m], n) - 1);
}

/* I2_S x86: 32 bytes per 128 values, value m + 32n at bits 6-2n of byte m; codes 0, 1, 2, 3 -> -1, 0, 1, 0 */
static inline __attribute__((always_inline)) void i2s_block(const uint8_t *b, double *dst) {
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 32; m++) {
            int c = (b[m] >> (6 - 2 * n)) & 3;
            dst[32 * n + m] = (double)((c == 2) - (c == 0));
        }
}

#ifdef BK_X86
/* f16 -> double (exact) for the leading multiple of 8 values; returns how many were converted */
__attribute__((target(BK_VNNI_TARGET ",f16c"))) static int f16_run_512(const uint16_t *h, int n, double *dst) {
    int j = 0;
    for (; j + 8 <= n; j += 8) _mm512_storeu_pd(dst + j, _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const void *)(h + j)))));
    return j;
}
__attribute__((target(BK_AVX2_TARGET))) static int f16_run_f16c(const uint16_t *h, int n, double *dst) {
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const void *)(h + j)));
        _mm256_storeu_pd(dst + j, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
        _mm256_storeu_pd(dst + j + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    }
    return j;
}
#endif

typedef struct {
    int type;
    const double *x;
    int64_t t, k;
    const uint8_t *w;
    int64_t r;
    const float *scale;
    int64_t scale_rows, nb;
    double *out;
    int nth;
    int isa;
    int fail;
    int direct; /* 1: one token on AVX-512, through direct512 */
} exact_ctx;

/* values [k0, k0 + n) of row `row` as double into dst; n <= KB, k0 a multiple of KB */
static inline __attribute__((always_inline)) void decode_slice(const exact_ctx *c, int64_t row, int64_t k0, int n,
                                                               double *dst, int isa) {
    int64_t k = c->k;
    switch (c->type) {
    case BK_TQ2_0: tq2_block(c->w + (row * (k / QK_K) + k0 / QK_K) * 66, dst); break;
    case BK_TQ1_0: tq1_block(c->w + (row * (k / QK_K) + k0 / QK_K) * 54, dst); break;
    case BK_I2_S: {
        const uint8_t *p = c->w + (row * k + k0) / 4;
        for (int j = 0; j < n; j += QK_I2S) i2s_block(p + j / 4, dst + j);
        break;
    }
    case T_F32: {
        const float *f = (const float *)(const void *)(c->w + 4 * (row * k + k0));
        for (int j = 0; j < n; j++) dst[j] = (double)f[j];
        break;
    }
    default: { /* T_F16 */
        const uint16_t *h = (const uint16_t *)(const void *)(c->w + 2 * (row * k + k0));
        int j = 0;
#ifdef BK_X86
        if (isa == ISA_VNNI) j = f16_run_512(h, n, dst);
        if (isa == ISA_AVX2) j = f16_run_f16c(h, n, dst);
#endif
        (void)isa;
        for (; j < n; j++) dst[j] = (double)bk_f16_bits_to_f32(h[j]);
    }
    }
}

/* ---------------------------------------------------------------- micro-kernels
 * st: the lanes of (row i, token j) at st[(i * TT + j) * 8 + l]; w: nr rows of the decoded slice (stride KB);
 * x: nt tokens (stride k) at the slice's start; n values. */

static void micro_portable(const double *w, int nr, const double *x, int64_t xs, int nt, int n, double *st) {
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < nt; j++) {
            double *a = st + (i * TT + j) * 8;
            const double *wr = w + i * KB;
            const double *xr = x + j * xs;
            for (int p = 0; p < n; p++) {
                double prod = wr[p] * xr[p];
                a[p % 8] += prod;
            }
        }
}

#ifdef BK_X86
/* 4 rows x NT tokens of 8-lane zmm accumulators */
static inline __attribute__((always_inline, target(BK_VNNI_TARGET))) void micro512_n(
    const double *w, const double *x, int64_t xs, int n, double *st, int fused, const int NT) {
    __m512d acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NT; j++) acc[i][j] = _mm512_loadu_pd(st + (i * TT + j) * 8);
    for (int p = 0; p < n; p += 8) {
        __mmask8 m = n - p >= 8 ? 0xff : (__mmask8)((1u << (n - p)) - 1);
        __m512d wv[4], xv[4];
        for (int i = 0; i < 4; i++) wv[i] = _mm512_maskz_loadu_pd(m, w + i * KB + p);
        for (int j = 0; j < NT; j++) xv[j] = _mm512_maskz_loadu_pd(m, x + j * xs + p);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < NT; j++)
                acc[i][j] = fused ? _mm512_fmadd_pd(wv[i], xv[j], acc[i][j])
                                  : _mm512_add_pd(acc[i][j], _mm512_mul_pd(wv[i], xv[j]));
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NT; j++) _mm512_storeu_pd(st + (i * TT + j) * 8, acc[i][j]);
}

__attribute__((target(BK_VNNI_TARGET))) static void micro512(const double *w, const double *x, int64_t xs, int nt,
                                                             int n, double *st, int fused) {
    for (int j = 0; j < nt; j += 4) {
        int m = nt - j < 4 ? nt - j : 4;
        const double *xj = x + j * xs;
        double *sj = st + j * 8;
        if (fused) {
            switch (m) {
            case 4: micro512_n(w, xj, xs, n, sj, 1, 4); break;
            case 3: micro512_n(w, xj, xs, n, sj, 1, 3); break;
            case 2: micro512_n(w, xj, xs, n, sj, 1, 2); break;
            default: micro512_n(w, xj, xs, n, sj, 1, 1);
            }
        } else {
            switch (m) {
            case 4: micro512_n(w, xj, xs, n, sj, 0, 4); break;
            case 3: micro512_n(w, xj, xs, n, sj, 0, 3); break;
            case 2: micro512_n(w, xj, xs, n, sj, 0, 2); break;
            default: micro512_n(w, xj, xs, n, sj, 0, 1);
            }
        }
    }
}

/* AVX2: 1 row x NT tokens, each 8 lanes as two ymm (lanes 0-3, 4-7); n a multiple of 8 (the tail goes portable) */
static inline __attribute__((always_inline, target(BK_AVX2_TARGET))) void micro256_n(
    const double *w, const double *x, int64_t xs, int n, double *st, int fused, const int NT) {
    __m256d lo[4], hi[4];
    for (int j = 0; j < NT; j++) {
        lo[j] = _mm256_loadu_pd(st + j * 8);
        hi[j] = _mm256_loadu_pd(st + j * 8 + 4);
    }
    for (int p = 0; p < n; p += 8) {
        __m256d wl = _mm256_loadu_pd(w + p), wh = _mm256_loadu_pd(w + p + 4);
        for (int j = 0; j < NT; j++) {
            __m256d xl = _mm256_loadu_pd(x + j * xs + p), xh = _mm256_loadu_pd(x + j * xs + p + 4);
            if (fused) {
                lo[j] = _mm256_fmadd_pd(wl, xl, lo[j]);
                hi[j] = _mm256_fmadd_pd(wh, xh, hi[j]);
            } else {
                lo[j] = _mm256_add_pd(lo[j], _mm256_mul_pd(wl, xl));
                hi[j] = _mm256_add_pd(hi[j], _mm256_mul_pd(wh, xh));
            }
        }
    }
    for (int j = 0; j < NT; j++) {
        _mm256_storeu_pd(st + j * 8, lo[j]);
        _mm256_storeu_pd(st + j * 8 + 4, hi[j]);
    }
}

__attribute__((target(BK_AVX2_TARGET))) static void micro256(const double *w, const double *x, int64_t xs, int nt,
                                                             int n, double *st, int fused) {
    int n8 = n & ~7;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < nt; j += 4) {
            int m = nt - j < 4 ? nt - j : 4;
            const double *wi = w + i * KB;
            const double *xj = x + j * xs;
            double *s = st + (i * TT + j) * 8;
            if (fused) {
                switch (m) {
                case 4: micro256_n(wi, xj, xs, n8, s, 1, 4); break;
                case 3: micro256_n(wi, xj, xs, n8, s, 1, 3); break;
                case 2: micro256_n(wi, xj, xs, n8, s, 1, 2); break;
                default: micro256_n(wi, xj, xs, n8, s, 1, 1);
                }
            } else {
                switch (m) {
                case 4: micro256_n(wi, xj, xs, n8, s, 0, 4); break;
                case 3: micro256_n(wi, xj, xs, n8, s, 0, 3); break;
                case 2: micro256_n(wi, xj, xs, n8, s, 0, 2); break;
                default: micro256_n(wi, xj, xs, n8, s, 0, 1);
                }
            }
        }
    if (n8 < n) /* lanes 0 .. n - n8 - 1 of the last partial group */
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < nt; j++) {
                double *a = st + (i * TT + j) * 8;
                for (int p = n8; p < n; p++) {
                    double prod = w[i * KB + p] * x[j * xs + p];
                    a[p - n8] += prod;
                }
            }
}
#endif

#ifdef BK_X86
/* ---------------------------------------------------------------- one token on AVX-512, no panel
 * Ternary: the 2-bit codes of 4 rows' block are decoded to bytes, and each 8 of them to 8 doubles by a table
 * lookup (vpermpd), then FMA'd into the row's 8 lanes (the product is exact: the same bits as acc + w * x).
 * Float rows: converted to double, multiplied, added. */

/* the codes of block `k0` (QK_K values for TQ, QK_I2S for I2_S) of `row`; returns the block's length */
static inline __attribute__((always_inline)) int block_codes(const exact_ctx *c, int64_t row, int64_t k0,
                                                              uint8_t *dst) {
    int64_t k = c->k;
    if (c->type == BK_TQ2_0) {
        const uint8_t *qs = c->w + (row * (k / QK_K) + k0 / QK_K) * 66;
        for (int h = 0; h < 2; h++)
            for (int n = 0; n < 4; n++)
                for (int m = 0; m < 32; m++) dst[128 * h + 32 * n + m] = (qs[32 * h + m] >> (2 * n)) & 3;
        return QK_K;
    }
    if (c->type == BK_TQ1_0) {
        const uint8_t *b = c->w + (row * (k / QK_K) + k0 / QK_K) * 54;
        for (int n = 0; n < 5; n++) {
            for (int m = 0; m < 32; m++) dst[32 * n + m] = (uint8_t)tq1_trit(b[m], n);
            for (int m = 0; m < 16; m++) dst[160 + 16 * n + m] = (uint8_t)tq1_trit(b[32 + m], n);
        }
        for (int n = 0; n < 4; n++)
            for (int m = 0; m < 4; m++) dst[240 + 4 * n + m] = (uint8_t)tq1_trit(b[48 + m], n);
        return QK_K;
    }
    const uint8_t *b = c->w + (row * k + k0) / 4; /* I2_S: code 3 is 0, neither mask below */
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 32; m++) dst[32 * n + m] = (b[m] >> (6 - 2 * n)) & 3;
    return QK_I2S;
}

__attribute__((target(BK_VNNI_TARGET ",f16c"))) static void direct512(exact_ctx *c, int64_t r0, int64_t r1) {
    const int64_t k = c->k, g = k / c->nb;
    const double *x = c->x;
    /* code -> value: TQ 0, 1, 2, 3 -> -1, 0, 1, 2 (3 only in a malformed TQ2_0 block), I2_S 3 -> 0; the product
     * value * x is exact, so the FMA rounds once, as the defined acc + w * x does */
    const __m512d lut = c->type == BK_I2_S ? _mm512_setr_pd(-1, 0, 1, 0, 0, 0, 0, 0)
                                            : _mm512_setr_pd(-1, 0, 1, 2, 0, 0, 0, 0);
    const int ternary = c->type != T_F32 && c->type != T_F16;
    uint8_t codes[4][QK_K] __attribute__((aligned(64)));
    for (int64_t row = r0; row < r1; row += 4) {
        int nr = r1 - row < 4 ? (int)(r1 - row) : 4;
        int64_t rr[4]; /* the 4 rows computed; past the end, the last one again (its results are dropped) */
        for (int i = 0; i < 4; i++) rr[i] = row + (i < nr ? i : nr - 1);
        __m512d acc[4];
        double out[4] = {0.0, 0.0, 0.0, 0.0};
        if (!ternary) {
            for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_pd();
            for (int64_t p = 0; p < k; p += 8) {
                __mmask8 m = k - p >= 8 ? 0xff : (__mmask8)((1u << (k - p)) - 1);
                __m512d xv = _mm512_maskz_loadu_pd(m, x + p);
                for (int i = 0; i < 4; i++) {
                    __m512d wv;
                    if (c->type == T_F16)
                        wv = _mm512_cvtps_pd(_mm256_cvtph_ps(
                            _mm_maskz_loadu_epi16(m, (const uint16_t *)(const void *)c->w + rr[i] * k + p)));
                    else
                        wv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, (const float *)(const void *)c->w + rr[i] * k + p));
                    acc[i] = _mm512_add_pd(acc[i], _mm512_mul_pd(wv, xv));
                }
            }
            for (int i = 0; i < nr; i++) {
                double a[8];
                _mm512_storeu_pd(a, acc[i]);
                c->out[row + i] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            }
            continue;
        }
        for (int64_t k0 = 0; k0 < k;) {
            int n = 0;
            for (int i = 0; i < 4; i++) n = block_codes(c, rr[i], k0, codes[i]);
            if (k0 % g == 0)
                for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_pd();
            for (int p = 0; p < n; p += 8) {
                __m512d xv = _mm512_loadu_pd(x + k0 + p);
                for (int i = 0; i < 4; i++) {
                    __m512i cv = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i *)(codes[i] + p)));
                    acc[i] = _mm512_fmadd_pd(_mm512_permutexvar_pd(cv, lut), xv, acc[i]);
                }
            }
            k0 += n;
            if (k0 % g == 0) { /* the end of a scale block */
                int64_t b = k0 / g - 1;
                for (int i = 0; i < nr; i++) {
                    double a[8];
                    _mm512_storeu_pd(a, acc[i]);
                    double s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                    int64_t srow = c->scale_rows == 1 ? 0 : row + i;
                    double prod = s * (double)c->scale[srow * c->nb + b];
                    out[i] = out[i] + prod;
                }
            }
        }
        for (int i = 0; i < nr; i++) c->out[row + i] = out[i];
    }
}
#endif

/* ---------------------------------------------------------------- the driver */

/* the whole task, inlined into one wrapper per ISA so that decoding is vectorized for it */
static inline __attribute__((always_inline)) void exact_body(exact_ctx *c, int ith, int nth) {
    int64_t k = c->k, r = c->r, g = k / c->nb;
    int ternary = c->type != T_F32 && c->type != T_F16;
    int isa = c->isa;
    /* rows in multiples of 4 per thread */
    int64_t quads = (r + 3) / 4, q0 = quads * ith / nth, q1 = quads * (ith + 1) / nth;
    int64_t r0 = q0 * 4, r1 = q1 * 4 < r ? q1 * 4 : r;
    if (r0 >= r1) return;
    size_t wbytes = (size_t)PR * KB * sizeof(double), sbytes = (size_t)PR * TT * 8 * sizeof(double);
    size_t obytes = (size_t)PR * TT * sizeof(double);
    char *buf = bk_scratch(BK_SCRATCH_GEMM, wbytes + sbytes + obytes);
    if (!buf) {
        c->fail = 1;
        return;
    }
    double *wb = (double *)(void *)buf;
    double *st = (double *)(void *)(buf + wbytes);
    double *ob = (double *)(void *)(buf + wbytes + sbytes); /* the panel's outputs, (row, token), till its end */
    for (int64_t t0 = 0; t0 < c->t; t0 += TT) {
        int nt = c->t - t0 < TT ? (int)(c->t - t0) : TT;
        for (int64_t p0 = r0; p0 < r1; p0 += PR) {
            int np = r1 - p0 < PR ? (int)(r1 - p0) : PR;
            int npad = (np + 3) & ~3;
            for (int64_t k0 = 0; k0 < k; k0 += KB) {
                int n = k - k0 < KB ? (int)(k - k0) : KB;
                if (k0 % g == 0)
                    for (int i = 0; i < npad; i++) memset(st + i * TT * 8, 0, (size_t)nt * 8 * sizeof(double));
                for (int i = 0; i < np; i++) decode_slice(c, p0 + i, k0, n, wb + i * KB, isa);
                for (int i = np; i < npad; i++) memset(wb + i * KB, 0, (size_t)n * sizeof(double)); /* unused rows */
                const double *x = c->x + t0 * k + k0;
                for (int i = 0; i < npad; i += 4) {
#ifdef BK_X86
                    if (isa == ISA_VNNI) {
                        micro512(wb + i * KB, x, k, nt, n, st + i * TT * 8, ternary);
                        continue;
                    }
                    if (isa == ISA_AVX2) {
                        micro256(wb + i * KB, x, k, nt, n, st + i * TT * 8, ternary);
                        continue;
                    }
#endif
                    micro_portable(wb + i * KB, 4, x, k, nt, n, st + i * TT * 8);
                }
                if ((k0 + n) % g == 0 || k0 + n == k) { /* the end of a scale block: fold the lanes */
                    int64_t b = k0 / g;
                    for (int i = 0; i < np; i++)
                        for (int j = 0; j < nt; j++) {
                            const double *a = st + (i * TT + j) * 8;
                            double s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                            double *o = ob + i * TT + j;
                            if (ternary) {
                                int64_t srow = c->scale_rows == 1 ? 0 : p0 + i;
                                double prod = s * (double)c->scale[srow * c->nb + b];
                                *o = (b == 0 ? 0.0 : *o) + prod;
                            } else {
                                *o = s;
                            }
                        }
                }
            }
            for (int j = 0; j < nt; j++)
                for (int i = 0; i < np; i++) c->out[(t0 + j) * r + p0 + i] = ob[i * TT + j];
        }
    }
}

static void exact_task_portable(void *arg, int ith, int nth) { exact_body(arg, ith, nth); }
#ifdef BK_X86
__attribute__((target(BK_AVX2_TARGET))) static void exact_task_avx2(void *arg, int ith, int nth) {
    exact_body(arg, ith, nth);
}
__attribute__((target(BK_VNNI_TARGET))) static void exact_task_512(void *arg, int ith, int nth) {
    exact_ctx *c = arg;
    if (c->direct) {
        int64_t quads = (c->r + 3) / 4, r0 = quads * ith / nth * 4, r1 = quads * (ith + 1) / nth * 4;
        if (r1 > c->r) r1 = c->r;
        if (r0 < r1) direct512(c, r0, r1);
        return;
    }
    exact_body(arg, ith, nth);
}
#endif

int bk_exact_matmul(int type, const double *x, int64_t t, int64_t k, const uint8_t *w, int64_t r,
                    const float *scale, int64_t scale_rows, int64_t nb, double *out, int nthreads) {
    if (t < 0 || k < 1 || r < 0) return BK_EBADARG;
    int ternary = type == BK_TQ1_0 || type == BK_TQ2_0 || type == BK_I2_S;
    if (!ternary && type != T_F32 && type != T_F16) return BK_EBADARG;
    if (ternary) {
        if (!scale || nb < 1 || k % nb || (scale_rows != 1 && scale_rows != r)) return BK_EBADARG;
        if (type == BK_I2_S ? (k % QK_I2S != 0) : (k % QK_K != 0)) return BK_EBADK;
        if (type != BK_I2_S && nb != k / QK_K) return BK_EBADARG; /* one scale per 256-value block */
        if (type == BK_I2_S && nb != 1) return BK_EBADARG;        /* one scale per tensor */
    } else {
        nb = 1;
    }
    if (t == 0 || r == 0) return 0;
    exact_ctx c = {type, x, t, k, w, r, scale, scale_rows, nb, out, 0, bk_current_isa(), 0, 0};
    c.direct = t == 1 && c.isa == ISA_VNNI;
#ifdef BK_X86
    if (c.isa == ISA_AVX2 && !(__builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) c.isa = ISA_PORTABLE;
#endif
    int nth = nthreads < 1 ? 1 : nthreads;
    if (nth > (r + 3) / 4) nth = (int)((r + 3) / 4);
    c.nth = nth;
    bk_task_fn fn = exact_task_portable;
#ifdef BK_X86
    if (c.isa == ISA_VNNI) fn = exact_task_512;
    if (c.isa == ISA_AVX2) fn = exact_task_avx2;
#endif
    bk_parallel(fn, &c, nth);
    return c.fail ? BK_ENOMEM : 0;
}
