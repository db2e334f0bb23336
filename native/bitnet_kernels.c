/* bitnet-crossval native kernels (see bitnet_kernels.h). One build runs on any x86-64 (and other) CPU:
 * the SIMD variants are compiled with target attributes and chosen at run time. */
#include "bitnet_kernels.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------- activation quantizers */

/* one row of quantize_row_i8_s: q, its scale and the sum of q */
static void quantize_i8_s_row(const float *row, int64_t k, int8_t *q, float *s, int32_t *sums) {
    double mx = 1e-5; /* bitnet.cpp: max starts at 1e-5, |x| compared in double */
    for (int64_t j = 0; j < k; j++) {
        double a = fabs((double)row[j]);
        if (a > mx) mx = a;
    }
    float sc = (float)(127.0 / mx);
    int32_t sum = 0;
    for (int64_t j = 0; j < k; j++) {
        float v = nearbyintf(row[j] * sc); /* float product, round half to even */
        v = v > 127.0f ? 127.0f : (v < -128.0f ? -128.0f : v);
        q[j] = (int8_t)v;
        sum += (int8_t)v;
    }
    *s = sc;
    *sums = sum;
}

#ifdef BK_X86
/* the same with AVX-512: the float max of |x| is the double max (widening is monotonic; max_ps keeps the
 * running max when x is NaN, as the scalar compare does), roundscale is round-half-even like nearbyintf */
__attribute__((target("avx512f,avx512bw"))) static void quantize_i8_s_row_avx512(const float *row, int64_t k,
                                                                                int8_t *q, float *s, int32_t *sums) {
    __m512 m = _mm512_setzero_ps();
    int64_t j = 0, body = k & ~(int64_t)15;
    for (; j < body; j += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(row + j)), m);
    double mx = 1e-5;
    float m16[16];
    _mm512_storeu_ps(m16, m);
    for (int l = 0; l < 16; l++)
        if ((double)m16[l] > mx) mx = m16[l];
    for (; j < k; j++)
        if (fabs((double)row[j]) > mx) mx = fabs((double)row[j]);
    float sc = (float)(127.0 / mx);
    const __m512 vs = _mm512_set1_ps(sc), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-128.0f);
    __m512i acc = _mm512_setzero_si512();
    for (j = 0; j < body; j += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(row + j), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i iv = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(v, hi), lo));
        _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtepi32_epi8(iv));
        acc = _mm512_add_epi32(acc, iv);
    }
    int32_t sum = _mm512_reduce_add_epi32(acc);
    for (; j < k; j++) {
        float v = nearbyintf(row[j] * sc);
        v = v > 127.0f ? 127.0f : (v < -128.0f ? -128.0f : v);
        q[j] = (int8_t)v;
        sum += (int8_t)v;
    }
    *s = sc;
    *sums = sum;
}
#endif

int bk_quantize_i8_s(const float *x, int64_t t, int64_t k, int8_t *q, float *s, int32_t *sums) {
    if (t < 0 || k < 0) return BK_EBADARG;
    void (*row_fn)(const float *, int64_t, int8_t *, float *, int32_t *) = quantize_i8_s_row;
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) row_fn = quantize_i8_s_row_avx512;
#endif
    for (int64_t i = 0; i < t; i++) row_fn(x + i * k, k, q + i * k, s + i, sums + i);
    return 0;
}

int bk_quantize_q8_k(const float *x, int64_t t, int64_t k, int8_t *q, float *d) {
    if (t < 0 || k < 0) return BK_EBADARG;
    if (k % QK_K) return BK_EBADK;
    int64_t nb = k / QK_K;
    for (int64_t i = 0; i < t * nb; i++) {
        const float *b = x + i * QK_K;
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            float a = fabsf(b[j]);
            if (a > amax) { amax = a; mx = b[j]; } /* the first value of largest magnitude */
        }
        if (amax == 0.0f) {
            d[i] = 0.0f;
            memset(q + i * QK_K, 0, QK_K);
            continue;
        }
        float iscale = -127.0f / mx;
        for (int j = 0; j < QK_K; j++) {
            float v = nearbyintf(iscale * b[j]);
            q[i * QK_K + j] = (int8_t)(v > 127.0f ? 127.0f : v);
        }
        d[i] = 1.0f / iscale;
    }
    return 0;
}

/* ---------------------------------------------------------------- I2_S row dots */

typedef int32_t (*i2s_dot_fn)(const uint8_t *w, const int8_t *q, int64_t nb);

static int32_t i2s_dot_portable(const uint8_t *w, const int8_t *q, int64_t nb) {
    int32_t sum = 0;
    for (int64_t b = 0; b < nb; b++, w += 32, q += QK_I2S) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++) {
            int p = w[j];
            s += ((p >> 6) & 3) * q[j] + ((p >> 4) & 3) * q[j + 32] + ((p >> 2) & 3) * q[j + 64] + (p & 3) * q[j + 96];
        }
        sum += s;
    }
    return sum;
}

