/* The exact profile's products (bitnet_ref's mathematical definition): float64 activations times ternary
 * weights read packed (TQ1_0, TQ2_0, I2_S x86) or float weights (F32, F16 read in place), float64 sums in
 * the order bitnet_ref/exact_sum.py defines (its docstring states it; this file computes the same bits):
 *
 *   ternary, per scale block b of g = k / nb values:  s = +0.0;  for each 128-value chunk c and m = 0..31:
 *       s = s + ((v0 + v1) + (v2 + v3)),  v_n = w[p_n] * x[p_n],  p_n = 128 c + m + 32 n
 *   out = out + s * scale[row][b]   (out starts at +0.0)
 *   float rows: lane[p % 8] += w[p] * x[p] in order, out = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
 *
 * Every product is rounded to double before it is added (-ffp-contract=off).
 *
 * Ternary: a group's sum depends on x and on its 4 weights only (81 combinations), so for each k chunk of 256
 * values a thread computes the 81 sums of every group for a tile of tokens (a table, the same expression as
 * above) and then adds one table entry per group, row and token: a quarter of the additions of a product-by-
 * product sum, with the same bits. The group's 4 values are the 4 codes of one TQ2_0 or I2_S byte, so its table
 * index comes from that byte. The loops over the tile's tokens are plain C that the compiler vectorizes for each
 * ISA (no reassociation: every token's sum is its own), so the variants agree bit for bit.
 *
 * Float rows: the threads take contiguous row ranges; each walks token tiles, row panels and k slices: the
 * slice of the panel is converted to double into a per-thread buffer, and a register-blocked micro-kernel adds
 * it into the (row, token) lanes. One token on AVX-512 reads the rows directly. */
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>
#define BK_AVX2_TARGET "avx2,fma,f16c"
#endif

enum { T_F32 = 0, T_F16 = 1, BK_I2_S = 36 }; /* ggml type ids (I2_S: bitnet.cpp's) */

typedef struct {
    int type;
    const double *x;
    int64_t t, k;
    const uint8_t *w;
    int64_t r;
    const float *scale;
    int64_t scale_rows, nb;
    double *out;
    int isa;
    int fail;
} exact_ctx;

/* rows [r0, r1) of task ith of nth, in multiples of `mult` */
static void row_range(int64_t r, int mult, int ith, int nth, int64_t *r0, int64_t *r1) {
    int64_t units = (r + mult - 1) / mult;
    *r0 = units * ith / nth * mult;
    *r1 = units * (ith + 1) / nth * mult;
    if (*r1 > r) *r1 = r;
}

/* ================================================================ ternary weights: group tables */

#define CH 256       /* values per k chunk: one table, one TQ block */
#define NG (CH / 4)  /* groups per chunk */
#define NIDX 81      /* weight combinations of a group */

static const uint8_t POW3[5] = {1, 3, 9, 27, 81};

/* TQ1_0's trit n (0..2, the weight + 1) of byte q */
static inline __attribute__((always_inline)) int tq1_trit(uint8_t q, int n) {
    return (int)(((uint16_t)(uint8_t)(q * POW3[n]) * 3) >> 8);
}

/* The table index of every group of row `row`'s values [k0, k0 + n) (n = CH, or 128 at the end of an I2_S row):
 * idx[32 c + m] = d0 + 3 d1 + 9 d2 + 27 d3, d_n = w[k0 + 128 c + m + 32 n] + 1. Returns nonzero when a weight is
 * outside {-1, 0, 1} (a malformed TQ2_0 code 3, the value 2): then idx is all 0 (in bounds) and dig holds the
 * chunk's n digits w + 1 in position order, for group_sums_direct. */
