/* ggml's non-flash attention over an F32 KV cache (x86 AVX-512 build), as bitnet_ref's llama-cpp profile computes
 * it: bit for bit the numpy definition Model._attention_ggml (kv_cache "f32", head_dim % 64 == 0). Per query row
 * (query head hq reads KV head hq / (heads / kv_heads)):
 *   KQ        ggml_vec_dot_f32 of the query and each visible key: 4x16 float32 lanes (the first 64 products
 *             rounded, then one FMA per product), (a0+a2)+(a1+a3), _mm512_reduce_add_ps; times 1/sqrtf(d)
 *   soft_max  bk_softmax_ggml (bk_attention.c): ggml's expf, 16-value chunk sums added in a double
 *   KQV       llamafile's sgemm lanes: key s goes to lane s % 16 of a float32 FMA accumulator per output column,
 *             keys in order, then _mm512_reduce_add_ps
 * Masked (future) keys have probability 0 and are skipped (a +0 product changes no accumulator, which never holds
 * -0), unless a new V row holds an inf or NaN: then 0 * inf = NaN must reach the sums, and every key is taken. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>
#endif

static float reduce16(const float *s) {
    float a[8], b[4];
    for (int l = 0; l < 8; l++) a[l] = s[8 + l] + s[l];
    for (int l = 0; l < 4; l++) b[l] = a[4 + l] + a[l];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* ggml_vec_dot_f32, d % 64 == 0 */
static float dot_f32_portable(const float *q, const float *k, int64_t d) {
    float acc[64];
    for (int l = 0; l < 64; l++) acc[l] = q[l] * k[l];
    for (int64_t c = 64; c < d; c += 64)
        for (int l = 0; l < 64; l++) acc[l] = fmaf(q[c + l], k[c + l], acc[l]);
    float s16[16];
    for (int l = 0; l < 16; l++) s16[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
    return reduce16(s16);
}

/* acc[(s % 16) * d + j] = fma(p[s], v_s[j], ...) over keys s in [0, n), v_s = v + s * vs */
static void kqv_lanes_portable(const float *p, const float *v, int64_t vs, int64_t n, int64_t d, float *acc) {
    for (int64_t s = 0; s < n; s++) {
        float *a = acc + (s & 15) * d;
        const float *vr = v + s * vs;
        for (int64_t j = 0; j < d; j++) a[j] = fmaf(p[s], vr[j], a[j]);
    }
}

#ifdef BK_X86
__attribute__((target("avx512f"))) static float dot_f32_avx512(const float *q, const float *k, int64_t d) {
    __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(q + 16), _mm512_loadu_ps(k + 16));
    __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(q + 32), _mm512_loadu_ps(k + 32));
    __m512 a3 = _mm512_mul_ps(_mm512_loadu_ps(q + 48), _mm512_loadu_ps(k + 48));
    for (int64_t c = 64; c < d; c += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(k + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 16), _mm512_loadu_ps(k + c + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 32), _mm512_loadu_ps(k + c + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 48), _mm512_loadu_ps(k + c + 48), a3);
    }
    float s16[16];
    _mm512_storeu_ps(s16, _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    return reduce16(s16);
}

__attribute__((target("avx512f"))) static void kqv_lanes_avx512(const float *p, const float *v, int64_t vs, int64_t n,
                                                               int64_t d, float *acc) {
    int64_t d16 = d & ~(int64_t)15;
    for (int64_t s = 0; s < n; s++) {
        float *a = acc + (s & 15) * d;
        const float *vr = v + s * vs;
        __m512 ps = _mm512_set1_ps(p[s]);
        for (int64_t j = 0; j < d16; j += 16)
            _mm512_storeu_ps(a + j, _mm512_fmadd_ps(ps, _mm512_loadu_ps(vr + j), _mm512_loadu_ps(a + j)));
        for (int64_t j = d16; j < d; j++) a[j] = fmaf(p[s], vr[j], a[j]);
    }
}
#endif