#ifdef BK_X86
__attribute__((target("avx2"))) static int32_t i2s_dot_avx2(const uint8_t *w, const int8_t *q, int64_t nb) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        /* maddubs pairs are <= 2*2*128 = 512 (no saturation); 4 per block, 8 blocks: |int16| <= 16384 */
        __m256i s16 = _mm256_setzero_si256();
        int64_t b1 = b0 + 8 < nb ? b0 + 8 : nb;
        for (int64_t b = b0; b < b1; b++) {
            __m256i p = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
            const int8_t *qb = q + QK_I2S * b;
            __m256i c0 = _mm256_and_si256(_mm256_srli_epi16(p, 6), mask);
            __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
            __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(p, 2), mask);
            __m256i c3 = _mm256_and_si256(p, mask);
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)qb)));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(qb + 32))));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(qb + 64))));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(qb + 96))));
        }
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s16, ones)); /* widen before it can wrap */
    }
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
    return _mm_cvtsi128_si32(r);
}

/* acc += u8 codes x the 64 s8 bytes at p, in place (inline asm: GCC copies the accumulator of
 * _mm512_dpbusd_epi32 around each use in this loop) */
__attribute__((target(BK_VNNI_TARGET))) static inline __attribute__((always_inline)) __m512i
dpbusd_mem(__m512i acc, __m512i codes, const __m512i *p) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "m"(*p));
    return acc;
}

/* one row against activations in "pair order" (vnni_pair_order): per pair of blocks, for each 2-bit group g the 32
 * q values of the first block then the 32 of the second, so one 64-byte load serves a group of both blocks; an
 * odd last block stays in natural order */
__attribute__((target(BK_VNNI_TARGET))) static int32_t i2s_dot_vnni(const uint8_t *w, const int8_t *qp,
                                                                    int64_t nb) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0; /* one per group: independent chains */
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) { /* two blocks: 64 packed bytes */
        __m512i p = _mm512_loadu_si512((const void *)(w + 32 * b));
        const __m512i *qb = (const __m512i *)(qp + QK_I2S * b);
        a0 = dpbusd_mem(a0, _mm512_and_si512(_mm512_srli_epi16(p, 6), mask), qb);
        a1 = dpbusd_mem(a1, _mm512_and_si512(_mm512_srli_epi16(p, 4), mask), qb + 1);
        a2 = dpbusd_mem(a2, _mm512_and_si512(_mm512_srli_epi16(p, 2), mask), qb + 2);
        a3 = dpbusd_mem(a3, _mm512_and_si512(p, mask), qb + 3);
    }
    int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
    if (b < nb) {
        const __m256i m = _mm256_set1_epi8(3);
        __m256i a = _mm256_setzero_si256();
        __m256i p = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
        const int8_t *q0 = qp + QK_I2S * b;
        for (int g = 0; g < 4; g++) {
            __m256i c = _mm256_and_si256(_mm256_srli_epi16(p, 6 - 2 * g), m);
            a = _mm256_dpbusd_epi32(a, c, _mm256_loadu_si256((const __m256i *)(q0 + 32 * g)));
        }
        __m128i r = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
        r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
        sum += _mm_cvtsi128_si32(r);
    }
    return sum;
}

/* q (t, k) -> pair order, row by row (see i2s_dot_vnni) */
static void vnni_pair_order(const int8_t *q, int64_t t, int64_t k, int8_t *qp) {
    int64_t nb = k / QK_I2S;
    for (int64_t i = 0; i < t; i++, q += k, qp += k) {
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2)
            for (int g = 0; g < 4; g++) {
                memcpy(qp + QK_I2S * b + 64 * g, q + QK_I2S * b + 32 * g, 32);
                memcpy(qp + QK_I2S * b + 64 * g + 32, q + QK_I2S * (b + 1) + 32 * g, 32);
            }
        if (b < nb) memcpy(qp + QK_I2S * b, q + QK_I2S * b, QK_I2S);
    }
}

#endif

/* bitnet.cpp's AVX2 kernel accumulates its 16 int16 lanes (bytes 2l, 2l+1 of each 32-value group) over up
 * to 32 blocks before widening: model the wrap modulo 2^16, portably. */
static int32_t i2s_dot_wrap16(const uint8_t *w, const int8_t *q, int64_t nb) {
    int32_t sum = 0;
    for (int64_t b0 = 0; b0 < nb; b0 += 32) {
        int64_t b1 = b0 + 32 < nb ? b0 + 32 : nb;
        int32_t lanes[16] = {0};
        for (int64_t b = b0; b < b1; b++) {
            const uint8_t *wb = w + 32 * b;
            const int8_t *qb = q + QK_I2S * b;
            for (int j = 0; j < 32; j++) {
                int p = wb[j];
                lanes[j / 2] += ((p >> 6) & 3) * qb[j] + ((p >> 4) & 3) * qb[j + 32] + ((p >> 2) & 3) * qb[j + 64] +
                                (p & 3) * qb[j + 96];
            }
        }
        for (int l = 0; l < 16; l++) sum += (int16_t)(uint16_t)(uint32_t)lanes[l];
    }
    return sum;
}