static inline __attribute__((always_inline)) int group_indices(const exact_ctx *c, int64_t row, int64_t k0, int n,
                                                                uint8_t *idx, uint8_t *dig) {
    int64_t k = c->k;
    if (c->type == BK_TQ2_0) { /* value 128 h + 32 n + m at bits 2n of qs[32 h + m]; code = w + 1 */
        const uint8_t *qs = c->w + (row * (k / QK_K) + k0 / QK_K) * 66;
        uint8_t bad = 0;
        for (int j = 0; j < NG; j++) {
            uint8_t b = qs[j];
            bad |= b & (b >> 1) & 0x55;
            idx[j] = (uint8_t)((b & 3) + 3 * ((b >> 2) & 3) + 9 * ((b >> 4) & 3) + 27 * (b >> 6));
        }
        if (!bad) return 0;
        for (int j = 0; j < NG; j++) {
            idx[j] = 0;
            for (int q = 0; q < 4; q++) dig[128 * (j / 32) + 32 * q + j % 32] = (qs[j] >> (2 * q)) & 3;
        }
        return 1;
    }
    if (c->type == BK_TQ1_0) { /* qs[0..32): 5 trits, values 32n+m; qs[32..48): 160+16n+m; qh[4]: 240+4n+m */
        const uint8_t *b = c->w + (row * (k / QK_K) + k0 / QK_K) * 54;
        uint8_t d[QK_K];
        for (int q = 0; q < 5; q++) {
            for (int m = 0; m < 32; m++) d[32 * q + m] = (uint8_t)tq1_trit(b[m], q);
            for (int m = 0; m < 16; m++) d[160 + 16 * q + m] = (uint8_t)tq1_trit(b[32 + m], q);
        }
        for (int q = 0; q < 4; q++)
            for (int m = 0; m < 4; m++) d[240 + 4 * q + m] = (uint8_t)tq1_trit(b[48 + m], q);
        for (int j = 0; j < NG; j++) {
            const uint8_t *g = d + 128 * (j / 32) + j % 32;
            idx[j] = (uint8_t)(g[0] + 3 * g[32] + 9 * g[64] + 27 * g[96]);
        }
        return 0;
    }
    /* I2_S x86: 32 bytes a 128 values, value m + 32 n at bits 6 - 2n of byte m; codes 0, 1, 2, 3 are the
     * weights -1, 0, 1, 0, digits 0, 1, 2, 1 */
    const uint8_t *p = c->w + (row * k + k0) / 4;
    for (int j = 0; j < n / 4; j++) {
        uint8_t b = p[j];
        int d[4];
        for (int q = 0; q < 4; q++) {
            int code = (b >> (6 - 2 * q)) & 3;
            d[q] = code == 3 ? 1 : code;
        }
        idx[j] = (uint8_t)(d[0] + 3 * d[1] + 9 * d[2] + 27 * d[3]);
    }
    return 0;
}

/* tab[(j * 81 + i) * TT + u] = ((v0 + v1) + (v2 + v3)) for group j of the chunk at k0 and token u of the tile,
 * v_n = (d_n - 1) * x[u][p_n], i = d0 + 3 d1 + 9 d2 + 27 d3 = i01 + 9 i23. Tokens past nt get x = +0.0. */
static inline __attribute__((always_inline)) void build_table(const double *x, int64_t xs, int nt, int64_t k0,
                                                               int ng, double *tab, const int TT) {
    for (int j = 0; j < ng; j++) {
        int64_t p = k0 + 128 * (j / 32) + j % 32;
        double v[4][3][TT], p01[9][TT], p23[9][TT];
        for (int q = 0; q < 4; q++)
            for (int u = 0; u < TT; u++) {
                double xv = u < nt ? x[u * xs + p + 32 * q] : 0.0;
                for (int d = 0; d < 3; d++) v[q][d][u] = (double)(d - 1) * xv;
            }
        for (int i = 0; i < 9; i++)
            for (int u = 0; u < TT; u++) {
                p01[i][u] = v[0][i % 3][u] + v[1][i / 3][u];
                p23[i][u] = v[2][i % 3][u] + v[3][i / 3][u];
            }
        double *tj = tab + (size_t)j * NIDX * TT;
        for (int i23 = 0; i23 < 9; i23++)
            for (int i01 = 0; i01 < 9; i01++)
                for (int u = 0; u < TT; u++) tj[(i01 + 9 * i23) * TT + u] = p01[i01][u] + p23[i23][u];
    }
}

/* the direct form of the group sums, for a row with a weight outside {-1, 0, 1}: acc[u] += the chunk's groups */
static void group_sums_direct(const uint8_t *dig, const double *x, int64_t xs, int nt, int64_t k0, int ng,
                              double *acc, int TT) {
    for (int u = 0; u < nt; u++)
        for (int j = 0; j < ng; j++) {
            int o = 128 * (j / 32) + j % 32;
            double v[4];
            for (int q = 0; q < 4; q++) v[q] = (double)(dig[o + 32 * q] - 1) * x[u * xs + k0 + o + 32 * q];
            acc[u] = acc[u] + ((v[0] + v[1]) + (v[2] + v[3]));
        }
    (void)TT;
}

