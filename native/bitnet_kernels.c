/* bitnet-crossval native kernels (see bitnet_kernels.h). One build runs on any x86-64 (and other) CPU:
 * the SIMD variants are compiled with target attributes and chosen at run time. */
#include "bitnet_kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define BK_X86 1
#include <immintrin.h>
#endif

#define QK_I2S 128
#define QK_K 256

/* ---------------------------------------------------------------- activation quantizers */

int bk_quantize_i8_s(const float *x, int64_t t, int64_t k, int8_t *q, float *s, int32_t *sums) {
    if (t < 0 || k < 0) return BK_EBADARG;
    for (int64_t i = 0; i < t; i++) {
        const float *row = x + i * k;
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
            q[i * k + j] = (int8_t)v;
            sum += (int8_t)v;
        }
        s[i] = sc;
        sums[i] = sum;
    }
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

#define BK_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512vnni"
__attribute__((target(BK_VNNI_TARGET))) static int32_t i2s_dot_vnni(const uint8_t *w, const int8_t *q,
                                                                    int64_t nb) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i acc = _mm512_setzero_si512();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) { /* two blocks: 64 packed bytes */
        __m512i p = _mm512_loadu_si512((const void *)(w + 32 * b));
        const int8_t *q0 = q + QK_I2S * b, *q1 = q0 + QK_I2S;
        for (int g = 0; g < 4; g++) {
            __m512i c = _mm512_and_si512(_mm512_srli_epi16(p, 6 - 2 * g), mask);
            __m512i qv = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(q0 + 32 * g))),
                _mm256_loadu_si256((const __m256i *)(q1 + 32 * g)), 1);
            acc = _mm512_dpbusd_epi32(acc, c, qv); /* u8 x s8, 4 products into int32, no saturation */
        }
    }
    int32_t sum = _mm512_reduce_add_epi32(acc);
    if (b < nb) {
        const __m256i m = _mm256_set1_epi8(3);
        __m256i a = _mm256_setzero_si256();
        __m256i p = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
        const int8_t *q0 = q + QK_I2S * b;
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
__attribute__((target("avx2"))) static void tq_lanes_avx2(const uint8_t *codes, const int8_t *qb, int32_t *lanes) {
    BK_TQ_LANES_BODY
}
__attribute__((target(BK_VNNI_TARGET))) static void tq_lanes_vnni(const uint8_t *codes, const int8_t *qb,
                                                                  int32_t *lanes) {
    BK_TQ_LANES_BODY
}
#endif
typedef void (*tq_lanes_fn)(const uint8_t *codes, const int8_t *qb, int32_t *lanes);

/* ---------------------------------------------------------------- dispatch */

enum { ISA_AUTO = -1, ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };
static const char *ISA_NAMES[] = {"portable", "avx2", "avx512-vnni"};
static int g_isa = ISA_AUTO;

static int isa_supported(int isa) {
#ifdef BK_X86
    __builtin_cpu_init();
    if (isa == ISA_VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2");
#endif
    return isa == ISA_PORTABLE;
}

static int current_isa(void) {
    if (g_isa == ISA_AUTO) g_isa = isa_supported(ISA_VNNI) ? ISA_VNNI : isa_supported(ISA_AVX2) ? ISA_AVX2 : ISA_PORTABLE;
    return g_isa;
}

const char *bk_isa(void) { return ISA_NAMES[current_isa()]; }

int bk_set_isa(const char *name) {
    if (strcmp(name, "auto") == 0) {
        g_isa = ISA_AUTO;
        return 0;
    }
    for (int i = 0; i < 3; i++)
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
    return i2s_dot_portable;
}

static tq_lanes_fn tq_fn(void) {
#ifdef BK_X86
    switch (current_isa()) {
    case ISA_VNNI: return tq_lanes_vnni;
    case ISA_AVX2: return tq_lanes_avx2;
    }
#endif
    return tq_lanes_portable;
}

/* ---------------------------------------------------------------- threads: output rows split in ranges */

typedef struct {
    int kind; /* 0: i2s, 1: tq */
    int type;
    i2s_dot_fn dot;
    tq_lanes_fn lanes;
    const int8_t *q;
    const int32_t *bsums; /* tq: (t, nb, 8) */
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

static void *job_main(void *arg) {
    job_t *j = (job_t *)arg;
    if (j->kind == 0) run_i2s(j); else run_tq(j);
    return NULL;
}

#define BK_MAX_THREADS 256

static void run_split(job_t base, int nthreads) {
    /* small products are not worth a thread start */
    if (nthreads < 1 || base.r * base.k * base.t < (1 << 18)) nthreads = 1;
    if (nthreads > BK_MAX_THREADS) nthreads = BK_MAX_THREADS;
    if (nthreads > base.r) nthreads = (int)(base.r > 0 ? base.r : 1);
    job_t jobs[BK_MAX_THREADS];
    pthread_t tid[BK_MAX_THREADS];
    int started[BK_MAX_THREADS];
    for (int i = 0; i < nthreads; i++) {
        jobs[i] = base;
        jobs[i].r0 = base.r * i / nthreads;
        jobs[i].r1 = base.r * (i + 1) / nthreads;
        started[i] = 0;
    }
    for (int i = 1; i < nthreads; i++) started[i] = pthread_create(&tid[i], NULL, job_main, &jobs[i]) == 0;
    job_main(&jobs[0]);
    for (int i = 1; i < nthreads; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
        else job_main(&jobs[i]); /* could not start a thread: do its share here */
    }
}

static int i2s_common(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                      int nthreads, i2s_dot_fn dot) {
    if (t < 0 || k < 0 || r < 0) return BK_EBADARG;
    if (k % QK_I2S) return BK_EBADK;
    job_t j = {0};
    j.kind = 0;
    j.dot = dot;
    j.q = q, j.t = t, j.k = k, j.r = r, j.w = w, j.out = out;
    run_split(j, nthreads);
    return 0;
}

int bk_i2s_raw(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out, int nthreads) {
    return i2s_common(q, t, k, w, r, out, nthreads, i2s_fn());
}

int bk_i2s_raw_wrap16(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                      int nthreads) {
    return i2s_common(q, t, k, w, r, out, nthreads, i2s_dot_wrap16);
}

int bk_tq_lanes(int type, const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                int nthreads) {
    if (t < 0 || k < 0 || r < 0 || (type != BK_TQ1_0 && type != BK_TQ2_0)) return BK_EBADARG;
    if (k % QK_K) return BK_EBADK;
    int64_t nb = k / QK_K;
    int32_t *bsums = (int32_t *)malloc(sizeof(int32_t) * (size_t)(t * nb * 8 + 1));
    if (!bsums) return BK_EBADARG;
    for (int64_t i = 0; i < t * nb; i++)
        for (int l = 0; l < 8; l++) {
            int32_t s = 0;
            for (int e = 0; e < 32; e++) s += q[i * QK_K + 32 * l + e];
            bsums[i * 8 + l] = s;
        }
    job_t j = {0};
    j.kind = 1;
    j.type = type;
    j.lanes = tq_fn();
    j.q = q, j.bsums = bsums, j.t = t, j.k = k, j.r = r, j.w = w, j.out = out;
    run_split(j, nthreads);
    free(bsums);
    return 0;
}