/* ---------------------------------------------------------------- TQ lanes */

static const uint8_t POW3[5] = {1, 3, 9, 27, 81};

/* the 256 codes (value + 1, 0..2; TQ2_0's unused code 3 stays 3) of one block */
static void tq_codes(int type, const uint8_t *blk, uint8_t *c) {
    if (type == BK_TQ2_0) {
        for (int h = 0; h < 2; h++)
            for (int n = 0; n < 4; n++)
                for (int m = 0; m < 32; m++) c[128 * h + 32 * n + m] = (blk[32 * h + m] >> (2 * n)) & 3;
        return;
    }
    /* TQ1_0: qs[0..32) 5 trits each (values 32n+m), qs[32..48) (160+16n+m), qh[4] 4 trits (240+4n+m) */
    for (int n = 0; n < 5; n++) {
        for (int m = 0; m < 32; m++) c[32 * n + m] = (uint8_t)(((uint16_t)(uint8_t)(blk[m] * POW3[n]) * 3) >> 8);
        for (int m = 0; m < 16; m++)
            c[160 + 16 * n + m] = (uint8_t)(((uint16_t)(uint8_t)(blk[32 + m] * POW3[n]) * 3) >> 8);
    }
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) c[240 + 4 * n + m] = (uint8_t)(((uint16_t)(uint8_t)(blk[48 + m] * POW3[n]) * 3) >> 8);
}

void bk_tq_codes(int type, const uint8_t *blk, uint8_t *c) { tq_codes(type, blk, c); }

/* one (token, row) block: 8 lanes of sum code*q over v%32 in [4l, 4l+4) (bsums subtracted by the caller) */
#define BK_TQ_LANES_BODY                                                                                     \
    for (int l = 0; l < 8; l++) {                                                                            \
        int32_t s = 0;                                                                                       \
        for (int c = 0; c < 8; c++)                                                                          \
            for (int e = 0; e < 4; e++) s += codes[32 * c + 4 * l + e] * qb[32 * c + 4 * l + e];            \
        lanes[l] = s;                                                                                        \
    }

static void tq_lanes_portable(const uint8_t *codes, const int8_t *qb, int32_t *lanes) { BK_TQ_LANES_BODY }
#ifdef BK_X86
/* lane l of a 32-value group is the 4 products of bytes 4l..4l+3: exactly a 256-bit u8 x s8 dot into int32 lanes
 * (codes <= 3: no int16 saturation in maddubs) */
__attribute__((target("avx2"))) static void tq_lanes_avx2(const uint8_t *codes, const int8_t *qb, int32_t *lanes) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
        __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(codes + 32 * c)),
                                         _mm256_loadu_si256((const __m256i *)(qb + 32 * c)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    _mm256_storeu_si256((__m256i *)lanes, acc);
}
__attribute__((target(BK_VNNI_TARGET))) static void tq_lanes_vnni(const uint8_t *codes, const int8_t *qb,
                                                                  int32_t *lanes) {
    __m256i acc = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++)
        acc = _mm256_dpbusd_epi32(acc, _mm256_loadu_si256((const __m256i *)(codes + 32 * c)),
                                  _mm256_loadu_si256((const __m256i *)(qb + 32 * c)));
    _mm256_storeu_si256((__m256i *)lanes, acc);
}
#endif
typedef void (*tq_lanes_fn)(const uint8_t *codes, const int8_t *qb, int32_t *lanes);

/* ---------------------------------------------------------------- F16 rows x float32 activations
 *
 * Each output row is widened f16 -> f32 into a per-thread buffer (exact: F16C, AVX-512 or the portable
 * bit conversion give the same floats), then every token's dot product is taken in the profile's order. The
 * per-lane recurrences below are written out lane by lane (no reassociation: -fno-fast-math), so each ISA
 * build vectorizes them across lanes without changing a single rounding. Products of an f16 and an f16 are
 * exact in float32, products of a float32 and an f16 exact in double, so FMA contraction changes nothing. */