/* 8 tokens' sums: one zmm, two ymm or four xmm, whatever the ISA has; the same IEEE additions lane by lane */
typedef double v8d __attribute__((vector_size(64), aligned(8)));

/* acc (RP rows x TT tokens, row-major) += the table entries of the rows' groups [0, ng), group by group; the
 * accumulators live in registers (RP x TT / 8 vectors, or RP x TT scalars) for the whole run */
static inline __attribute__((always_inline)) void add_groups(const double *tab, const uint8_t *idx, int ng,
                                                              double *acc, const int TT, const int RP) {
    if (TT >= 8) {
        const int NV = TT / 8;
        v8d a[RP][NV];
#pragma GCC unroll 8
        for (int i = 0; i < RP; i++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) memcpy(&a[i][v], acc + i * TT + 8 * v, sizeof(v8d));
        for (int j = 0; j < ng; j++) {
            const double *tj = tab + (size_t)j * NIDX * TT;
#pragma GCC unroll 8
            for (int i = 0; i < RP; i++) {
                const double *e = tj + idx[i * NG + j] * TT;
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) {
                    v8d ev;
                    memcpy(&ev, e + 8 * v, sizeof(v8d));
                    a[i][v] += ev;
                }
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < RP; i++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) memcpy(acc + i * TT + 8 * v, &a[i][v], sizeof(v8d));
        return;
    }
    double a[RP][TT];
#pragma GCC unroll 8
    for (int i = 0; i < RP; i++)
#pragma GCC unroll 4
        for (int u = 0; u < TT; u++) a[i][u] = acc[i * TT + u];
    for (int j = 0; j < ng; j++) {
        const double *tj = tab + (size_t)j * NIDX * TT;
#pragma GCC unroll 8
        for (int i = 0; i < RP; i++) {
            const double *e = tj + idx[i * NG + j] * TT;
#pragma GCC unroll 4
            for (int u = 0; u < TT; u++) a[i][u] += e[u];
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RP; i++)
#pragma GCC unroll 4
        for (int u = 0; u < TT; u++) acc[i * TT + u] = a[i][u];
}

/* Rows [r0, r1) over the values [ks, ks + span) (whole chunks; tab holds their groups' tables from ks on), RP
 * rows at a time: a row's block sum s goes on in acc_st, and at the end of its scale block into out_st
 * (both row-major, TT a row, rows counted from r0). */
static inline __attribute__((always_inline)) void add_span(const exact_ctx *c, int64_t r0, int64_t r1, int64_t ks,
                                                            int64_t span, const double *tab, const double *x, int nt,
                                                            double *acc_st, double *out_st, uint8_t *idx,
                                                            uint8_t *dig, const int TT, const int RP) {
    const int64_t g = c->k / c->nb;
    for (int64_t p0 = r0; p0 < r1; p0 += RP) {
        int np = r1 - p0 < RP ? (int)(r1 - p0) : RP;
        double *acc = acc_st + (p0 - r0) * TT;
        for (int64_t k0 = ks; k0 < ks + span; k0 += CH) {
            int n = c->k - k0 < CH ? (int)(c->k - k0) : CH;
            int bad[RP], any_bad = 0;
            for (int i = 0; i < RP; i++) { /* rows past r1 repeat the last one (their sums are dropped) */
                bad[i] = group_indices(c, p0 + (i < np ? i : np - 1), k0, n, idx + i * NG, dig + i * CH);
                any_bad |= bad[i];
            }
            if (k0 % g == 0) memset(acc, 0, sizeof(double) * RP * TT);
            double start[RP * TT];
            if (any_bad) memcpy(start, acc, sizeof start);
            add_groups(tab + (size_t)(k0 - ks) / 4 * NIDX * TT, idx, n / 4, acc, TT, RP);
            for (int i = 0; i < np; i++)
                if (bad[i]) {
                    memcpy(acc + i * TT, start + i * TT, sizeof(double) * TT);
                    group_sums_direct(dig + i * CH, x, c->k, nt, k0, n / 4, acc + i * TT, TT);
                }
            if ((k0 + n) % g) continue;
            int64_t b = k0 / g; /* the end of scale block b */
            for (int i = 0; i < np; i++) {
                int64_t srow = c->scale_rows == 1 ? 0 : p0 + i;
                double sc = (double)c->scale[srow * c->nb + b];
                double *o = out_st + (p0 - r0 + i) * TT;
                for (int u = 0; u < TT; u++) {
                    double prod = acc[i * TT + u] * sc;
                    o[u] = (b == 0 ? 0.0 : o[u]) + prod;
                }
            }
        }
    }
}

/* values a table covers: one chunk for a tile of tokens (the table stays in L2); the whole row for one token
 * (81 doubles a group: the rows are then read front to back, once) */
static int64_t table_span(int64_t k, int TT) { return TT == 1 ? k : CH; }

/* the scratch one thread needs for tiles of TT tokens over `rows` rows */
static size_t ternary_scratch(int64_t k, int64_t rows, int TT) {
    int64_t padded = (rows + 7) / 8 * 8;
    return ((size_t)table_span(k, TT) / 4 * NIDX * TT + 2 * (size_t)padded * TT) * sizeof(double) + 8 * (NG + CH);
}

/* One tile of TT tokens (nt real, starting at t0) through rows [r0, r1) of this thread */
static inline __attribute__((always_inline)) void ternary_tile(exact_ctx *c, int64_t r0, int64_t r1, int64_t t0,
                                                                int nt, char *buf, const int TT, const int RP) {
    int64_t padded = (r1 - r0 + 7) / 8 * 8, span = table_span(c->k, TT);
    double *tab = (double *)(void *)buf;
    double *acc_st = tab + (size_t)span / 4 * NIDX * TT;
    double *out_st = acc_st + padded * TT;
    uint8_t *idx = (uint8_t *)(out_st + padded * TT);
    uint8_t *dig = idx + 8 * NG;
    const double *x = c->x + t0 * c->k;
    for (int64_t ks = 0; ks < c->k; ks += span) {
        int64_t n = c->k - ks < span ? c->k - ks : span;
        build_table(x, c->k, nt, ks, (int)(n / 4), tab, TT);
        add_span(c, r0, r1, ks, n, tab, x, nt, acc_st, out_st, idx, dig, TT, RP);
    }
    for (int u = 0; u < nt; u++)
        for (int64_t i = 0; i < r1 - r0; i++) c->out[(t0 + u) * c->r + r0 + i] = out_st[i * TT + u];
}

/* tokens in tiles of 16, the last one padded; a tail of 2-4 tokens in a tile of 4, one token alone */
static inline __attribute__((always_inline)) void ternary_body(exact_ctx *c, int ith, int nth) {
    int64_t r0, r1;
    row_range(c->r, 8, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
    int64_t t = c->t;
    size_t bytes = ternary_scratch(c->k, r1 - r0, 1), b16 = ternary_scratch(c->k, r1 - r0, 16);
    char *buf = bk_scratch(BK_SCRATCH_GEMM, t > 1 && b16 > bytes ? b16 : bytes);
    if (!buf) {
        c->fail = 1;
        return;
    }
    for (int64_t t0 = 0; t0 < t;) {
        int64_t left = t - t0;
        if (left > 4) {
            int nt = left < 16 ? (int)left : 16;
            ternary_tile(c, r0, r1, t0, nt, buf, 16, 4);
            t0 += nt;
        } else if (left > 1) {
            ternary_tile(c, r0, r1, t0, (int)left, buf, 4, 4);
            t0 += left;
        } else {
            ternary_tile(c, r0, r1, t0, 1, buf, 1, 8);
            t0 += 1;
        }
    }
}

/* ================================================================ float rows (F32, F16): 8 lanes */

#define TT 32  /* tokens per tile */
#define PR 16  /* rows per panel */
#define KB 256 /* values per k slice */

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

/* values [k0, k0 + n) of row `row` as double into dst */
static inline __attribute__((always_inline)) void decode_slice(const exact_ctx *c, int64_t row, int64_t k0, int n,
                                                               double *dst, int isa) {
    int64_t k = c->k;
    if (c->type == T_F32) {
        const float *f = (const float *)(const void *)(c->w + 4 * (row * k + k0));
        for (int j = 0; j < n; j++) dst[j] = (double)f[j];
        return;
    }
    const uint16_t *h = (const uint16_t *)(const void *)(c->w + 2 * (row * k + k0));
    int j = 0;
#ifdef BK_X86
    if (isa == ISA_VNNI) j = f16_run_512(h, n, dst);
    if (isa == ISA_AVX2) j = f16_run_f16c(h, n, dst);
#endif
    (void)isa;
    for (; j < n; j++) dst[j] = (double)bk_f16_bits_to_f32(h[j]);
}

/* micro-kernels. st: the lanes of (row i, token j) at st[(i * TT + j) * 8 + l]; w: 4 rows of the decoded slice
 * (stride KB); x: nt tokens (stride xs) at the slice's start; n values. */

static void micro_portable(const double *w, const double *x, int64_t xs, int nt, int n, double *st) {
    for (int i = 0; i < 4; i++)
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
    const double *w, const double *x, int64_t xs, int n, double *st, const int NT) {
    __m512d acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NT; j++) acc[i][j] = _mm512_loadu_pd(st + (i * TT + j) * 8);
    for (int p = 0; p < n; p += 8) {
        __mmask8 m = n - p >= 8 ? 0xff : (__mmask8)((1u << (n - p)) - 1);
        __m512d wv[4], xv[4];
        for (int i = 0; i < 4; i++) wv[i] = _mm512_maskz_loadu_pd(m, w + i * KB + p);
        for (int j = 0; j < NT; j++) xv[j] = _mm512_maskz_loadu_pd(m, x + j * xs + p);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < NT; j++) acc[i][j] = _mm512_add_pd(acc[i][j], _mm512_mul_pd(wv[i], xv[j]));
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NT; j++) _mm512_storeu_pd(st + (i * TT + j) * 8, acc[i][j]);
}

