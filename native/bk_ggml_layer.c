/* One BitNet b1.58 decoder layer as bitnet_ref's llama-cpp numerics profile computes it (mainline llama.cpp on
 * x86, flash attention off, an F32 KV cache): bit for bit the numpy definition in bitnet_ref/model.py
 * (Model.forward with ggml_cpu=True, activations q8_k, kv_cache f32). Projections:
 *   TQ1_0 / TQ2_0  Q8_K activations (bk_quantize_q8_k) times the packed blocks in ggml's order: per 256-value
 *                  block 8 int32 lanes (bsums subtracted), acc = fma(lane, dy * dw, acc), then hsum_float_8. On
 *                  AVX-512 VNNI a GEMM (tq_gemm_vnni: weights read once per call, 4 rows x every token); other
 *                  variants bk_tq_dot. Integer lanes are exact, so every variant gives the same bits.
 *   F16 / F32      the exact products (F16: of f16-rounded activations) summed in double, rounded once to float
 *                  (the definition takes them as a float64 matrix product)
 * then RoPE, norms and gating from bk_layer.c, the attention from bk_attention_f32.c. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>
#endif

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };

/* ---------------------------------------------------------------- float weights: double sums */

/* out = (float) sum_j x[j] * w[j] in double: 8 lanes (lane l takes j = l mod 8 over k & ~7, in order), combined
 * ((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7)), the rest added in order. The products of float32 values are exact in
 * double, so an FMA is the same add. */
static double dot64_portable(const double *x, const float *w, int64_t k) {
    double a[8] = {0};
    int64_t body = k & ~(int64_t)7;
    for (int64_t j = 0; j < body; j += 8)
        for (int l = 0; l < 8; l++) a[l] = a[l] + x[j + l] * (double)w[j + l];
    double s = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
    for (int64_t j = body; j < k; j++) s = s + x[j] * (double)w[j];
    return s;
}

#ifdef BK_X86
__attribute__((target("avx512f,f16c"))) static double hsum8_pd(__m512d v) {
    double a[8];
    _mm512_storeu_pd(a, v);
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* dot64_portable for 4 tokens (x rows xs apart) sharing each weight load */
__attribute__((target("avx512f,f16c"))) static void dot64x4_avx512(const double *x, int64_t xs, const float *w, int64_t k,
                                                             double *out) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t body = k & ~(int64_t)7;
    for (int64_t j = 0; j < body; j += 8) {
        __m512d wv = _mm512_cvtps_pd(_mm256_loadu_ps(w + j));
        a0 = _mm512_fmadd_pd(_mm512_loadu_pd(x + j), wv, a0);
        a1 = _mm512_fmadd_pd(_mm512_loadu_pd(x + xs + j), wv, a1);
        a2 = _mm512_fmadd_pd(_mm512_loadu_pd(x + 2 * xs + j), wv, a2);
        a3 = _mm512_fmadd_pd(_mm512_loadu_pd(x + 3 * xs + j), wv, a3);
    }
    __m512d acc[4] = {a0, a1, a2, a3};
    for (int u = 0; u < 4; u++) {
        double s = hsum8_pd(acc[u]);
        for (int64_t j = body; j < k; j++) s = s + x[u * xs + j] * (double)w[j];
        out[u] = s;
    }
}

/* the same two on F16 rows read in place (vcvtph2ps widens exactly, as bk_f16_bits_to_f32) */
__attribute__((target("avx512f,f16c"))) static inline __m512d f16x8_pd(const uint8_t *w, int64_t j) {
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * j))));
}

__attribute__((target("avx512f,f16c"))) static double f16_tail(const double *x, const uint8_t *w, int64_t j0, int64_t k,
                                                         double s) {
    for (int64_t j = j0; j < k; j++) {
        uint16_t h;
        memcpy(&h, w + 2 * j, 2);
        s = s + x[j] * (double)bk_f16_bits_to_f32(h);
    }
    return s;
}