float bk_f16_bits_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13); /* inf / nan (payload kept, as vcvtph2ps does) */
    } else if (e != 0) {
        bits = sign | ((e + 112) << 23) | (m << 13);
    } else if (m == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int sh = 0;
        while (!(m & 0x400u)) { m <<= 1; sh++; }
        bits = sign | ((uint32_t)(113 - sh) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

typedef void (*f16_row_fn)(const uint8_t *src, float *dst, int64_t n);

static void f16_row_portable(const uint8_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        dst[i] = bk_f16_bits_to_f32(h);
    }
}

/* ggml_vec_dot_f16 (AVX-512: four 16-lane float32 accumulators over the first k & ~63 products, combined
 * (a0+a2)+(a1+a3), _mm512_reduce_add_ps into a double that adds the rest one at a time), x f16-valued */
#define BK_VEC_DOT_F16_BODY                                                                                  \
    float acc[64];                                                                                           \
    for (int l = 0; l < 64; l++) acc[l] = 0.0f;                                                              \
    int64_t body = k & ~(int64_t)63;                                                                         \
    for (int64_t c = 0; c < body; c += 64)                                                                   \
        for (int l = 0; l < 64; l++) acc[l] = acc[l] + x[c + l] * w[c + l];                                  \
    float s16[16];                                                                                           \
    for (int l = 0; l < 16; l++) s16[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);             \
    double s = (double)reduce16(s16);                                                                        \
    for (int64_t i = body; i < k; i++) s = s + (double)x[i] * (double)w[i];                                  \
    return (float)s;

/* llamafile's tinyBLAS (AVX-512, F16 A x F32 B): one 16-lane float32 accumulator, acc = fmaf(x, w, acc) per
 * 16 values (one rounding, as vfmadd231ps), then _mm512_reduce_add_ps; k % 16 == 0 */
#define BK_GEMM_F16_BODY                                                                                     \
    float acc[16];                                                                                           \
    for (int l = 0; l < 16; l++) acc[l] = 0.0f;                                                              \
    for (int64_t c = 0; c < k; c += 16)                                                                      \
        for (int l = 0; l < 16; l++) acc[l] = fmaf(x[c + l], w[c + l], acc[l]);                              \
    return reduce16(acc);

/* the same for BK_GEMM_NU tokens at once (x rows xs apart): independent accumulator chains hide the FMA
 * latency (BK_GEMM_NU: bk_internal.h) */
#define BK_GEMMN_F16_BODY                                                                                    \
    float acc[BK_GEMM_NU][16];                                                                               \
    for (int u = 0; u < BK_GEMM_NU; u++)                                                                     \
        for (int l = 0; l < 16; l++) acc[u][l] = 0.0f;                                                       \
    for (int64_t c = 0; c < k; c += 16)                                                                      \
        for (int u = 0; u < BK_GEMM_NU; u++)                                                                 \
            for (int l = 0; l < 16; l++) acc[u][l] = fmaf(x[u * xs + c + l], w[c + l], acc[u][l]);           \
    for (int u = 0; u < BK_GEMM_NU; u++) out[u] = reduce16(acc[u]);

/* _mm512_reduce_add_ps: halves, quarters, then (b0+b2)+(b1+b3) */
static inline float reduce16(const float *s) {
    float a[8], b[4];
    for (int l = 0; l < 8; l++) a[l] = s[8 + l] + s[l];
    for (int l = 0; l < 4; l++) b[l] = a[4 + l] + a[l];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef float (*f16_dot_fn)(const float *x, const float *w, int64_t k);

static float vec_dot_f16_portable(const float *x, const float *w, int64_t k) { BK_VEC_DOT_F16_BODY }
static float gemm_f16_portable(const float *x, const float *w, int64_t k) { BK_GEMM_F16_BODY }
typedef void (*f16_dotn_fn)(const float *x, int64_t xs, const float *w, int64_t k, float *out);
static void gemmn_f16_portable(const float *x, int64_t xs, const float *w, int64_t k, float *out) {
    BK_GEMMN_F16_BODY
}

#ifdef BK_X86
__attribute__((target("avx2,f16c"))) static void f16_row_f16c(const uint8_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    f16_row_portable(src + 2 * i, dst + i, n - i);
}
__attribute__((target("avx512f"))) static void f16_row_avx512(const uint8_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * i))));
    f16_row_portable(src + 2 * i, dst + i, n - i);
}
__attribute__((target("avx2,fma"))) static float vec_dot_f16_avx2(const float *x, const float *w, int64_t k) {
    BK_VEC_DOT_F16_BODY
}
__attribute__((target("avx2,fma"))) static float gemm_f16_avx2(const float *x, const float *w, int64_t k) {
    BK_GEMM_F16_BODY
}
__attribute__((target("avx512f"))) static float vec_dot_f16_avx512(const float *x, const float *w, int64_t k) {
    BK_VEC_DOT_F16_BODY
}
__attribute__((target("avx512f"))) static float gemm_f16_avx512(const float *x, const float *w, int64_t k) {
    BK_GEMM_F16_BODY
}
__attribute__((target("avx2,fma"))) static void gemmn_f16_avx2(const float *x, int64_t xs, const float *w, int64_t k,
                                                               float *out) {
    BK_GEMMN_F16_BODY
}
/* explicit AVX-512 form of BK_GEMMN_F16_BODY: one vfmadd231ps per token and 16 values, accumulators in registers */
__attribute__((target("avx512f"))) static void gemmn_f16_avx512(const float *x, int64_t xs, const float *w,
                                                                int64_t k, float *out) {
    __m512 acc[BK_GEMM_NU];
    for (int u = 0; u < BK_GEMM_NU; u++) acc[u] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 16) {
        __m512 wv = _mm512_loadu_ps(w + c);
        for (int u = 0; u < BK_GEMM_NU; u++) acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + u * xs + c), wv, acc[u]);
    }
    for (int u = 0; u < BK_GEMM_NU; u++) {
        float a[16];
        _mm512_storeu_ps(a, acc[u]);
        out[u] = reduce16(a);
    }
}
/* BK_VEC_DOT_F16_BODY reading the f16 row straight from memory (decode: the row is used once, so widening it
 * into a buffer first costs a second pass); the same float32 lanes and order */
