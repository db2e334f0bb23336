/* I2_S x int8 product for many tokens on AVX-512 VNNI as a register-blocked GEMM (bk_i2s_gemm_vnni in
 * bk_internal.h); the same int32 sums as bk_i2s_raw's other paths (an integer sum: any order).
 *
 * Packed dword jj (bytes 4jj..4jj+3) of a 32-byte block holds values 4jj..4jj+3 of each of the block's four
 * 32-value groups g, at bits 6-2g of its bytes. Per panel of 32 rows those dwords are transposed once to
 * [K/16][32 rows][4 bytes], still packed: one zmm then holds 16 values of 16 rows, and a shift and a mask give
 * the codes of 4 values per row (group g) with each int32 lane a row, so vpdpbusd accumulates whole rows and
 * no horizontal sums are needed. Unpacking in the micro-kernel costs ~14 vector ops per 96 vpdpbusd; unpacking
 * into a buffer instead would write 4x the bytes and cost several tokens' worth of time per panel.
 * Activations are repacked once per call into blocks of up to TB tokens, [K/16][g][tokens][4], in the order the
 * micro-kernel reads them, and each token's 4 values are broadcast from memory. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>

#define PR 32 /* rows per panel: two zmm of int32 lanes */
#define TB 12 /* tokens per micro-kernel call: 2 x 12 accumulators, 2 packed + 2 code registers, the mask */

#define VNNI __attribute__((target(BK_VNNI_TARGET)))

/* v[d] = dword d of the 16 input vectors (one row each), rows in lane order: a 16x16 transpose of dwords */
VNNI static inline __attribute__((always_inline)) void transpose16(__m512i v[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: rows 2i, 2i+1 interleaved by dword */
        a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* b[4i+j], lane L: dword 4L+j of rows 4i..4i+3 */
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) { /* lane L of b[j], b[4+j], b[8+j], b[12+j] into v[4L+j] */
        __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xee);
        __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44);
        __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xee);
        v[j] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        v[4 + j] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
        v[8 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        v[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
    }
}

/* rows [0, nr) of a panel (nr <= 32, rb bytes a row, nb blocks) into buf[K/16 (+8)][32][4]: entry 8b+jj is
 * packed dword jj of block b. Missing rows are zero (code 0); an odd last block fills the spare 8 entries
 * with zeros. */
VNNI static void transpose_panel(const uint8_t *w, int64_t rb, int nr, int64_t nb, uint8_t *buf) {
    for (int64_t b = 0; b < nb; b += 2) {
        __mmask16 lm = b + 1 < nb ? 0xffff : 0x00ff; /* two blocks a load, or the last one */
        for (int h = 0; h < PR / 16; h++) {
            __m512i v[16];
            for (int i = 0; i < 16; i++) {
                int row = 16 * h + i;
                v[i] = row < nr ? _mm512_maskz_loadu_epi32(lm, w + row * rb + 32 * b) : _mm512_setzero_si512();
            }
            transpose16(v);
            for (int d = 0; d < 16; d++) _mm512_store_si512((void *)(buf + PR * 4 * (8 * b + d) + 64 * h), v[d]);
        }
    }
}

/* nt tokens of q (rows k apart) into dst[K/16][4 groups][nt][4]: entry (8b+jj, g) holds values
 * 128b + 32g + 4jj .. +3, the ones that meet group g of packed dword jj of block b */
static void pack_tokens(const int8_t *q, int64_t k, int nt, uint8_t *dst) {
    for (int64_t e = 0; e < k / 16; e++)
        for (int g = 0; g < 4; g++)
            for (int u = 0; u < nt; u++, dst += 4) memcpy(dst, q + u * k + QK_I2S * (e / 8) + 32 * g + 4 * (e % 8), 4);
}

/* acc += u8 codes x the s8 dword at p broadcast ({1to16} memory operand): 4 products per int32 lane.
 * Inline asm because GCC copies the accumulator of _mm512_dpbusd_epi32 twice per use in this loop. */
VNNI static inline __attribute__((always_inline)) __m512i dpbusd_bcast(__m512i acc, __m512i w, const int32_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
    return acc;
}

/* out[u][0..32) (rows ldo apart, lanes masked by m0/m1) = panel . token u for u < NT, over n entries of 16
 * values. The accumulators are named variables, not arrays: GCC keeps arrays of vectors on the stack. */
#define FOR_TB(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define ACC_DECL(u) __m512i a0_##u = _mm512_setzero_si512(), a1_##u = a0_##u;
#define ACC_STEP(u)                                                                                          \
    if (nt > u) {                                                                                            \
        a0_##u = dpbusd_bcast(a0_##u, c0, (const int32_t *)(qg + 4 * u));                                    \
        a1_##u = dpbusd_bcast(a1_##u, c1, (const int32_t *)(qg + 4 * u));                                    \
    }