typedef struct {
    float (*dot)(const float *q, const float *k, int64_t d);
    void (*kqv)(const float *p, const float *v, int64_t vs, int64_t n, int64_t d, float *acc);
    const float *q, *kc, *vc;
    float *out;
    int64_t t, heads, kvh, g, d, s_len, sp, items;
    float scale;
    const unsigned char *v_bad; /* per KV head: a new V row holds an inf or NaN */
    char *scratch;
    size_t stride;
    atomic_llong next;
} att32_t;

/* work items: (query row, query head), the latest (most expensive) rows first */
static void att32_task(void *ctx, int ith, int nth) {
    (void)nth;
    att32_t *a = (att32_t *)ctx;
    float *w = (float *)(a->scratch + (size_t)ith * a->stride), *acc = w + a->sp;
    const int64_t d = a->d, kvd = a->kvh * d;
    for (;;) {
        int64_t i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (i >= a->items) break;
        int64_t ti = a->t - 1 - i / a->heads, hq = i % a->heads, h = hq / a->g;
        int64_t nvis = a->s_len - a->t + ti + 1, ns = (nvis + 15) & ~(int64_t)15;
        const float *qr = a->q + (ti * a->heads + hq) * d;
        for (int64_t s = 0; s < nvis; s++) w[s] = a->dot(qr, a->kc + s * kvd + h * d, d) * a->scale;
        bk_softmax_ggml(w, nvis, ns);
        /* keys past s_len are the definition's zero padding: with probability 0 they change nothing */
        int64_t nk = a->v_bad[h] ? a->s_len : nvis;
        for (int64_t s = ns; s < nk; s++) w[s] = 0.0f; /* masked cells past the softmax's chunks */
        memset(acc, 0, sizeof(float) * 16 * (size_t)d);
        a->kqv(w, a->vc + h * d, kvd, nk, d, acc);
        float *o = a->out + (ti * a->heads + hq) * d;
        for (int64_t j = 0; j < d; j++) {
            float s16[16];
            for (int l = 0; l < 16; l++) s16[l] = acc[l * d + j];
            o[j] = reduce16(s16);
        }
    }
}

int bk_attention_f32(const float *q, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const float *kc,
                     const float *vc, int64_t s_len, float *out, int nthreads) {
    if (!q || !kc || !vc || !out || t < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || d < 64 || d % 64 ||
        s_len < t || t > INT64_MAX / heads || s_len > INT64_MAX / 64)
        return BK_EBADARG;
    att32_t a = {0};
    a.dot = dot_f32_portable, a.kqv = kqv_lanes_portable;
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) a.dot = dot_f32_avx512, a.kqv = kqv_lanes_avx512;
#endif
    a.q = q, a.kc = kc, a.vc = vc, a.out = out;
    a.t = t, a.heads = heads, a.kvh = kv_heads, a.g = heads / kv_heads, a.d = d, a.s_len = s_len;
    a.sp = (s_len + 15) & ~(int64_t)15;
    a.scale = 1.0f / sqrtf((float)d);
    a.items = heads * t;
    double work = (double)heads * (double)t * (double)s_len * (double)d;
    int n = nthreads < 1 || work < 65536.0 ? 1 : nthreads;
    if (n > BK_MAX_THREADS) n = BK_MAX_THREADS;
    if (n > a.items) n = (int)a.items;
    a.stride = (sizeof(float) * (size_t)(a.sp + 16 * d) + 63) & ~(size_t)63;
    char *mem = (char *)bk_scratch(BK_SCRATCH_ATTENTION, (size_t)n * a.stride + (size_t)kv_heads + 64);
    if (!mem) return BK_ENOMEM;
    a.scratch = mem;
    unsigned char *bad = (unsigned char *)(mem + (size_t)n * a.stride);
    memset(bad, 0, (size_t)kv_heads);
    if (t > 1) /* only the t new rows can be masked */
        for (int64_t s = s_len - t; s < s_len; s++)
            for (int64_t h = 0; h < kv_heads; h++)
                for (int64_t j = 0; j < d; j++)
                    if (!isfinite(vc[(s * kv_heads + h) * d + j])) bad[h] = 1;
    a.v_bad = bad;
    atomic_init(&a.next, 0);
    bk_parallel(att32_task, &a, n);
    return 0;
}