__attribute__((target("avx512f"))) static float vec_dot_f16_mem_avx512(const float *x, const uint8_t *w16,
                                                                       int64_t k) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t body = k & ~(int64_t)63;
    for (int64_t c = 0; c < body; c += 64) {
        const __m256i *wp = (const __m256i *)(w16 + 2 * c);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), _mm512_cvtph_ps(_mm256_loadu_si256(wp)), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 16), _mm512_cvtph_ps(_mm256_loadu_si256(wp + 1)), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 32), _mm512_cvtph_ps(_mm256_loadu_si256(wp + 2)), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 48), _mm512_cvtph_ps(_mm256_loadu_si256(wp + 3)), a3);
    }
    float s16[16];
    _mm512_storeu_ps(s16, _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    double s = (double)reduce16(s16);
    for (int64_t i = body; i < k; i++) {
        uint16_t h;
        memcpy(&h, w16 + 2 * i, 2);
        s = s + (double)x[i] * (double)bk_f16_bits_to_f32(h);
    }
    return (float)s;
}
#endif

/* ---------------------------------------------------------------- dispatch */

static const char *ISA_NAMES[] = {"portable", "avx2", "avx512-vnni", "neon"}; /* indexed by ISA_* */
static int g_isa = ISA_AUTO;

static int isa_supported(int isa) {
#ifdef BK_X86
    __builtin_cpu_init();
    if (isa == ISA_VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2");
#endif
#ifdef BK_NEON
    if (isa == ISA_NEON) return 1;
#endif
    return isa == ISA_PORTABLE;
}

static int current_isa(void) {
    if (g_isa == ISA_AUTO)
        g_isa = isa_supported(ISA_VNNI)   ? ISA_VNNI
                : isa_supported(ISA_AVX2) ? ISA_AVX2
                : isa_supported(ISA_NEON) ? ISA_NEON
                                          : ISA_PORTABLE;
    return g_isa;
}

const char *bk_isa(void) { return ISA_NAMES[current_isa()]; }

int bk_current_isa(void) { return current_isa(); }

int bk_set_isa(const char *name) {
    if (strcmp(name, "auto") == 0) {
        g_isa = ISA_AUTO;
        return 0;
    }
    for (int i = 0; i < (int)(sizeof ISA_NAMES / sizeof *ISA_NAMES); i++)
        if (strcmp(name, ISA_NAMES[i]) == 0) {
            if (!isa_supported(i)) return -1;
            g_isa = i;
            return 0;
        }
    return -1;
}

static i2s_dot_fn i2s_fn(void) {
#ifdef BK_X86
    switch (current_isa()) {
    case ISA_VNNI: return i2s_dot_vnni;
    case ISA_AVX2: return i2s_dot_avx2;
    }
#endif
#ifdef BK_NEON
    if (current_isa() == ISA_NEON) return bk_neon_has_dotprod() ? bk_i2s_dot_neon_dp : bk_i2s_dot_neon;
#endif
    return i2s_dot_portable;
}

typedef struct {
    f16_row_fn row;
    f16_dot_fn dot[2]; /* BK_F16_VEC_DOT, BK_F16_GEMM */
    f16_dotn_fn gemmn;
} f16_fns;

static f16_fns f16_fn(void) {
    f16_fns f = {f16_row_portable, {vec_dot_f16_portable, gemm_f16_portable}, gemmn_f16_portable};
#ifdef BK_X86
    switch (current_isa()) {
    case ISA_VNNI:
        f.row = f16_row_avx512, f.dot[0] = vec_dot_f16_avx512, f.dot[1] = gemm_f16_avx512;
        f.gemmn = gemmn_f16_avx512;
        break;
    case ISA_AVX2:
        if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
            f.row = f16_row_f16c, f.dot[0] = vec_dot_f16_avx2, f.dot[1] = gemm_f16_avx2;
        if (f.row == f16_row_f16c) f.gemmn = gemmn_f16_avx2;
        break;
    }
#endif
#ifdef BK_NEON
    if (current_isa() == ISA_NEON)
        f.row = bk_f16_row_neon, f.dot[0] = bk_vec_dot_f16_neon, f.dot[1] = bk_gemm_f16_neon,
        f.gemmn = bk_gemmn_f16_neon;
#endif
    return f;
}

static tq_lanes_fn tq_fn(void) {
#ifdef BK_X86
    switch (current_isa()) {
    case ISA_VNNI: return tq_lanes_vnni;
    case ISA_AVX2: return tq_lanes_avx2;
    }
#endif
    return tq_lanes_portable; /* also for neon: NEON is AArch64's baseline, so the compiler vectorizes it */
}

/* ---------------------------------------------------------------- threads: output rows split in ranges */

typedef struct {
    int kind; /* 0: i2s, 1: tq lanes, 2: f16, 3: tq dot */
    int err;
    f16_fns f16;
    int mode;
    const float *x;
    float *fout;
    int type;
    i2s_dot_fn dot;
    tq_lanes_fn lanes;
    const int8_t *q;
    const int32_t *bsums; /* tq: (t, nb, 8) */
    const float *dy;      /* tq dot: the Q8_K block scales (t, nb) */
    int fma_hw;           /* tq dot: the CPU has FMA (fmaf inlined) */
    int64_t t, k, r0, r1, r;
    const uint8_t *w;
    int32_t *out;
} job_t;

static void run_i2s(const job_t *j) {
    int64_t nb = j->k / QK_I2S, rb = j->k / 4;
    for (int64_t r = j->r0; r < j->r1; r++)
        for (int64_t t = 0; t < j->t; t++) j->out[t * j->r + r] = j->dot(j->w + r * rb, j->q + t * j->k, nb);
}

static void run_tq(const job_t *j) {
    int64_t nb = j->k / QK_K;
    int64_t bb = j->type == BK_TQ2_0 ? 66 : 54;
    uint8_t codes[QK_K];
    for (int64_t r = j->r0; r < j->r1; r++)
        for (int64_t b = 0; b < nb; b++) {
            tq_codes(j->type, j->w + (r * nb + b) * bb, codes);
            for (int64_t t = 0; t < j->t; t++) {
                int32_t *o = j->out + ((t * j->r + r) * nb + b) * 8;
                j->lanes(codes, j->q + t * j->k + b * QK_K, o);
                const int32_t *bs = j->bsums + (t * nb + b) * 8;
                for (int l = 0; l < 8; l++) o[l] -= bs[l];
            }
        }
}

/* ggml's float32 epilogue of the TQ x Q8_K dot over one row's lanes (per token, 8 lanes a block):
 * acc = fma(lane, dy * dw, acc) block after block, then hsum_float_8 ((s0+s4)+(s2+s6)) + ((s1+s5)+(s3+s7)) */
#define BK_TQ_DOT_BODY                                                                                      \
    int64_t nb = j->k / QK_K, bb = j->type == BK_TQ2_0 ? 66 : 54;                                           \
    uint8_t codes[QK_K];                                                                                     \
    int32_t lanes[8];                                                                                        \
    for (int64_t r = j->r0; r < j->r1; r++) {                                                                \
        for (int64_t i = 0; i < 8 * j->t; i++) acc[i] = 0.0f;                                               \
        for (int64_t b = 0; b < nb; b++) {                                                                   \
            const uint8_t *blk = j->w + (r * nb + b) * bb;                                                   \
            uint16_t h;                                                                                      \
            memcpy(&h, blk + bb - 2, 2); /* d: the block's f16 scale, last */                               \
            float dw = bk_f16_bits_to_f32(h);                                                                   \
            tq_codes(j->type, blk, codes);                                                                   \
            for (int64_t t = 0; t < j->t; t++) {                                                             \
                j->lanes(codes, j->q + t * j->k + b * QK_K, lanes);                                          \
                const int32_t *bs = j->bsums + (t * nb + b) * 8;                                             \
                float d = j->dy[t * nb + b] * dw;                                                            \
                for (int l = 0; l < 8; l++) acc[8 * t + l] = fmaf((float)(lanes[l] - bs[l]), d, acc[8 * t + l]); \
            }                                                                                                \
        }                                                                                                    \
        for (int64_t t = 0; t < j->t; t++) {                                                                 \
            const float *a = acc + 8 * t;                                                                    \
            j->fout[t * j->r + r] = ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]));       \
        }                                                                                                    \
    }

