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
 * Ternary: a group's 4 codes sit in one byte (TQ2_0 and I2_S store them so; TQ1_0's trits are packed so), two
 * to a nibble, and a pair's sum v0 + v1 (or v2 + v3) depends only on x and on the pair's codes: 16 possible
 * values. So for each k chunk of 256 values a thread computes, for a tile of tokens, every group's two 16-entry
 * tables of pair sums (the expression above), and a group's sum is then two table entries added, the
 * definition's ((v0 + v1) + (v2 + v3)) with the same bits: two additions per 4 weights and token instead of
 * seven. The loops over the tile's tokens are plain C that the compiler vectorizes for each ISA (no
 * reassociation: every token's sum is its own), so the variants agree bit for bit. A malformed TQ2_0 code 3 is
 * the value 2 (as ggml reads it) in the tables, so it needs no other path.
 *
 * Float rows: the threads take contiguous row ranges; each walks token tiles, row panels and k slices: the
 * slice of the panel is converted to double into a per-thread buffer, and a register-blocked micro-kernel adds
 * it into the (row, token) lanes. One token on AVX-512 reads the rows directly. */
#include <math.h>
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

#define CH 256      /* values per k chunk: one TQ block, one table */
#define NG (CH / 4) /* groups per chunk */
#define NP 32       /* table entries per group: 16 pair sums (v0 + v1), then 16 (v2 + v3) */
#define RB 64       /* rows a block */

static const uint8_t POW3[5] = {1, 3, 9, 27, 81};

/* TQ1_0's trit n (0..2, the weight + 1) of byte q */
static inline __attribute__((always_inline)) int tq1_trit(uint8_t q, int n) {
    return (int)(((uint16_t)(uint8_t)(q * POW3[n]) * 3) >> 8);
}

/* 8 tokens' sums: one zmm, two ymm or four xmm, whatever the ISA has; the same IEEE operations lane by lane */
typedef double v8d __attribute__((vector_size(64), aligned(8)));

/* The group bytes of row `row`'s values [k0, k0 + n) (n = CH, or 128 at the end of an I2_S row): codes[32 c + m]
 * holds the 2-bit codes of the values k0 + 128 c + m + 32 q (q = 0..3), the pair (q = 0, 1) in the low nibble.
 * TQ2_0 stores exactly this byte; TQ1_0's trits are packed into it; I2_S's nibbles are swapped (its value q = 0
 * sits in the top bits). */
static inline __attribute__((always_inline)) void group_codes(const exact_ctx *c, int64_t row, int64_t k0, int n,
                                                               uint8_t *codes) {
    int64_t k = c->k;
    if (c->type == BK_TQ2_0) { /* value 128 h + 32 q + m at bits 2q of qs[32 h + m] */
        memcpy(codes, c->w + (row * (k / QK_K) + k0 / QK_K) * 66, NG);
        return;
    }
    if (c->type == BK_TQ1_0) { /* qs[0..32): 5 trits, values 32q+m; qs[32..48): 160+16q+m; qh[4]: 240+4q+m */
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
            codes[j] = (uint8_t)(g[0] | g[32] << 2 | g[64] << 4 | g[96] << 6);
        }
        return;
    }
    const uint8_t *p = c->w + (row * k + k0) / 4; /* I2_S x86: 32 bytes a 128 values, value m + 32 q at bits 6 - 2q */
    for (int j = 0; j < n / 4; j++) codes[j] = (uint8_t)(p[j] >> 4 | p[j] << 4);
}

/* The pair tables of the groups [0, ng) of the values from k0, for a tile of TT tokens (nt real; x = +0.0 past):
 * tab[(NP j + s) TT + u] = value(a) x[p0] + value(b) x[p1] and tab[(NP j + 16 + s) TT + u] = value(a) x[p2] +
 * value(b) x[p3], s the nibble of codes (a, b): a | b << 2 (TQ: the first value in the low bits), a << 2 | b
 * (I2_S, its nibbles swapped). value: TQ code - 1 (a malformed TQ2_0 code 3 is the value 2, as ggml reads it),
 * I2_S codes 0, 1, 2, 3 -> -1, 0, 1, 0. A group's sum is then tab[first] + tab[second] = ((v0 + v1) + (v2 + v3)).
 * xt: a buffer for the tile's values of one chunk, token-minor (CH x TT). */