__attribute__((target(BK_VNNI_TARGET))) static void micro512(const double *w, const double *x, int64_t xs, int nt,
                                                             int n, double *st) {
    for (int j = 0; j < nt; j += 4) {
        int m = nt - j < 4 ? nt - j : 4;
        const double *xj = x + j * xs;
        double *sj = st + j * 8;
        switch (m) {
        case 4: micro512_n(w, xj, xs, n, sj, 4); break;
        case 3: micro512_n(w, xj, xs, n, sj, 3); break;
        case 2: micro512_n(w, xj, xs, n, sj, 2); break;
        default: micro512_n(w, xj, xs, n, sj, 1);
        }
    }
}

/* AVX2: 1 row x NT tokens, each 8 lanes as two ymm (lanes 0-3, 4-7); n a multiple of 8 (the tail goes portable) */
static inline __attribute__((always_inline, target(BK_AVX2_TARGET))) void micro256_n(
    const double *w, const double *x, int64_t xs, int n, double *st, const int NT) {
    __m256d lo[4], hi[4];
    for (int j = 0; j < NT; j++) {
        lo[j] = _mm256_loadu_pd(st + j * 8);
        hi[j] = _mm256_loadu_pd(st + j * 8 + 4);
    }
    for (int p = 0; p < n; p += 8) {
        __m256d wl = _mm256_loadu_pd(w + p), wh = _mm256_loadu_pd(w + p + 4);
        for (int j = 0; j < NT; j++) {
            __m256d xl = _mm256_loadu_pd(x + j * xs + p), xh = _mm256_loadu_pd(x + j * xs + p + 4);
            lo[j] = _mm256_add_pd(lo[j], _mm256_mul_pd(wl, xl));
            hi[j] = _mm256_add_pd(hi[j], _mm256_mul_pd(wh, xh));
        }
    }
    for (int j = 0; j < NT; j++) {
        _mm256_storeu_pd(st + j * 8, lo[j]);
        _mm256_storeu_pd(st + j * 8 + 4, hi[j]);
    }
}