static void tq_dot_rows(const job_t *j, float *acc) { BK_TQ_DOT_BODY }
#ifdef BK_X86
__attribute__((target("fma"))) static void tq_dot_rows_fma(const job_t *j, float *acc) { BK_TQ_DOT_BODY }
#endif

static void run_tq_dot(job_t *j) {
    float *acc = (float *)malloc(sizeof(float) * (size_t)(8 * j->t + 1));
    if (!acc) {
        j->err = 1;
        return;
    }
#ifdef BK_X86
    if (j->fma_hw) tq_dot_rows_fma(j, acc);
    else
#endif
        tq_dot_rows(j, acc);
    free(acc);
}

static void run_f16(job_t *j) {
    if (j->r1 <= j->r0) return;
    float *row = (float *)malloc(sizeof(float) * (size_t)(j->k + 1));
    if (!row) {
        j->err = 1;
        return;
    }
    f16_dot_fn dot = j->f16.dot[j->mode];
#ifdef BK_X86
    if (j->mode == BK_F16_VEC_DOT && j->t == 1 && j->f16.row == f16_row_avx512) {
        for (int64_t r = j->r0; r < j->r1; r++) j->fout[r] = vec_dot_f16_mem_avx512(j->x, j->w + 2 * r * j->k, j->k);
        free(row);
        return;
    }
#endif
    for (int64_t r = j->r0; r < j->r1; r++) {
        j->f16.row(j->w + 2 * r * j->k, row, j->k);
        int64_t t = 0;
        if (j->mode == BK_F16_GEMM)
            for (float o[BK_GEMM_NU]; t + BK_GEMM_NU <= j->t; t += BK_GEMM_NU) {
                j->f16.gemmn(j->x + t * j->k, j->k, row, j->k, o);
                for (int u = 0; u < BK_GEMM_NU; u++) j->fout[(t + u) * j->r + r] = o[u];
            }
        for (; t < j->t; t++) j->fout[t * j->r + r] = dot(j->x + t * j->k, row, j->k);
    }
    free(row);
}