static inline __attribute__((always_inline)) void build_pairs(const exact_ctx *c, const double *x, int64_t xs,
                                                               int nt, int64_t k0, int ng, double *tab, double *xt,
                                                               const int TT) {
    const int i2s = c->type == BK_I2_S;
    double val[4] = {-1.0, 0.0, 1.0, i2s ? 0.0 : 2.0};
    for (int j = 0; j < ng; j++) {
        if (j % NG == 0) { /* a new chunk: its values token-minor */
            int64_t p = k0 + (int64_t)(j / NG) * CH, end = k0 + 4 * (int64_t)ng;
            for (int o = 0; o < CH && p + o < end; o++)
                for (int u = 0; u < TT; u++) xt[o * TT + u] = u < nt ? x[u * xs + p + o] : 0.0;
        }
        const double *xj = xt + (128 * (j % NG / 32) + j % 32) * TT;
        double *tj = tab + (size_t)j * NP * TT;
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++) {
                int s = i2s ? (a << 2 | b) : (a | b << 2);
                if (TT >= 8) {
                    for (int v = 0; v < TT / 8; v++) {
                        v8d x0, x1, x2, x3;
                        memcpy(&x0, xj + 8 * v, sizeof x0);
                        memcpy(&x1, xj + 32 * TT + 8 * v, sizeof x1);
                        memcpy(&x2, xj + 64 * TT + 8 * v, sizeof x2);
                        memcpy(&x3, xj + 96 * TT + 8 * v, sizeof x3);
                        v8d p01 = x0 * val[a] + x1 * val[b], p23 = x2 * val[a] + x3 * val[b];
                        memcpy(tj + s * TT + 8 * v, &p01, sizeof p01);
                        memcpy(tj + (16 + s) * TT + 8 * v, &p23, sizeof p23);
                    }
                } else {
                    for (int u = 0; u < TT; u++) {
                        tj[s * TT + u] = val[a] * xj[u] + val[b] * xj[32 * TT + u];
                        tj[(16 + s) * TT + u] = val[a] * xj[64 * TT + u] + val[b] * xj[96 * TT + u];
                    }
                }
            }
    }
}

/* acc (RP rows x TT tokens, row-major) += the sums of the rows' groups [0, ng), group by group: two table entries
 * a group (its code byte's nibbles), added, then added to the row's sum; the accumulators live in registers */