#define ACC_STORE(u)                                                                                         \
    if (nt > u) {                                                                                            \
        _mm512_mask_storeu_epi32(out + u * ldo, m0, a0_##u);                                                 \
        _mm512_mask_storeu_epi32(out + u * ldo + 16, m1, a1_##u);                                            \
    }
#define TILE_FN(NT)                                                                                          \
    VNNI static void tile_##NT(const uint8_t *wp, const uint8_t *qp, int64_t n, int32_t *out, int64_t ldo,   \
                               __mmask16 m0, __mmask16 m1) {                                                 \
        enum { nt = NT };                                                                                    \
        const __m512i mask = _mm512_set1_epi8(3);                                                            \
        FOR_TB(ACC_DECL)                                                                                     \
        for (int64_t e = 0; e < n; e++, wp += 4 * PR, qp += 16 * nt) {                                       \
            __m512i p0 = _mm512_load_si512((const void *)wp), p1 = _mm512_load_si512((const void *)(wp + 64)); \
            _Pragma("GCC unroll 4") for (int g = 0; g < 4; g++) {                                            \
                __m512i c0 = _mm512_and_si512(_mm512_srli_epi32(p0, 6 - 2 * g), mask);                       \
                __m512i c1 = _mm512_and_si512(_mm512_srli_epi32(p1, 6 - 2 * g), mask);                       \
                const uint8_t *qg = qp + 4 * nt * g;                                                         \
                FOR_TB(ACC_STEP)                                                                             \
            }                                                                                                \
        }                                                                                                    \
        FOR_TB(ACC_STORE)                                                                                    \
    }
TILE_FN(1)
TILE_FN(2)
TILE_FN(3)
TILE_FN(4)
TILE_FN(5)
TILE_FN(6)
TILE_FN(7)
TILE_FN(8)
TILE_FN(9)
TILE_FN(10)
TILE_FN(11)
TILE_FN(12)

typedef void (*tile_fn)(const uint8_t *, const uint8_t *, int64_t, int32_t *, int64_t, __mmask16, __mmask16);
static const tile_fn TILES[TB + 1] = {NULL,   tile_1, tile_2, tile_3,  tile_4,  tile_5, tile_6,
                                      tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

typedef struct {
    const int8_t *q;
    const uint8_t *w;
    int32_t *out;
    int64_t t, k, r, npanel;
    uint8_t *qp;    /* packed tokens: the block from token t0 at qp + t0 * k */
    uint8_t **bufs; /* a panel buffer per task */
    /* work is handed out one token block / panel at a time: a task whose core is busy with other work
     * does not hold up the call (fixed ranges would wait for the slowest thread) */
    atomic_llong next_blk, next_panel;
} gemm_ctx;

static void pack_task(void *arg, int ith, int nth) {
    gemm_ctx *c = (gemm_ctx *)arg;
    (void)ith, (void)nth;
    int64_t nblk = (c->t + TB - 1) / TB;
    for (int64_t i; (i = atomic_fetch_add(&c->next_blk, 1)) < nblk;) {
        int64_t t0 = i * TB;
        int nt = (int)(c->t - t0 < TB ? c->t - t0 : TB);
        pack_tokens(c->q + t0 * c->k, c->k, nt, c->qp + t0 * c->k);
    }
}

static void gemm_task(void *arg, int ith, int nth) {
    gemm_ctx *c = (gemm_ctx *)arg;
    (void)nth;
    int64_t rb = c->k / 4;
    uint8_t *buf = c->bufs[ith];
    for (int64_t p; (p = atomic_fetch_add(&c->next_panel, 1)) < c->npanel;) {
        int64_t r0 = p * PR;
        int nr = (int)(c->r - r0 < PR ? c->r - r0 : PR);
        __mmask16 m0 = (__mmask16)(nr >= 16 ? 0xffff : (1u << nr) - 1);
        __mmask16 m1 = (__mmask16)(nr >= 32 ? 0xffff : nr > 16 ? (1u << (nr - 16)) - 1 : 0);
        transpose_panel(c->w + r0 * rb, rb, nr, c->k / QK_I2S, buf); /* 8*k bytes: stays in L1/L2 */
        for (int64_t t0 = 0; t0 < c->t; t0 += TB) {
            int nt = (int)(c->t - t0 < TB ? c->t - t0 : TB);
            TILES[nt](buf, c->qp + t0 * c->k, c->k / 16, c->out + t0 * c->r + r0, c->r, m0, m1);
        }
    }
}

int bk_i2s_gemm_vnni(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                     int nthreads) {
    if (t < 0 || k < 0 || r < 0) return BK_EBADARG;
    if (k % QK_I2S) return BK_EBADK;
    if (t == 0 || r == 0) return 0;
    if (k == 0) {
        memset(out, 0, sizeof(int32_t) * (size_t)(t * r));
        return 0;
    }
    int64_t npanel = (r + PR - 1) / PR;
    if (nthreads < 1 || r * k * t < (1 << 16)) nthreads = 1; /* small products are not worth waking the pool */
    if (nthreads > BK_MAX_THREADS) nthreads = BK_MAX_THREADS;
    if (nthreads > npanel) nthreads = (int)npanel;
    uint8_t *bufs[BK_MAX_THREADS] = {0};
    /* 64-byte aligned, sizes multiples of 64 (k % 128 == 0); a panel buffer has 8 spare entries */
    uint8_t *qp = (uint8_t *)bk_scratch(BK_SCRATCH_GEMM, (size_t)(t * k));
    int err = qp == NULL;
    for (int i = 0; i < nthreads && !err; i++)
        err = (bufs[i] = (uint8_t *)aligned_alloc(64, (size_t)(PR * 4 * (k / 16 + 8)))) == NULL;
    if (!err) {
        gemm_ctx c = {q, w, out, t, k, r, npanel, qp, bufs, 0, 0};
        bk_parallel(pack_task, &c, t * k < (1 << 20) ? 1 : nthreads); /* a few tokens: no second wake-up */
        bk_parallel(gemm_task, &c, nthreads);
    }
    for (int i = 0; i < nthreads; i++) free(bufs[i]);
    return err ? BK_ENOMEM : 0;
}
#endif