static void *job_main(void *arg) {
    job_t *j = (job_t *)arg;
    if (j->kind == 0) run_i2s(j);
    else if (j->kind == 1) run_tq(j);
    else if (j->kind == 3) run_tq_dot(j);
    else run_f16(j);
    return NULL;
}

/* output rows are handed out in chunks from a shared counter: a thread that lost its core for a moment does
 * not leave the others waiting at the end */
typedef struct {
    const job_t *base;
    int64_t chunk;
    atomic_llong next;
    atomic_int err;
} split_t;

static void split_task(void *ctx, int ith, int nth) {
    (void)ith, (void)nth;
    split_t *sp = (split_t *)ctx;
    job_t j = *sp->base;
    for (;;) {
        int64_t r0 = atomic_fetch_add_explicit(&sp->next, sp->chunk, memory_order_relaxed);
        if (r0 >= j.r) break;
        j.r0 = r0;
        j.r1 = r0 + sp->chunk < j.r ? r0 + sp->chunk : j.r;
        job_main(&j);
        if (j.err) atomic_store(&sp->err, 1);
    }
}

static int run_split(job_t base, int nthreads) {
    /* small products are not worth waking the pool */
    if (nthreads < 1 || base.r * base.k * base.t < (1 << 16)) nthreads = 1;
    if (nthreads > BK_MAX_THREADS) nthreads = BK_MAX_THREADS;
    if (nthreads > base.r) nthreads = (int)(base.r > 0 ? base.r : 1);
    split_t sp = {&base, (base.r / (16 * nthreads) + 15) & ~(int64_t)15, 0, 0};
    if (sp.chunk < 16) sp.chunk = 16;
    bk_parallel(split_task, &sp, nthreads);
    return atomic_load(&sp.err);
}

/* the GEMM (bk_i2s_gemm.c) against one row dot per (token, row), measured on Zen 4: 0.95x at 1 token, faster
 * from 2 on (1.7-2.3x at 2-3 tokens, 1.3-1.5x at 512 against the 4x4 tiles it replaced) */
#define BK_I2S_USE_GEMM(t) ((t) >= 2)

static int i2s_common(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                      int nthreads, i2s_dot_fn dot) {
    if (t < 0 || k < 0 || r < 0) return BK_EBADARG;
    if (k % QK_I2S) return BK_EBADK;
#ifdef BK_X86
    if (dot == i2s_dot_vnni && BK_I2S_USE_GEMM(t))
        return bk_i2s_gemm_vnni(q, t, k, w, r, out, nthreads);
#endif
    int8_t *qp = NULL;
#ifdef BK_X86
    if (dot == i2s_dot_vnni) { /* its activations in pair order */
        qp = (int8_t *)malloc((size_t)(t * k) + 1);
        if (!qp) return BK_ENOMEM;
        vnni_pair_order(q, t, k, qp);
        q = qp;
    }
#endif
    job_t j = {0};
    j.kind = 0;
    j.dot = dot;
    j.q = q, j.t = t, j.k = k, j.r = r, j.w = w, j.out = out;
    run_split(j, nthreads);
    free(qp);
    return 0;
}

int bk_i2s_raw(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out, int nthreads) {
    return i2s_common(q, t, k, w, r, out, nthreads, i2s_fn());
}

/* bk_i2s_raw_many's one region: chunks of every matrix's rows from one counter (matrix m owns chunk indices
 * first[m] .. first[m + 1] - 1) */
typedef struct {
    job_t job[BK_I2S_MANY];
    int64_t chunk[BK_I2S_MANY], first[BK_I2S_MANY + 1];
    int n;
    atomic_llong next;
} many_t;

static void many_task(void *ctx, int ith, int nth) {
    (void)ith, (void)nth;
    many_t *mt = (many_t *)ctx;
    for (int m = 0;;) {
        int64_t i = atomic_fetch_add_explicit(&mt->next, 1, memory_order_relaxed);
        if (i >= mt->first[mt->n]) break;
        while (i >= mt->first[m + 1]) m++; /* the counter only grows: m never goes back */
        job_t j = mt->job[m];
        j.r0 = (i - mt->first[m]) * mt->chunk[m];
        j.r1 = j.r0 + mt->chunk[m] < j.r ? j.r0 + mt->chunk[m] : j.r;
        job_main(&j);
    }
}