static inline __attribute__((always_inline)) void add_groups(const double *tab, const uint8_t *codes, int ng,
                                                              double *acc, const int TT, const int RP) {
    if (TT >= 8) {
        const int NV = TT / 8;
        v8d a[RP][NV];
#pragma GCC unroll 8
        for (int i = 0; i < RP; i++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) memcpy(&a[i][v], acc + i * TT + 8 * v, sizeof(v8d));
        for (int j = 0; j < ng; j++) {
            const double *tj = tab + (size_t)j * NP * TT;
#pragma GCC unroll 8
            for (int i = 0; i < RP; i++) {
                unsigned b = codes[i * NG + j];
                const double *e01 = tj + (b & 15) * TT, *e23 = tj + (16 + (b >> 4)) * TT;
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) {
                    v8d p01, p23;
                    memcpy(&p01, e01 + 8 * v, sizeof p01);
                    memcpy(&p23, e23 + 8 * v, sizeof p23);
                    a[i][v] += p01 + p23;
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
        const double *tj = tab + (size_t)j * NP * TT;
#pragma GCC unroll 8
        for (int i = 0; i < RP; i++) {
            unsigned b = codes[i * NG + j];
            const double *e01 = tj + (b & 15) * TT, *e23 = tj + (16 + (b >> 4)) * TT;
#pragma GCC unroll 4
            for (int u = 0; u < TT; u++) a[i][u] += e01[u] + e23[u];
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < RP; i++)
#pragma GCC unroll 4
        for (int u = 0; u < TT; u++) acc[i * TT + u] = a[i][u];
}

/* where row `row`'s packed bytes for the chunk at k0 start (the 54, 64 or 66 bytes group_codes reads) */
static inline __attribute__((always_inline)) const uint8_t *chunk_bytes(const exact_ctx *c, int64_t row, int64_t k0) {
    if (c->type == BK_I2_S) return c->w + (row * c->k + k0) / 4;
    return c->w + (row * (c->k / QK_K) + k0 / QK_K) * (c->type == BK_TQ2_0 ? 66 : 54);
}

/* Per-thread buffers of the ternary path, carved from one scratch allocation */
typedef struct {
    double *tab;    /* the span's pair tables: (span / 4) groups x NP x TT */
    double *acc;    /* block sums in progress, a row's TT at (row - r0) * TT, rows padded to 8 */
    double *out;    /* the outputs, laid out as acc */
    double *xt;     /* CH x TT: a chunk of the tile's activations, token-minor */
    uint8_t *codes; /* RB x NG group bytes of the block's chunk */
} ternary_bufs;

/* values a table covers: one chunk for a tile of tokens; the whole row for one token (32 doubles a group) */
static int64_t table_span(int64_t k, int TT) { return TT == 1 ? k : CH; }

static size_t ternary_scratch(int64_t k, int64_t rows, int TT) {
    size_t padded = (size_t)(rows + 7) / 8 * 8;
    return ((size_t)table_span(k, TT) / 4 * NP * TT + 2 * padded * TT + CH * (size_t)TT) * sizeof(double) + RB * NG;
}

static ternary_bufs ternary_carve(char *buf, int64_t k, int64_t rows, int TT) {
    size_t padded = (size_t)(rows + 7) / 8 * 8;
    ternary_bufs b;
    b.tab = (double *)(void *)buf;
    b.acc = b.tab + (size_t)table_span(k, TT) / 4 * NP * TT;
    b.out = b.acc + padded * TT;
    b.xt = b.out + padded * TT;
    b.codes = (uint8_t *)(b.xt + CH * TT);
    return b;
}

/* Rows [r0, r1) over the values [ks, ks + span) (whole chunks; bf.tab holds their groups' tables from ks on): a
 * row's block sum s goes on in bf.acc, and at the end of its scale block into bf.out. Blocks of RB rows go
 * chunk by chunk (the next block's bytes prefetched meanwhile); within a chunk, slices of SG groups go through
 * the block's rows RP at a time, so that the slice's tables stay in L1 while the rows use them. RP must divide 8:
 * the buffers hold a thread's rows padded to 8 and RB rows of codes. */
static inline __attribute__((always_inline)) void add_span(const exact_ctx *c, int64_t r0, int64_t r1, int64_t ks,
                                                            int64_t span, const ternary_bufs *bf, const int TT,
                                                            const int RP, const int SG) {
    const int64_t g = c->k / c->nb;
    for (int64_t b0 = r0; b0 < r1; b0 += RB) {
        int nb_rows = r1 - b0 < RB ? (int)(r1 - b0) : RB;
        int panels = (nb_rows + RP - 1) / RP;
        for (int64_t k0 = ks; k0 < ks + span; k0 += CH) {
            int n = c->k - k0 < CH ? (int)(c->k - k0) : CH, ng = n / 4;
            for (int i = 0; i < RB && b0 + RB + i < r1; i++) {
                const uint8_t *nx = chunk_bytes(c, b0 + RB + i, k0);
                __builtin_prefetch(nx);
                __builtin_prefetch(nx + 63);
            }
            double *acc = bf->acc + (b0 - r0) * TT;
            for (int i = 0; i < panels * RP; i++) /* rows past r1 repeat the last one (their sums are dropped) */
                group_codes(c, b0 + (i < nb_rows ? i : nb_rows - 1), k0, n, bf->codes + i * NG);
            if (k0 % g == 0) memset(acc, 0, sizeof(double) * panels * RP * TT);
            for (int s0 = 0; s0 < ng; s0 += SG)
                for (int p = 0; p < panels; p++)
                    add_groups(bf->tab + ((size_t)(k0 - ks) / 4 + s0) * NP * TT, bf->codes + p * RP * NG + s0,
                               ng - s0 < SG ? ng - s0 : SG, acc + p * RP * TT, TT, RP);
            if ((k0 + n) % g) continue;
            int64_t b = k0 / g; /* the end of scale block b */
            for (int i = 0; i < nb_rows; i++) {
                int64_t srow = c->scale_rows == 1 ? 0 : b0 + i;
                double sc = (double)c->scale[srow * c->nb + b];
                double *o = bf->out + (b0 - r0 + i) * TT;
                if (TT >= 8) { /* the same expression, 8 tokens a vector */
                    for (int v = 0; v < TT / 8; v++) {
                        v8d a, prev = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
                        memcpy(&a, acc + i * TT + 8 * v, sizeof a);
                        if (b != 0) memcpy(&prev, o + 8 * v, sizeof prev);
                        v8d sum = prev + a * sc;
                        memcpy(o + 8 * v, &sum, sizeof sum);
                    }
                    continue;
                }
                for (int u = 0; u < TT; u++) {
                    double prod = acc[i * TT + u] * sc;
                    o[u] = (b == 0 ? 0.0 : o[u]) + prod;
                }
            }
        }
    }
}

#ifdef BK_X86
/* ---------------------------------------------------------------- one token on AVX-512: 8 rows a vector
 * The pair tables of one token are 16 doubles each: two registers, from which one vpermi2pd picks 8 rows'
 * pair sums by their nibbles at once (it reads the index's low 4 bits). Each 8 rows' group bytes come in by
 * one gather per 8 groups (a qword of each row), the nibbles being that qword shifted down. I2_S's nibbles are
 * not swapped here: its first pair is read from the high nibble. */
__attribute__((target(BK_VNNI_TARGET))) static void one_token512(const exact_ctx *c, int64_t r0, int64_t r1,
                                                                  const double *pairs, double *acc_st) {
    const int64_t k = c->k, g = k / c->nb;
    const int i2s = c->type == BK_I2_S;
    for (int64_t b0 = r0; b0 < r1; b0 += RB) {
        int64_t b1 = r1 - b0 < RB ? r1 : b0 + RB;
        for (int64_t k0 = 0; k0 < k; k0 += CH) {
            int nq = (k - k0 < CH ? (int)(k - k0) : CH) / 32; /* qwords of a row's chunk: 8 groups each */
            const double *pk = pairs + NP * (k0 / 4);
            for (int64_t p0 = b0; p0 < b1; p0 += 8) {
                int np = b1 - p0 < 8 ? (int)(b1 - p0) : 8;
                int64_t off[8]; /* rows past b1 repeat the last one (their sums are dropped) */
                for (int i = 0; i < 8; i++) off[i] = chunk_bytes(c, p0 + (i < np ? i : np - 1), k0) - c->w;
                for (int i = 0; i < 8 && p0 + RB + i < r1; i++) { /* the same rows of the next block */
                    const uint8_t *nx = chunk_bytes(c, p0 + RB + i, k0);
                    __builtin_prefetch(nx);
                    __builtin_prefetch(nx + 63);
                }
                __m512i vo = _mm512_loadu_si512((const void *)off);
                __m512d a = k0 % g == 0 ? _mm512_setzero_pd() : _mm512_loadu_pd(acc_st + (p0 - r0));
                for (int q = 0; q < nq; q++) {
                    __m512i codes = _mm512_i64gather_epi64(vo, (const void *)(c->w + 8 * q), 1);
                    const double *pq = pk + NP * 8 * q;
                    for (int s = 0; s < 8; s++) {
                        __m512i lo = _mm512_srli_epi64(codes, 8 * s), hi = _mm512_srli_epi64(codes, 8 * s + 4);
                        const double *t = pq + NP * s;
                        __m512d first = _mm512_permutex2var_pd(_mm512_loadu_pd(t), i2s ? hi : lo, _mm512_loadu_pd(t + 8));
                        __m512d second = _mm512_permutex2var_pd(_mm512_loadu_pd(t + 16), i2s ? lo : hi,
                                                                _mm512_loadu_pd(t + 24));
                        a = _mm512_add_pd(a, _mm512_add_pd(first, second));
                    }
                }
                _mm512_storeu_pd(acc_st + (p0 - r0), a);
                if ((k0 + nq * 32) % g) continue;
                int64_t b = k0 / g; /* the end of scale block b */
                for (int i = 0; i < np; i++) {
                    int64_t srow = c->scale_rows == 1 ? 0 : p0 + i;
                    double prod = acc_st[p0 - r0 + i] * (double)c->scale[srow * c->nb + b];
                    c->out[p0 + i] = (b == 0 ? 0.0 : c->out[p0 + i]) + prod;
                }
            }
        }
    }
}
#endif

/* matrices with the same activations in one call (a layer's Q, K, V; gate and up): one table serves them all */
typedef struct {
    exact_ctx m[BK_EXACT_MANY];
    int n;
} exact_many;

/* this thread's rows of each matrix: [r0[m], r1[m]), their state at row offset off[m] (padded to 8 a matrix) */
typedef struct {
    int64_t r0[BK_EXACT_MANY], r1[BK_EXACT_MANY], off[BK_EXACT_MANY], rows;
} thread_rows;

/* One tile of TT tokens (nt real, starting at t0) through this thread's rows of every matrix */
static inline __attribute__((always_inline)) void ternary_tile(exact_many *mm, const thread_rows *tr, int64_t t0,
                                                                int nt, char *buf, const int TT, const int RP,
                                                                const int SG) {
    const exact_ctx *c0 = &mm->m[0];
    int64_t k = c0->k, span = table_span(k, TT);
    ternary_bufs bf = ternary_carve(buf, k, tr->rows, TT);
    const double *x = c0->x + t0 * k;
    for (int64_t ks = 0; ks < k; ks += span) {
        int64_t n = k - ks < span ? k - ks : span;
        build_pairs(c0, x, k, nt, ks, (int)(n / 4), bf.tab, bf.xt, TT);
        for (int m = 0; m < mm->n; m++) {
            ternary_bufs bm = bf;
            bm.acc += tr->off[m] * TT;
            bm.out += tr->off[m] * TT;
            add_span(&mm->m[m], tr->r0[m], tr->r1[m], ks, n, &bm, TT, RP, SG);
        }
    }
    for (int m = 0; m < mm->n; m++) {
        const exact_ctx *c = &mm->m[m];
        const double *o = bf.out + tr->off[m] * TT;
        for (int u = 0; u < nt; u++)
            for (int64_t i = 0; i < tr->r1[m] - tr->r0[m]; i++) c->out[(t0 + u) * c->r + tr->r0[m] + i] = o[i * TT + u];
    }
}

/* tokens in tiles of 16, the last one padded; a tail of 2-4 tokens in a tile of 4, one token alone */
static inline __attribute__((always_inline)) void ternary_body(exact_many *mm, int ith, int nth) {
    exact_ctx *c = &mm->m[0];
    thread_rows tr = {.rows = 0};
    for (int m = 0; m < mm->n; m++) {
        row_range(mm->m[m].r, 8, ith, nth, &tr.r0[m], &tr.r1[m]);
        if (tr.r1[m] < tr.r0[m]) tr.r1[m] = tr.r0[m];
        tr.off[m] = tr.rows;
        tr.rows += (tr.r1[m] - tr.r0[m] + 7) / 8 * 8;
    }
    if (tr.rows == 0) return;
    int64_t t = c->t;
    size_t bytes = ternary_scratch(c->k, tr.rows, 1), b16 = ternary_scratch(c->k, tr.rows, 16);
    char *buf = bk_scratch(BK_SCRATCH_GEMM, t > 1 && b16 > bytes ? b16 : bytes);
    if (!buf) {
        c->fail = 1;
        return;
    }
#ifdef BK_X86
    if (t == 1 && c->isa == ISA_VNNI && (c->type == BK_TQ2_0 || c->type == BK_I2_S)) {
        ternary_bufs bf = ternary_carve(buf, c->k, tr.rows, 1);
        build_pairs(c, c->x, c->k, 1, 0, (int)(c->k / 4), bf.tab, bf.xt, 1);
        for (int m = 0; m < mm->n; m++)
            if (tr.r1[m] > tr.r0[m]) one_token512(&mm->m[m], tr.r0[m], tr.r1[m], bf.tab, bf.acc + tr.off[m]);
        return;
    }
#endif
    for (int64_t t0 = 0; t0 < t;) {
        int64_t left = t - t0;
        if (left > 4) {
            int nt = left < 16 ? (int)left : 16;
            ternary_tile(mm, &tr, t0, nt, buf, 16, 4, 8);
            t0 += nt;
        } else if (left > 1) {
            ternary_tile(mm, &tr, t0, (int)left, buf, 4, 4, 16);
            t0 += left;
        } else {
            ternary_tile(mm, &tr, t0, 1, buf, 1, 8, 32);
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

static inline __attribute__((always_inline)) void exact_body(exact_many *mm, int ith, int nth) {
    if (mm->m[0].type == T_F32 || mm->m[0].type == T_F16)
        float_body(&mm->m[0], ith, nth);
    else
        ternary_body(mm, ith, nth);
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

/* the checks of one matrix; nb is set to 1 for float rows */
static int exact_args(int type, int64_t t, int64_t k, int64_t r, const float *scale, int64_t scale_rows,
                      int64_t *nb) {
    if (t < 0 || k < 1 || r < 0) return BK_EBADARG;
    int ternary = type == BK_TQ1_0 || type == BK_TQ2_0 || type == BK_I2_S;
    if (!ternary && type != T_F32 && type != T_F16) return BK_EBADARG;
    if (!ternary) {
        *nb = 1;
        return 0;
    }
    if (!scale || *nb < 1 || k % *nb || (scale_rows != 1 && scale_rows != r)) return BK_EBADARG;
    if (type == BK_I2_S ? (k % QK_I2S != 0) : (k % QK_K != 0)) return BK_EBADK;
    if (type != BK_I2_S && *nb != k / QK_K) return BK_EBADARG; /* one scale per 256-value block */
    if (type == BK_I2_S && *nb != 1) return BK_EBADARG;        /* one scale per tensor */
    return 0;
}

static int exact_run(exact_many *mm, int nthreads) {
    int64_t rmax = 0;
    for (int m = 0; m < mm->n; m++) rmax = mm->m[m].r > rmax ? mm->m[m].r : rmax;
    if (mm->m[0].t == 0 || rmax == 0) return 0;
    int isa = bk_current_isa();
#ifdef BK_X86
    if (isa == ISA_AVX2 && !(__builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) isa = ISA_PORTABLE;
#endif
    for (int m = 0; m < mm->n; m++) mm->m[m].isa = isa;
    int nth = nthreads < 1 ? 1 : nthreads;
    if (nth > (rmax + 7) / 8) nth = (int)((rmax + 7) / 8);
    bk_task_fn fn = exact_task_portable;
#ifdef BK_X86
    if (isa == ISA_VNNI) fn = exact_task_512;
    if (isa == ISA_AVX2) fn = exact_task_avx2;
#endif
    bk_parallel(fn, mm, nth);
    return mm->m[0].fail ? BK_ENOMEM : 0;
}

int bk_exact_matmul(int type, const double *x, int64_t t, int64_t k, const uint8_t *w, int64_t r,
                    const float *scale, int64_t scale_rows, int64_t nb, double *out, int nthreads) {
    int rc = exact_args(type, t, k, r, scale, scale_rows, &nb);
    if (rc) return rc;
    exact_many mm = {.n = 1};
    mm.m[0] = (exact_ctx){type, x, t, k, w, r, scale, scale_rows, nb, out, ISA_PORTABLE, 0};
    return exact_run(&mm, nthreads);
}

int bk_exact_matmul_many(int type, const double *x, int64_t t, int64_t k, int n, const uint8_t *const *w,
                         const int64_t *r, const float *const *scale, const int64_t *scale_rows, double *const *out,
                         int nthreads) {
    if (n < 1 || n > BK_EXACT_MANY || type == T_F32 || type == T_F16) return BK_EBADARG;
    exact_many mm = {.n = n};
    for (int m = 0; m < n; m++) {
        int64_t nb = type == BK_I2_S ? 1 : k / QK_K;
        int rc = exact_args(type, t, k, r[m], scale[m], scale_rows[m], &nb);
        if (rc) return rc;
        mm.m[m] = (exact_ctx){type, x, t, k, w[m], r[m], scale[m], scale_rows[m], nb, out[m], ISA_PORTABLE, 0};
    }
    return exact_run(&mm, nthreads);
}

/* ================================================================ attention products (float64, caches float32)
 * scores[h][i][s] = q[i][h] . k[s][h / g]: 8 lanes (lane p % 8, in order), folded as the float rows above;
 * values[i][h][:] = +0.0, then + w[h][i][s] * v[s][h / g][:] for s = 0, 1, ... in order. The caches' float32
 * values are exact in double. Zero-filled lanes and columns past d add +0.0, which never changes a sum that
 * starts at +0.0. */

typedef float v8f __attribute__((vector_size(32), aligned(4)));

/* *v = 8 values of a row from p as double, zero past n (through a pointer: a vector return value would
 * depend on the ISA's calling convention) */
static inline __attribute__((always_inline)) void load8_f64(v8d *v, const double *p, int n) {
    *v = (v8d){0, 0, 0, 0, 0, 0, 0, 0};
    if (n >= 8)
        memcpy(v, p, sizeof *v);
    else
        for (int l = 0; l < n; l++) (*v)[l] = p[l];
}
static inline __attribute__((always_inline)) void load8_f32(v8d *v, const float *p, int n) {
    if (n >= 8) {
        v8f f;
        memcpy(&f, p, sizeof f);
        *v = __builtin_convertvector(f, v8d);
        return;
    }
    *v = (v8d){0, 0, 0, 0, 0, 0, 0, 0};
    for (int l = 0; l < n; l++) (*v)[l] = (double)p[l];
}

typedef struct {
    const double *a; /* q (t, heads, d) or w (heads, t, s_len) */
    const float *kv; /* the cache, (s_len, kv_heads, d) */
    int64_t t, heads, kv_heads, d, s_len;
    double *out;
} attn_ctx;

/* 4 queries x 4 keys of one head a step, 16 lane vectors */
static inline __attribute__((always_inline)) void scores_body(attn_ctx *c, int ith, int nth) {
    const int64_t t = c->t, d = c->d, s_len = c->s_len, g = c->heads / c->kv_heads;
    const int64_t qb = (t + 3) / 4, units = c->heads * qb;
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        int64_t h = u / qb, i0 = u % qb * 4, kvh = h / g;
        int ni = t - i0 < 4 ? (int)(t - i0) : 4;
        for (int64_t s0 = 0; s0 < s_len; s0 += 4) {
            int ns = s_len - s0 < 4 ? (int)(s_len - s0) : 4;
            v8d acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = (v8d){0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t p = 0; p < d; p += 8) {
                int n = d - p < 8 ? (int)(d - p) : 8;
                v8d qv[4], kv[4];
                for (int i = 0; i < 4; i++) /* past the last query or key: the last one again, dropped */
                    load8_f64(&qv[i], c->a + ((i0 + (i < ni ? i : ni - 1)) * c->heads + h) * d + p, n);
                for (int j = 0; j < 4; j++)
                    load8_f32(&kv[j], c->kv + ((s0 + (j < ns ? j : ns - 1)) * c->kv_heads + kvh) * d + p, n);
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] = acc[i][j] + qv[i] * kv[j];
            }
            for (int i = 0; i < ni; i++)
                for (int j = 0; j < ns; j++) {
                    v8d a = acc[i][j];
                    c->out[(h * t + i0 + i) * s_len + s0 + j] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                }
        }
    }
}

/* 4 queries x 4 column blocks of 8 of one head a step, 16 vectors, keys in order */
static inline __attribute__((always_inline)) void values_body(attn_ctx *c, int ith, int nth) {
    const int64_t t = c->t, d = c->d, s_len = c->s_len, g = c->heads / c->kv_heads, cb = (d + 31) / 32;
    const int64_t qb = (t + 3) / 4, units = c->heads * qb * cb;
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        int64_t h = u / (qb * cb), i0 = u / cb % qb * 4, c0 = u % cb * 32, kvh = h / g;
        int ni = t - i0 < 4 ? (int)(t - i0) : 4;
        v8d acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = (v8d){0, 0, 0, 0, 0, 0, 0, 0};
        const double *w[4];
        for (int i = 0; i < 4; i++) w[i] = c->a + (h * t + i0 + (i < ni ? i : ni - 1)) * s_len;
        for (int64_t s = 0; s < s_len; s++) {
            const float *vr = c->kv + (s * c->kv_heads + kvh) * d + c0;
            v8d vv[4];
            for (int j = 0; j < 4; j++) {
                int64_t left = d - c0 - 8 * j;
                load8_f32(&vv[j], vr + 8 * j, left <= 0 ? 0 : left < 8 ? (int)left : 8);
            }
            for (int i = 0; i < 4; i++) {
                double wi = w[i][s];
                for (int j = 0; j < 4; j++) acc[i][j] = acc[i][j] + wi * vv[j];
            }
        }
        for (int i = 0; i < ni; i++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 8 && c0 + 8 * j + l < d; l++)
                    c->out[((i0 + i) * c->heads + h) * d + c0 + 8 * j + l] = acc[i][j][l];
    }
}

static void scores_portable(void *arg, int ith, int nth) { scores_body(arg, ith, nth); }
static void values_portable(void *arg, int ith, int nth) { values_body(arg, ith, nth); }
#ifdef BK_X86
__attribute__((target(BK_AVX2_TARGET))) static void scores_avx2(void *arg, int ith, int nth) {
    scores_body(arg, ith, nth);
}
__attribute__((target(BK_AVX2_TARGET))) static void values_avx2(void *arg, int ith, int nth) {
    values_body(arg, ith, nth);
}
__attribute__((target(BK_VNNI_TARGET))) static void scores_512(void *arg, int ith, int nth) {
    scores_body(arg, ith, nth);
}
__attribute__((target(BK_VNNI_TARGET))) static void values_512(void *arg, int ith, int nth) {
    values_body(arg, ith, nth);
}
#endif

static int exact_attention(int values, const double *a, int64_t t, int64_t heads, int64_t kv_heads, int64_t d,
                           const float *kv, int64_t s_len, double *out, int nthreads) {
    if (t < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || d < 1 || s_len < 1) return BK_EBADARG;
    attn_ctx c = {a, kv, t, heads, kv_heads, d, s_len, out};
    bk_task_fn fn = values ? values_portable : scores_portable;
#ifdef BK_X86
    int isa = bk_current_isa();
    if (isa == ISA_AVX2 && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        fn = values ? values_avx2 : scores_avx2;
    if (isa == ISA_VNNI) fn = values ? values_512 : scores_512;
#endif
    bk_parallel(fn, &c, nthreads < 1 ? 1 : nthreads);
    return 0;
}

int bk_exact_scores(const double *q, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const float *kc,
                    int64_t s_len, double *out, int nthreads) {
    return exact_attention(0, q, t, heads, kv_heads, d, kc, s_len, out, nthreads);
}

int bk_exact_values(const double *w, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const float *vc,
                    int64_t s_len, double *out, int nthreads) {
    return exact_attention(1, w, t, heads, kv_heads, d, vc, s_len, out, nthreads);
}

/* ================================================================ elementwise steps (RMS norm, RoPE, ReLU^2)
 * Plain C on rows split over the threads; nothing is reassociated, so every ISA gives numpy's bits. */

typedef struct {
    double *x;
    const double *y;
    const float *gain;
    const double *cos, *sin;
    int64_t t, n, heads, d;
    double eps;
    double *out;
} elem_ctx;

static void rms_task(void *arg, int ith, int nth) {
    const elem_ctx *c = arg;
    const int64_t k = c->n;
    for (int64_t i = c->t * ith / nth; i < c->t * (ith + 1) / nth; i++) {
        const double *x = c->x + i * k;
        v8d lane = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, v;
        for (int64_t p = 0; p < k; p += 8) { /* value p + l into lane l, in order; a tail of k % 8 adds +0.0 */
            load8_f64(&v, x + p, k - p < 8 ? (int)(k - p) : 8);
            lane = lane + v * v;
        }
        double sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        double ms = sum / (double)k;
        double inv = 1.0 / sqrt(ms + c->eps);
        double *o = c->out + i * k;
        for (int64_t p = 0; p < k; p++) o[p] = (x[p] * inv) * (double)c->gain[p];
    }
}

static void rope_task(void *arg, int ith, int nth) {
    const elem_ctx *c = arg;
    const int64_t half = c->d / 2, units = c->t * c->heads;
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        double *x = c->x + u * c->d;
        const double *cs = c->cos + u / c->heads * half, *sn = c->sin + u / c->heads * half;
        for (int64_t i = 0; i < half; i++) {
            double a = x[i], b = x[i + half];
            x[i] = a * cs[i] - b * sn[i];
            x[i + half] = a * sn[i] + b * cs[i];
        }
    }
}

static void relu2_task(void *arg, int ith, int nth) {
    const elem_ctx *c = arg;
    for (int64_t i = c->t * ith / nth; i < c->t * (ith + 1) / nth; i++) {
        const double *g = c->x + i * c->n, *u = c->y + i * c->n;
        double *o = c->out + i * c->n;
        for (int64_t p = 0; p < c->n; p++) {
            double r = g[p] >= 0.0 || g[p] != g[p] ? g[p] : 0.0;
            o[p] = (r * r) * u[p];
        }
    }
}

/* one thread for a row or two: a decoded token's steps are too small to share */
static int elem_threads(int64_t rows, int nthreads) {
    int n = nthreads < 1 ? 1 : nthreads;
    return rows < 4 ? 1 : (rows < n ? (int)rows : n);
}

int bk_exact_rms(const double *x, int64_t t, int64_t k, const float *gain, double eps, double *out, int nthreads) {
    if (t < 1 || k < 1) return BK_EBADARG;
    elem_ctx c = {.x = (double *)x, .gain = gain, .t = t, .n = k, .eps = eps, .out = out};
    bk_parallel(rms_task, &c, elem_threads(t, nthreads));
    return 0;
}

int bk_exact_rope(double *x, int64_t t, int64_t heads, int64_t d, const double *cos, const double *sin,
                  int nthreads) {
    if (t < 1 || heads < 1 || d < 2 || d % 2) return BK_EBADARG;
    elem_ctx c = {.x = x, .cos = cos, .sin = sin, .t = t, .heads = heads, .d = d};
    bk_parallel(rope_task, &c, elem_threads(t, nthreads));
    return 0;
}

int bk_exact_relu2_mul(const double *gate, const double *up, int64_t t, int64_t n, double *out, int nthreads) {
    if (t < 1 || n < 1) return BK_EBADARG;
    elem_ctx c = {.x = (double *)gate, .y = up, .t = t, .n = n, .out = out};
    bk_parallel(relu2_task, &c, elem_threads(t, nthreads));
    return 0;
}