__attribute__((target(BK_AVX2_TARGET))) static void micro256(const double *w, const double *x, int64_t xs, int nt,
                                                             int n, double *st) {
    int n8 = n & ~7;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < nt; j += 4) {
            int m = nt - j < 4 ? nt - j : 4;
            const double *wi = w + i * KB;
            const double *xj = x + j * xs;
            double *s = st + (i * TT + j) * 8;
            switch (m) {
            case 4: micro256_n(wi, xj, xs, n8, s, 4); break;
            case 3: micro256_n(wi, xj, xs, n8, s, 3); break;
            case 2: micro256_n(wi, xj, xs, n8, s, 2); break;
            default: micro256_n(wi, xj, xs, n8, s, 1);
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

/* one token on AVX-512: 4 rows at a time read in place, converted to double, multiplied, added into 8 lanes */
__attribute__((target(BK_VNNI_TARGET ",f16c"))) static void direct512(exact_ctx *c, int64_t r0, int64_t r1) {
    const int64_t k = c->k;
    const double *x = c->x;
    for (int64_t row = r0; row < r1; row += 4) {
        int nr = r1 - row < 4 ? (int)(r1 - row) : 4;
        int64_t rr[4]; /* past the end, the last row again (its results are dropped) */
        for (int i = 0; i < 4; i++) rr[i] = row + (i < nr ? i : nr - 1);
        __m512d acc[4];
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
    }
}
#endif

/* float rows of this thread, inlined into one wrapper per ISA so that the conversions are vectorized for it */
static inline __attribute__((always_inline)) void float_body(exact_ctx *c, int ith, int nth) {
    int64_t k = c->k, r = c->r, r0, r1;
    int isa = c->isa;
    row_range(r, 4, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
#ifdef BK_X86
    if (c->t == 1 && isa == ISA_VNNI) {
        direct512(c, r0, r1);
        return;
    }
#endif
    size_t wbytes = (size_t)PR * KB * sizeof(double), sbytes = (size_t)PR * TT * 8 * sizeof(double);
    char *buf = bk_scratch(BK_SCRATCH_GEMM, wbytes + sbytes);
    if (!buf) {
        c->fail = 1;
        return;
    }
    double *wb = (double *)(void *)buf;
    double *st = (double *)(void *)(buf + wbytes);
    for (int64_t t0 = 0; t0 < c->t; t0 += TT) {
        int nt = c->t - t0 < TT ? (int)(c->t - t0) : TT;
        for (int64_t p0 = r0; p0 < r1; p0 += PR) {
            int np = r1 - p0 < PR ? (int)(r1 - p0) : PR;
            int npad = (np + 3) & ~3;
            for (int i = 0; i < npad; i++) memset(st + i * TT * 8, 0, (size_t)nt * 8 * sizeof(double));
            for (int64_t k0 = 0; k0 < k; k0 += KB) {
                int n = k - k0 < KB ? (int)(k - k0) : KB;
                for (int i = 0; i < np; i++) decode_slice(c, p0 + i, k0, n, wb + i * KB, isa);
                for (int i = np; i < npad; i++) memset(wb + i * KB, 0, (size_t)n * sizeof(double)); /* unused rows */
                const double *x = c->x + t0 * k + k0;
                for (int i = 0; i < npad; i += 4) {
#ifdef BK_X86
                    if (isa == ISA_VNNI) {
                        micro512(wb + i * KB, x, k, nt, n, st + i * TT * 8);
                        continue;
                    }
                    if (isa == ISA_AVX2) {
                        micro256(wb + i * KB, x, k, nt, n, st + i * TT * 8);
                        continue;
                    }
#endif
                    micro_portable(wb + i * KB, x, k, nt, n, st + i * TT * 8);
                }
            }
            for (int i = 0; i < np; i++)
                for (int j = 0; j < nt; j++) {
                    const double *a = st + (i * TT + j) * 8;
                    c->out[(t0 + j) * r + p0 + i] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                }
        }
    }
}

/* ================================================================ the driver */

static inline __attribute__((always_inline)) void exact_body(exact_ctx *c, int ith, int nth) {
    if (c->type == T_F32 || c->type == T_F16)
        float_body(c, ith, nth);
    else
        ternary_body(c, ith, nth);
}

static void exact_task_portable(void *arg, int ith, int nth) { exact_body(arg, ith, nth); }
#ifdef BK_X86
__attribute__((target(BK_AVX2_TARGET))) static void exact_task_avx2(void *arg, int ith, int nth) {
    exact_body(arg, ith, nth);
}
__attribute__((target(BK_VNNI_TARGET ",f16c"))) static void exact_task_512(void *arg, int ith, int nth) {
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
    exact_ctx c = {type, x, t, k, w, r, scale, scale_rows, nb, out, bk_current_isa(), 0};
#ifdef BK_X86
    if (c.isa == ISA_AVX2 && !(__builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) c.isa = ISA_PORTABLE;
#endif
    int nth = nthreads < 1 ? 1 : nthreads;
    if (nth > (r + 7) / 8) nth = (int)((r + 7) / 8);
    bk_task_fn fn = exact_task_portable;
#ifdef BK_X86
    if (c.isa == ISA_VNNI) fn = exact_task_512;
    if (c.isa == ISA_AVX2) fn = exact_task_avx2;
#endif
    bk_parallel(fn, &c, nth);
    return c.fail ? BK_ENOMEM : 0;
}