int bk_i2s_raw_many(const int8_t *q, int64_t t, int64_t k, int n, const uint8_t *const *w, const int64_t *r,
                    int32_t *const *out, int nthreads) {
    if (n < 1 || n > BK_I2S_MANY || t < 0 || k < 0) return BK_EBADARG;
    i2s_dot_fn dot = i2s_fn();
    int64_t rows = 0;
    for (int m = 0; m < n; m++) {
        if (r[m] < 0) return BK_EBADARG;
        rows += r[m];
    }
#ifdef BK_X86
    int gemm = dot == i2s_dot_vnni && BK_I2S_USE_GEMM(t);
#else
    int gemm = 0;
#endif
    if (gemm || k % QK_I2S || t * k * rows < (1 << 16) || nthreads < 2) { /* one call each */
        for (int m = 0; m < n; m++) {
            int rc = i2s_common(q, t, k, w[m], r[m], out[m], nthreads, dot);
            if (rc) return rc;
        }
        return 0;
    }
    int8_t *qp = NULL;
#ifdef BK_X86
    if (dot == i2s_dot_vnni) { /* its activations in pair order, once for all the matrices */
        qp = (int8_t *)malloc((size_t)(t * k) + 1);
        if (!qp) return BK_ENOMEM;
        vnni_pair_order(q, t, k, qp);
        q = qp;
    }
#endif
    if (nthreads > BK_MAX_THREADS) nthreads = BK_MAX_THREADS;
    many_t mt = {0};
    mt.n = n;
    for (int m = 0; m < n; m++) {
        job_t *j = &mt.job[m];
        j->kind = 0, j->dot = dot, j->q = q, j->t = t, j->k = k, j->r = r[m], j->w = w[m], j->out = out[m];
        int64_t c = (r[m] / (16 * nthreads) + 15) & ~(int64_t)15; /* run_split's chunks */
        mt.chunk[m] = c < 16 ? 16 : c;
        mt.first[m + 1] = mt.first[m] + (r[m] + mt.chunk[m] - 1) / mt.chunk[m];
    }
    atomic_init(&mt.next, 0);
    bk_parallel(many_task, &mt, nthreads);
    free(qp);
    return 0;
}

int bk_i2s_raw_wrap16(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                      int nthreads) {
    return i2s_common(q, t, k, w, r, out, nthreads, i2s_dot_wrap16);
}

/* Q8_K's block sums: for each token and 256-block, the 8 sums of q over [32l, 32l+32); NULL without memory */
static int32_t *tq_bsums(const int8_t *q, int64_t t, int64_t k) {
    int64_t nb = k / QK_K;
    int32_t *bsums = (int32_t *)malloc(sizeof(int32_t) * (size_t)(t * nb * 8 + 1));
    if (!bsums) return NULL;
    for (int64_t i = 0; i < t * nb; i++)
        for (int l = 0; l < 8; l++) {
            int32_t s = 0;
            for (int e = 0; e < 32; e++) s += q[i * QK_K + 32 * l + e];
            bsums[i * 8 + l] = s;
        }
    return bsums;
}

/* the job of a TQ product (kind 1: lanes, 3: dot), its block sums allocated: 0, or the error code */
static int tq_job(job_t *j, int kind, int type, const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r) {
    if (t < 0 || k < 0 || r < 0 || (type != BK_TQ1_0 && type != BK_TQ2_0)) return BK_EBADARG;
    if (k % QK_K) return BK_EBADK;
    int32_t *bsums = tq_bsums(q, t, k);
    if (!bsums) return BK_ENOMEM;
    *j = (job_t){0};
    j->kind = kind, j->type = type, j->lanes = tq_fn();
    j->q = q, j->bsums = bsums, j->t = t, j->k = k, j->r = r, j->w = w;
    return 0;
}

int bk_tq_lanes(int type, const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                int nthreads) {
    job_t j;
    int rc = tq_job(&j, 1, type, q, t, k, w, r);
    if (rc) return rc;
    j.out = out;
    run_split(j, nthreads);
    free((void *)j.bsums);
    return 0;
}

int bk_tq_dot(int type, const int8_t *q, const float *dy, int64_t t, int64_t k, const uint8_t *w, int64_t r,
              float *out, int nthreads) {
    job_t j;
    int rc = tq_job(&j, 3, type, q, t, k, w, r);
    if (rc) return rc;
#ifdef BK_X86
    j.fma_hw = __builtin_cpu_supports("fma");
#endif
    j.dy = dy, j.fout = out;
    int err = run_split(j, nthreads);
    free((void *)j.bsums);
    return err ? BK_ENOMEM : 0;
}

int bk_f16_matmul(int mode, const float *x, int64_t t, int64_t k, const uint8_t *w, int64_t r, float *out,
                  int nthreads) {
    if (t < 0 || k < 0 || r < 0 || (mode != BK_F16_VEC_DOT && mode != BK_F16_GEMM)) return BK_EBADARG;
    if (mode == BK_F16_GEMM && k % 16) return BK_EBADK;
    job_t j = {0};
    j.kind = 2;
    j.mode = mode;
    j.f16 = f16_fn();
    j.x = x, j.t = t, j.k = k, j.r = r, j.w = w, j.fout = out;
    return run_split(j, nthreads) ? BK_ENOMEM : 0;
}