__attribute__((target("avx512f,f16c"))) static void dot64x4_f16_avx512(const double *x, int64_t xs, const uint8_t *w,
                                                                 int64_t k, double *out) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t body = k & ~(int64_t)7;
    for (int64_t j = 0; j < body; j += 8) {
        __m512d wv = f16x8_pd(w, j);
        a0 = _mm512_fmadd_pd(_mm512_loadu_pd(x + j), wv, a0);
        a1 = _mm512_fmadd_pd(_mm512_loadu_pd(x + xs + j), wv, a1);
        a2 = _mm512_fmadd_pd(_mm512_loadu_pd(x + 2 * xs + j), wv, a2);
        a3 = _mm512_fmadd_pd(_mm512_loadu_pd(x + 3 * xs + j), wv, a3);
    }
    __m512d acc[4] = {a0, a1, a2, a3};
    for (int u = 0; u < 4; u++) out[u] = f16_tail(x + u * xs, w, body, k, hsum8_pd(acc[u]));
}

/* dot64_f16_avx512 for one token and 4 rows (w rows ws bytes apart): four independent chains */
__attribute__((target("avx512f,f16c"))) static void dot64_f16_rows4_avx512(const double *x, const uint8_t *w,
                                                                          int64_t ws, int64_t k, double *out) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    int64_t body = k & ~(int64_t)7;
    for (int64_t j = 0; j < body; j += 8) {
        __m512d xv = _mm512_loadu_pd(x + j);
        a0 = _mm512_fmadd_pd(xv, f16x8_pd(w, j), a0);
        a1 = _mm512_fmadd_pd(xv, f16x8_pd(w + ws, j), a1);
        a2 = _mm512_fmadd_pd(xv, f16x8_pd(w + 2 * ws, j), a2);
        a3 = _mm512_fmadd_pd(xv, f16x8_pd(w + 3 * ws, j), a3);
    }
    __m512d acc[4] = {a0, a1, a2, a3};
    for (int u = 0; u < 4; u++) out[u] = f16_tail(x, w + u * ws, body, k, hsum8_pd(acc[u]));
}

/* one token: two accumulator chains over alternate 8-blocks would change the lanes' order, so one chain (the
 * loop is bound by reading the row) */
__attribute__((target("avx512f,f16c"))) static double dot64_f16_avx512(const double *x, const uint8_t *w, int64_t k) {
    __m512d a = _mm512_setzero_pd();
    int64_t body = k & ~(int64_t)7;
    for (int64_t j = 0; j < body; j += 8) a = _mm512_fmadd_pd(_mm512_loadu_pd(x + j), f16x8_pd(w, j), a);
    return f16_tail(x, w, body, k, hsum8_pd(a));
}

__attribute__((target("avx512f,f16c"))) static double dot64_avx512(const double *x, const float *w, int64_t k) {
    __m512d a = _mm512_setzero_pd();
    int64_t body = k & ~(int64_t)7;
    for (int64_t j = 0; j < body; j += 8)
        a = _mm512_fmadd_pd(_mm512_loadu_pd(x + j), _mm512_cvtps_pd(_mm256_loadu_ps(w + j)), a);
    double s = hsum8_pd(a);
    for (int64_t j = body; j < k; j++) s = s + x[j] * (double)w[j];
    return s;
}
#endif

typedef struct {
    const double *x;
    int64_t t, k, r;
    const void *w;
    int wtype; /* BK_F32: float rows; BK_F16: f16 bytes */
    float *out;
    int64_t chunk;
    atomic_llong next;
    atomic_int err;
} f64mm_t;

/* rows [r0, r1) x tokens [i0, i1) of the product, the weight rows widened into `row` where needed */
static void f64mm_block(const f64mm_t *m, int avx512, float *row, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
    const int64_t k = m->k;
    for (int64_t r = r0; r < r1; r++) {
        int64_t i = i0;
#ifdef BK_X86
        if (avx512 && m->wtype == BK_F16) {
            const uint8_t *w16 = (const uint8_t *)m->w + 2 * r * k;
            if (i1 - i0 < 4 && r + 4 <= r1) { /* few tokens: 4 rows at a time, independent chains */
                for (; i < i1; i++) {
                    double o[4];
                    dot64_f16_rows4_avx512(m->x + i * k, w16, 2 * k, k, o);
                    for (int u = 0; u < 4; u++) m->out[i * m->r + r + u] = (float)o[u];
                }
                r += 3;
                continue;
            }
            double o[4];
            for (; i + 4 <= i1; i += 4) {
                dot64x4_f16_avx512(m->x + i * k, k, w16, k, o);
                for (int u = 0; u < 4; u++) m->out[(i + u) * m->r + r] = (float)o[u];
            }
            for (; i < i1; i++) m->out[i * m->r + r] = (float)dot64_f16_avx512(m->x + i * k, w16, k);
            continue;
        }
#endif
        const float *w = (const float *)m->w + r * k;
        if (m->wtype == BK_F16) {
            const uint8_t *src = (const uint8_t *)m->w + 2 * r * k;
            for (int64_t j = 0; j < k; j++) {
                uint16_t h;
                memcpy(&h, src + 2 * j, 2);
                row[j] = bk_f16_bits_to_f32(h);
            }
            w = row;
        }
#ifdef BK_X86
        if (avx512) {
            double o[4];
            for (; i + 4 <= i1; i += 4) {
                dot64x4_avx512(m->x + i * k, k, w, k, o);
                for (int u = 0; u < 4; u++) m->out[(i + u) * m->r + r] = (float)o[u];
            }
            for (; i < i1; i++) m->out[i * m->r + r] = (float)dot64_avx512(m->x + i * k, w, k);
        }
#endif
        for (; i < i1; i++) m->out[i * m->r + r] = (float)dot64_portable(m->x + i * k, w, k);
    }
}

#define F64MM_TOKENS 16 /* tokens per pass over a chunk of rows: their activations stay in L2 */

static void f64mm_task(void *ctx, int ith, int nth) {
    (void)ith, (void)nth;
    f64mm_t *m = (f64mm_t *)ctx;
    int avx512 = 0;
#ifdef BK_X86
    avx512 = bk_current_isa() == ISA_VNNI;
#endif
    float *row = NULL;
    if (m->wtype == BK_F16 && !(row = (float *)bk_scratch(BK_SCRATCH_GEMM, sizeof(float) * (size_t)(m->k + 16)))) {
        atomic_store(&m->err, 1);
        return;
    }
    for (;;) {
        int64_t r0 = atomic_fetch_add_explicit(&m->next, m->chunk, memory_order_relaxed);
        if (r0 >= m->r) break;
        int64_t r1 = r0 + m->chunk < m->r ? r0 + m->chunk : m->r;
        for (int64_t i0 = 0; i0 < m->t; i0 += F64MM_TOKENS) /* the chunk's rows stay in L2 across the passes */
            f64mm_block(m, avx512, row, r0, r1, i0, i0 + F64MM_TOKENS < m->t ? i0 + F64MM_TOKENS : m->t);
    }
}
/* out (t, r) from activations already widened to double */
static int f64_matmul_d(const double *xd, int64_t t, int64_t k, const void *w, int wtype, int64_t r, float *out,
                        int nthreads) {
    f64mm_t m = {0};
    m.x = xd, m.t = t, m.k = k, m.r = r, m.w = w, m.wtype = wtype, m.out = out;
    int n = nthreads < 1 || (double)t * (double)k * (double)r < 65536.0 ? 1 : nthreads;
    if (n > BK_MAX_THREADS) n = BK_MAX_THREADS;
    if (n > r) n = r > 0 ? (int)r : 1;
    m.chunk = r / (16 * n) > 16 ? r / (16 * n) : 16;
    if (t > F64MM_TOKENS && m.chunk > 64) m.chunk = 64; /* the token passes re-read a chunk: keep it in L2 */
    atomic_init(&m.next, 0);
    atomic_init(&m.err, 0);
    bk_parallel(f64mm_task, &m, n);
    return atomic_load(&m.err) ? BK_ENOMEM : 0;
}

int bk_f64_matmul(int wtype, const float *x, int64_t t, int64_t k, const void *w, int64_t r, float *out,
                  int nthreads) {
    if (!x || !w || !out || t < 0 || k < 0 || r < 0 || (wtype != BK_F16 && wtype != BK_F32)) return BK_EBADARG;
    double *xd = (double *)malloc(sizeof(double) * (size_t)(t * k + 1));
    if (!xd) return BK_ENOMEM;
    for (int64_t i = 0; i < t * k; i++) xd[i] = (double)x[i];
    int rc = f64_matmul_d(xd, t, k, w, wtype, r, out, nthreads);
    free(xd);
    return rc;
}

/* ---------------------------------------------------------------- TQ x Q8_K as a GEMM (AVX-512 VNNI) */

#define TQ_MR 4 /* weight rows per pass over the tokens: their codes stay in 16 zmm registers */
#define TQ_TARGET BK_VNNI_TARGET ",f16c"
#define TQ_CHUNK (8 * TQ_MR) /* rows a thread takes at a time */

/* Q8_K activations regrouped for the GEMM: block b of token i at qp + (b * t + i) * 256 in "TQ2 order" (the 64
 * bytes of group n hold values 32n .. 32n+31 then 128+32n .. 128+32n+31: the bytes a TQ2_0 block's qs shifted by
 * 2n yields), its 8 bsums (q summed over [32l, 32l+32)) and dy */
typedef struct {
    int8_t *qp;
    int32_t *bs;
    float *dy;
} tq_acts;

#ifdef BK_X86
typedef struct {
    int type;
    const int8_t *qp;
    const int32_t *bs;
    const float *dy;
    int64_t t, k, r;
    const uint8_t *w;
    float *out;
    atomic_llong next;
    atomic_int err;
} tqg_t;

/* acc += codes x the 64 s8 bytes at p (inline asm: a memory operand, no register copies of acc) */
__attribute__((target(BK_VNNI_TARGET))) static inline __attribute__((always_inline)) __m512i
tq_dpbusd(__m512i acc, __m512i codes, const void *p) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "m"(*(const __m512i *)p));
    return acc;
}

/* the codes of one block in TQ2 order as 4 zmm: TQ2_0 straight from qs; TQ1_0 from its decoded codes */
__attribute__((target(BK_VNNI_TARGET))) static inline __attribute__((always_inline)) void
tq_block_codes(int type, const uint8_t *blk, const uint8_t *dec, __m512i *c) {
    if (type == BK_TQ2_0) {
        const __m512i mask = _mm512_set1_epi8(3);
        __m512i p = _mm512_loadu_si512(blk);
        c[0] = _mm512_and_si512(p, mask);
        c[1] = _mm512_and_si512(_mm512_srli_epi16(p, 2), mask);
        c[2] = _mm512_and_si512(_mm512_srli_epi16(p, 4), mask);
        c[3] = _mm512_and_si512(_mm512_srli_epi16(p, 6), mask);
    } else {
        for (int n = 0; n < 4; n++) c[n] = _mm512_loadu_si512(dec + 64 * n);
    }
}

/* a in the low 8 lanes, b in the high 8 */
__attribute__((target(BK_VNNI_TARGET))) static inline __m512 halves(float a, float b) {
    return _mm512_castpd_ps(
        _mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)), _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}

/* two rows' 16-lane sums (low + high halves: the 8 lanes of ggml's kernel) -> float accumulators of both rows */
__attribute__((target(BK_VNNI_TARGET))) static inline __attribute__((always_inline)) void
tq_epilogue2(__m512i s0, __m512i s1, __m512i bsv, __m512 dyv, __m512 dw01, float *acc) {
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    __m512i lanes = _mm512_add_epi32(_mm512_permutex2var_epi32(s0, lo, s1), _mm512_permutex2var_epi32(s0, hi, s1));
    __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(lanes, bsv));
    _mm512_storeu_ps(acc, _mm512_fmadd_ps(f, _mm512_mul_ps(dyv, dw01), _mm512_loadu_ps(acc)));
}

__attribute__((target(TQ_TARGET))) static void tq_gemm_task(void *ctx, int ith, int nth) {
    (void)ith, (void)nth;
    tqg_t *g = (tqg_t *)ctx;
    const int64_t t = g->t, k = g->k, nb = k / QK_K, bb = g->type == BK_TQ2_0 ? 66 : 54;
    size_t acc_bytes = sizeof(float) * (size_t)(t * TQ_MR * 8), dec_bytes = g->type == BK_TQ2_0 ? 0 : TQ_MR * k;
    char *mem = (char *)bk_scratch(BK_SCRATCH_GEMM, acc_bytes + dec_bytes + 64);
    if (!mem) {
        atomic_store(&g->err, 1);
        return;
    }
    float *acc = (float *)mem; /* (t, TQ_MR, 8) */
    uint8_t *dec = (uint8_t *)mem + acc_bytes;
    const int64_t rb = nb * bb, tile = TQ_MR * rb, pf_lines = (tile / 64 + nb - 1) / nb;
    for (;;) {
        int64_t ch0 = atomic_fetch_add_explicit(&g->next, TQ_CHUNK, memory_order_relaxed);
        if (ch0 >= g->r) break;
        int64_t ch1 = ch0 + TQ_CHUNK < g->r ? ch0 + TQ_CHUNK : g->r;
        for (int64_t r0 = ch0; r0 < ch1; r0 += TQ_MR) {
            /* the next tile's bytes, a few lines per block (4 interleaved row streams defeat the prefetcher) */
            const char *pf = r0 + 2 * TQ_MR <= g->r ? (const char *)g->w + (r0 + TQ_MR) * rb : NULL;
            const uint8_t *rows[TQ_MR];
            for (int u = 0; u < TQ_MR; u++) /* past the last row: compute the last one again, store nothing */
                rows[u] = g->w + (r0 + u < g->r ? r0 + u : g->r - 1) * nb * bb;
            if (g->type != BK_TQ2_0)
                for (int u = 0; u < TQ_MR; u++)
                    for (int64_t b = 0; b < nb; b++) {
                        uint8_t nat[QK_K];
                        bk_tq_codes(g->type, rows[u] + b * bb, nat);
                        uint8_t *o = dec + u * k + b * QK_K;
                        for (int n = 0; n < 4; n++)
                            for (int h = 0; h < 2; h++) memcpy(o + 64 * n + 32 * h, nat + 128 * h + 32 * n, 32);
                    }
            memset(acc, 0, acc_bytes);
            for (int64_t b = 0; b < nb; b++) {
                __m512i c0[4], c1[4], c2[4], c3[4];
                tq_block_codes(g->type, rows[0] + b * bb, dec + 0 * k + b * QK_K, c0);
                tq_block_codes(g->type, rows[1] + b * bb, dec + 1 * k + b * QK_K, c1);
                tq_block_codes(g->type, rows[2] + b * bb, dec + 2 * k + b * QK_K, c2);
                tq_block_codes(g->type, rows[3] + b * bb, dec + 3 * k + b * QK_K, c3);
                float dw[TQ_MR];
                for (int u = 0; u < TQ_MR; u++) {
                    uint16_t h;
                    memcpy(&h, rows[u] + b * bb + bb - 2, 2); /* the block's f16 scale, last (vcvtph2ps: exact) */
                    dw[u] = _cvtsh_ss(h);
                }
                const __m512 dw01 = halves(dw[0], dw[1]), dw23 = halves(dw[2], dw[3]);
                if (pf)
                    for (int64_t l = b * pf_lines; l < (b + 1) * pf_lines && 64 * l < tile; l++)
                        _mm_prefetch(pf + 64 * l, _MM_HINT_T0);
                const int8_t *qb = g->qp + b * t * QK_K;
                const int32_t *bsb = g->bs + b * t * 8;
                const float *dyb = g->dy + b * t;
                for (int64_t i = 0; i < t; i++) {
                    const int8_t *q = qb + i * QK_K;
                    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
                    for (int n = 0; n < 4; n++) {
                        s0 = tq_dpbusd(s0, c0[n], q + 64 * n);
                        s1 = tq_dpbusd(s1, c1[n], q + 64 * n);
                        s2 = tq_dpbusd(s2, c2[n], q + 64 * n);
                        s3 = tq_dpbusd(s3, c3[n], q + 64 * n);
                    }
                    __m512i bsv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(bsb + 8 * i)));
                    __m512 dyv = _mm512_set1_ps(dyb[i]);
                    tq_epilogue2(s0, s1, bsv, dyv, dw01, acc + i * TQ_MR * 8);
                    tq_epilogue2(s2, s3, bsv, dyv, dw23, acc + i * TQ_MR * 8 + 16);
                }
            }
            for (int64_t i = 0; i < t; i++)
                for (int u = 0; u < TQ_MR && r0 + u < g->r; u++) {
                    const float *a = acc + (i * TQ_MR + u) * 8;
                    g->out[i * g->r + r0 + u] = ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]));
                }
        }
    }
}
#endif

/* ---------------------------------------------------------------- the layer */

/* one projection input, prepared once for every product that reads it */
typedef struct {
    const float *x;
    int64_t t, k;
    int q8;   /* q, d (and for the GEMM qp, bs, dy) hold its Q8_K quantization */
    int wide; /* 0: xd not made; BK_F32 + 1: xd = x; BK_F16 + 1: xd = x rounded to f16 */
    int8_t *q;
    float *d;
    tq_acts a;
    double *xd;
} input_t;

typedef struct {
    input_t *in;
    int gemm;
} prep_t;

static void q8_rows(void *arg, int64_t i0, int64_t i1) {
    const prep_t *p = (const prep_t *)arg;
    input_t *in = p->in;
    int64_t k = in->k, nb = k / QK_K, t = in->t;
    bk_quantize_q8_k(in->x + i0 * k, i1 - i0, k, in->q + i0 * k, in->d + i0 * nb);
    if (!p->gemm) return;
    for (int64_t i = i0; i < i1; i++)
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *src = in->q + i * k + b * QK_K;
            int8_t *dst = in->a.qp + (b * t + i) * QK_K;
            for (int n = 0; n < 4; n++)
                for (int h = 0; h < 2; h++) memcpy(dst + 64 * n + 32 * h, src + 128 * h + 32 * n, 32);
            int32_t *bs = in->a.bs + (b * t + i) * 8;
            for (int l = 0; l < 8; l++) {
                int32_t s = 0;
                for (int e = 0; e < 32; e++) s += src[32 * l + e];
                bs[l] = s;
            }
            in->a.dy[b * t + i] = in->d[i * nb + b];
        }
}

static void wide_rows(void *arg, int64_t i0, int64_t i1) {
    const input_t *in = (const input_t *)arg;
    for (int64_t j = i0 * in->k; j < i1 * in->k; j++) {
        float v = in->x[j];
        if (in->wide == BK_F16 + 1) v = bk_f16_bits_to_f32(bk_f32_to_f16_bits(v));
        in->xd[j] = (double)v;
    }
}

static int use_gemm(void) {
#ifdef BK_X86
    return bk_current_isa() == ISA_VNNI;
#else
    return 0;
#endif
}

typedef struct {
    float *out;
    int64_t r;
    float s;
} scale_t;

static void scale_rows(void *arg, int64_t i0, int64_t i1) {
    const scale_t *a = (const scale_t *)arg;
    for (int64_t j = i0 * a->r; j < i1 * a->r; j++) a->out[j] = a->out[j] * a->s;
}

static int project(const bk_llama_layer *L, int p, input_t *in, int64_t rows, float *out, int nthreads) {
    int type = L->type[p], rc = 0;
    if (type == BK_TQ1_0 || type == BK_TQ2_0) {
        if (in->k % QK_K) return BK_EBADK;
        int gemm = use_gemm();
        if (!in->q8) {
            prep_t pr = {in, gemm};
            bk_for_rows(q8_rows, &pr, in->t, nthreads);
            in->q8 = 1;
        }
#ifdef BK_X86
        if (gemm) {
            tqg_t g = {0};
            g.type = type, g.qp = in->a.qp, g.bs = in->a.bs, g.dy = in->a.dy;
            g.t = in->t, g.k = in->k, g.r = rows, g.w = (const uint8_t *)L->w[p], g.out = out;
            atomic_init(&g.next, 0);
            atomic_init(&g.err, 0);
            int n = nthreads < 1 ? 1 : (nthreads > BK_MAX_THREADS ? BK_MAX_THREADS : nthreads);
            if ((int64_t)n * TQ_MR > rows) n = (int)((rows + TQ_MR - 1) / TQ_MR);
            bk_parallel(tq_gemm_task, &g, n);
            rc = atomic_load(&g.err) ? BK_ENOMEM : 0;
        } else
#endif
            rc = bk_tq_dot(type, in->q, in->d, in->t, in->k, (const uint8_t *)L->w[p], rows, out, nthreads);
    } else if (type == BK_F16 || type == BK_F32) {
        if (in->wide != type + 1) {
            in->wide = type + 1;
            bk_for_rows(wide_rows, in, in->t, nthreads);
        }
        rc = f64_matmul_d(in->xd, in->t, in->k, L->w[p], BK_F32, rows, out, nthreads);
    } else {
        return BK_EBADARG;
    }
    if (rc) return rc;
    if (L->out_scale[p] != 1.0f) {
        scale_t s = {out, rows, L->out_scale[p]};
        bk_for_rows(scale_rows, &s, in->t, nthreads);
    }
    return 0;
}

static input_t make_input(const float *x, int64_t t, int64_t k, char **mem) {
    input_t in = {0};
    in.x = x, in.t = t, in.k = k;
    int64_t nb = k / QK_K;
    in.q = (int8_t *)*mem;
    in.a.qp = in.q + t * k;
    in.a.bs = (int32_t *)(in.a.qp + t * k);
    in.d = (float *)(in.a.bs + t * nb * 8);
    in.a.dy = in.d + t * nb;
    in.xd = (double *)(((uintptr_t)(in.a.dy + t * nb) + 63) & ~(uintptr_t)63);
    return in;
}

int bk_llama_cpp_layer(const bk_llama_layer *L, float *x, int64_t t, int64_t s_len, float *kc, float *vc,
                       const float *cos, const float *sin, int last_only, int nthreads) {
    if (!L || !x || !kc || !vc || !cos || !sin || t < 1 || s_len < t || s_len > L->n_ctx || L->heads < 1 ||
        L->kv_heads < 1 || L->heads % L->kv_heads || L->head_dim < 64 || L->head_dim % 64 ||
        L->hidden != L->heads * L->head_dim || L->ffn < 1)
        return BK_EBADARG;
    int any_float = 0;
    for (int p = 0; p < 7; p++) {
        if (L->type[p] == BK_TQ1_0 || L->type[p] == BK_TQ2_0) {
            if (L->hidden % QK_K || L->ffn % QK_K) return BK_EBADK;
        } else if (L->type[p] == BK_F16 || L->type[p] == BK_F32) {
            any_float = 1;
        } else {
            return BK_EBADARG;
        }
    }
    int64_t n = L->hidden, nf = L->ffn, kvd = L->kv_heads * L->head_dim, wide = nf > n ? nf : n;
    /* floats: h, qf, kf, vf, att, gate, up; one input's buffers: q, qp (bytes), bs (int32), d, dy, xd */
    size_t acts = (size_t)(t * wide) * 2 + sizeof(int32_t) * (size_t)(t * (wide / QK_K) * 8) +
                  2 * sizeof(float) * (size_t)(t * (wide / QK_K) + 1) + 64 +
                  (any_float ? sizeof(double) * (size_t)(t * wide) : 0);
    size_t nbytes = sizeof(float) * (size_t)(t * (3 * n + 2 * kvd + 2 * nf)) + acts + 64;
    char *mem = (char *)bk_scratch(BK_SCRATCH_LAYER, nbytes);
    if (!mem) return BK_ENOMEM;
    float *h = (float *)mem, *qf = h + t * n, *kf = qf + t * n, *vf = kf + t * kvd, *att = vf + t * kvd;
    float *gate = att + t * n, *up = gate + t * nf;
    char *amem = (char *)(((uintptr_t)(up + t * nf) + 63) & ~(uintptr_t)63);
    int rc = 0;
#define TRY(call)            \
    do {                     \
        if ((rc = (call))) { \
            goto done;       \
        }                    \
    } while (0)

    /* attention */
    bk_rms_norm(x, t, n, L->attn_norm, L->eps, h, nthreads);
    input_t in = make_input(h, t, n, &amem);
    TRY(project(L, P_Q, &in, n, qf, nthreads));
    TRY(project(L, P_K, &in, kvd, kf, nthreads));
    TRY(project(L, P_V, &in, kvd, vf, nthreads));
    bk_rope(qf, t, L->heads, L->head_dim, cos, sin, nthreads);
    bk_rope(kf, t, L->kv_heads, L->head_dim, cos, sin, nthreads);
    int64_t p0 = s_len - t;
    memcpy(kc + p0 * kvd, kf, sizeof(float) * (size_t)(t * kvd));
    memcpy(vc + p0 * kvd, vf, sizeof(float) * (size_t)(t * kvd));
    TRY(bk_attention_f32(qf, t, L->heads, L->kv_heads, L->head_dim, kc, vc, s_len, att, nthreads));
    bk_rms_norm(att, t, n, L->attn_sub_norm, L->eps, h, nthreads);
    in = make_input(h, t, n, &amem);
    TRY(project(L, P_O, &in, n, qf, nthreads));
    for (int64_t j = 0; j < t * n; j++) x[j] = x[j] + qf[j];

    /* llama.cpp's last layer keeps only the rows whose logits are asked for before the FFN */
    int64_t tf = t;
    if (last_only && t > 1) {
        memmove(x, x + (t - 1) * n, sizeof(float) * (size_t)n);
        tf = 1;
    }

    /* feed-forward: relu(gate)^2 * up, or silu(gate) * up */
    bk_rms_norm(x, tf, n, L->ffn_norm, L->eps, h, nthreads);
    in = make_input(h, tf, n, &amem);
    TRY(project(L, P_GATE, &in, nf, gate, nthreads));
    TRY(project(L, P_UP, &in, nf, up, nthreads));
    if (L->silu)
        bk_silu_mul(gate, up, tf * nf);
    else
        bk_relu2_mul(gate, up, tf * nf);
    bk_rms_norm(gate, tf, nf, L->ffn_sub_norm, L->eps, up, nthreads);
    in = make_input(up, tf, nf, &amem);
    TRY(project(L, P_DOWN, &in, n, qf, nthreads));
    for (int64_t j = 0; j < tf * n; j++) x[j] = x[j] + qf[j];
#undef TRY
done:
    return rc;
}
