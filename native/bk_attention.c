/* ggml's non-flash attention over an f16 KV cache (x86 AVX-512 build), as bitnet_ref's bitnet-cpp profile
 * computes it: bit for bit the numpy definition Model._attention_ggml (kv_cache "f16") in bitnet_ref/model.py.
 * Per query row (query head hq reads KV head hq / (heads / kv_heads)):
 *   KQ        ggml_vec_dot_f16 of the f16-rounded query and each visible key (f16 x f16 products are exact in
 *             float32: 4x16 float32 lanes over d & ~63, (a0+a2)+(a1+a3), _mm512_reduce_add_ps, the rest added
 *             in double), times the float32 1/sqrtf(d)
 *   soft_max  the max; ggml's vector expf of x - max; each 16-value chunk reduced in float32 and the chunk sums
 *             added in order into a double; p = e * (float)(1/sum)
 *   KQV       t > 1: llamafile's sgemm, one 16-lane float32 FMA accumulator per output over the keys (padded to
 *             16), then _mm512_reduce_add_ps; t == 1: ggml_vec_dot_f16 of the f16-rounded probabilities and V
 *             over the n_kv cells the graph sees (sgemm declines one row)
 * The float32 FMAs whose product is not exact in float32 (the sgemm's p*v, ggml's expf) are real FMAs (fmaf,
 * vfmadd*ps: one rounding), as ggml's and the numpy definition's _fma. The build disables FMA contraction
 * (build_kernels.py), so nothing else fuses.
 *
 * Masked (future) keys are skipped: their probability is exactly 0, and a zero product changes no float sum here
 * (the accumulators start at +0 and a round-to-nearest sum is -0 only when both terms are), nor do their zero
 * exp chunks change the softmax sum. Non-finite inputs keep the definition's bits too: a KV head whose V holds an
 * inf or NaN runs over every key (t > 1; a decoded row has no masked key), as 0 * inf = NaN reaches the sums; a
 * NaN or -inf max (scores from infinite inputs) gives masked keys an infinite exp, but then the visible keys
 * already make the sum infinite and every probability NaN. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>
#define BK_AVX512 __attribute__((target("avx512f")))
#endif

/* ggml's expf constants, as ggml_ref.py's _EXPF_C */
#define EXP_LOG2E 0x1.715476p+0f
#define EXP_LN2_HI 0x1.62e4p-1f
#define EXP_LN2_LO 0x1.7f7d1cp-20f
#define EXP_C5 0x1.0e4020p-7f
#define EXP_C4 0x1.573e2ep-5f
#define EXP_C3 0x1.555e66p-3f
#define EXP_C2 0x1.fffdb6p-2f
#define EXP_C1 0x1.ffffecp-1f
#define EXP_SHIFT 0x1.8p+23f /* 1.5 * 2^23: adding it rounds to an integer */

#define KQV_TILE 8 /* V columns per sgemm pass: independent FMA chains share each probability load */
#define HG 4       /* prefill: the query heads of one KV head taken together (when they come in fours) */

/* ---------------------------------------------------------------- portable pieces */

/* x rounded to the nearest f16 value (ties to even), as numpy's astype(float16) */
static float round_f16(float x) { return bk_f16_bits_to_f32(bk_f32_to_f16_bits(x)); }

/* ggml_ref.py's ggml_expf, one value */
static float expf_ggml(float x) {
    float n = fmaf(x, EXP_LOG2E, EXP_SHIFT) - EXP_SHIFT;
    float b = fmaf(-n, EXP_LN2_LO, fmaf(-n, EXP_LN2_HI, x));
    float u = b * b;
    float j = fmaf(fmaf(fmaf(EXP_C5, b, EXP_C4), u, fmaf(EXP_C3, b, EXP_C2)), u, fmaf(EXP_C1, b, 1.0f));
    if (!(fabsf(n) <= 192.0f)) return n <= 0.0f ? 0.0f : INFINITY; /* a NaN n (from NaN or inf - inf) gives inf */
    return ldexpf(j, (int)n);
}

/* _mm512_reduce_add_ps: halves, quarters, then (b0+b2)+(b1+b3) */
static float reduce16(const float *s) {
    float a[8], b[4];
    for (int l = 0; l < 8; l++) a[l] = s[8 + l] + s[l];
    for (int l = 0; l < 4; l++) b[l] = a[4 + l] + a[l];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* ggml_vec_dot_f16 of an f16-valued float row and an f16 row (exact products) */
static float dot_f16_portable(const float *q, const uint16_t *k, int64_t d) {
    float acc[64] = {0};
    int64_t body = d & ~(int64_t)63;
    for (int64_t c = 0; c < body; c += 64)
        for (int l = 0; l < 64; l++) acc[l] = acc[l] + q[c + l] * bk_f16_bits_to_f32(k[c + l]);
    float s16[16];
    for (int l = 0; l < 16; l++) s16[l] = (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
    double s = (double)reduce16(s16);
    for (int64_t i = body; i < d; i++) s = s + (double)q[i] * (double)bk_f16_bits_to_f32(k[i]);
    return (float)s;
}

/* soft_max over one row w[0, ns) in place (ns a multiple of 16; w[nvis, ns) are masked): w becomes p */
static void softmax_portable(float *w, int64_t nvis, int64_t ns) {
    float mx = -INFINITY;
    int nan = 0;
    for (int64_t s = 0; s < nvis; s++) {
        if (isnan(w[s])) nan = 1;
        else if (w[s] > mx) mx = w[s];
    }
    if (nan) mx = NAN; /* numpy's max propagates NaN */
    for (int64_t s = nvis; s < ns; s++) w[s] = -INFINITY;
    double sum = 0.0;
    for (int64_t c = 0; c < ns; c += 16) {
        for (int l = 0; l < 16; l++) w[c + l] = expf_ggml(w[c + l] - mx);
        sum += (double)reduce16(w + c);
    }
    float inv = (float)(1.0 / sum);
    for (int64_t s = 0; s < ns; s++) w[s] = w[s] * inv;
}

/* the sgemm lanes of one probability row p (nc chunks of 16) against nd rows of V^T (ld apart), reduced */
static void kqv_portable(const float *p, const float *vt, int64_t ld, int64_t nc, int nd, float *out) {
    for (int j = 0; j < nd; j++) {
        const float *v = vt + j * ld;
        float acc[16] = {0};
        for (int64_t c = 0; c < 16 * nc; c += 16)
            for (int l = 0; l < 16; l++) acc[l] = fmaf(p[c + l], v[c + l], acc[l]);
        out[j] = reduce16(acc);
    }
}

/* decode: the 64 float32 lanes of ggml_vec_dot_f16(pf, V column) for every column at once, over the first nb
 * cells (acc: 64 rows of d, lane l of column dd at acc[l * d + dd]) */
static void vp_lanes_portable(const float *pf, const uint16_t *v, int64_t vs, int64_t nb, int64_t d, float *acc) {
    for (int64_t s = 0; s < nb; s++) {
        float *a = acc + (s & 63) * d;
        const uint16_t *vr = v + s * vs;
        for (int64_t dd = 0; dd < d; dd++) a[dd] = a[dd] + pf[s] * bk_f16_bits_to_f32(vr[dd]);
    }
}

/* decode scores: w[u * ws + s] = dot(q row u, key s) * scale for ng query rows (qs apart) against n keys (ks
 * apart), each dot as ggml_vec_dot_f16 */
static void scores_portable(const float *q, int64_t qs, int ng, const uint16_t *k, int64_t ks, int64_t n, int64_t d,
                            float scale, float *w, int64_t ws) {
    for (int u = 0; u < ng; u++)
        for (int64_t s = 0; s < n; s++) w[u * ws + s] = dot_f16_portable(q + u * qs, k + s * ks, d) * scale;
}

/* decode KQV lanes: for ng probability rows (ps apart), out[u * os + dd] = the 64 float32 lanes of
 * ggml_vec_dot_f16(p row u, V column dd) over the first nb cells, combined as ggml does; acc: 64 * d floats */
static void pv_lanes_portable(const float *p, int64_t ps, int ng, const uint16_t *v, int64_t vs, int64_t nb,
                              int64_t d, float *acc, float *out, int64_t os) {
    for (int u = 0; u < ng; u++) {
        memset(acc, 0, sizeof(float) * 64 * (size_t)d);
        vp_lanes_portable(p + u * ps, v, vs, nb, d, acc);
        for (int64_t dd = 0; dd < d; dd++) {
            float s16[16];
            for (int l = 0; l < 16; l++)
                s16[l] = (acc[l * d + dd] + acc[(32 + l) * d + dd]) + (acc[(16 + l) * d + dd] + acc[(48 + l) * d + dd]);
            out[u * os + dd] = reduce16(s16);
        }
    }
}

/* decode KQV tail: the lane sums r (d floats) plus the cells c0 .. c1 - 1 added in double, in order */
static void pv_tail_portable(const float *r, const float *p, const uint16_t *v, int64_t vs, int64_t c0, int64_t c1,
                             int64_t d, float *out) {
    for (int64_t dd = 0; dd < d; dd++) {
        double sd = (double)r[dd];
        for (int64_t c = c0; c < c1; c++) sd = sd + (double)p[c] * (double)bk_f16_bits_to_f32(v[c * vs + dd]);
        out[dd] = (float)sd;
    }
}

static void f16_row_portable(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = bk_f16_bits_to_f32(src[i]);
}

static void round_f16_portable(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = round_f16(x[i]);
}

/* ---------------------------------------------------------------- AVX-512 */

#ifdef BK_X86
BK_AVX512 static inline float reduce16_avx512(__m512 v) {
    __m256 a = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
                             _mm512_castps512_ps256(v));
    __m128 b = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b)); /* b0+b2, b1+b3 */
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

/* expf_ggml on 16 lanes; scalef is ldexpf's correctly rounded x * 2^n */
BK_AVX512 static __m512 expf_ggml16(__m512 x) {
    const __m512 shift = _mm512_set1_ps(EXP_SHIFT), zero = _mm512_setzero_ps();
    __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(EXP_LOG2E), shift), shift);
    __m512 mn = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(n), _mm512_set1_epi32(INT32_MIN)));
    __m512 b = _mm512_fmadd_ps(mn, _mm512_set1_ps(EXP_LN2_LO), _mm512_fmadd_ps(mn, _mm512_set1_ps(EXP_LN2_HI), x));
    __m512 u = _mm512_mul_ps(b, b);
    __m512 j = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(EXP_C5), b, _mm512_set1_ps(EXP_C4)), u,
                                               _mm512_fmadd_ps(_mm512_set1_ps(EXP_C3), b, _mm512_set1_ps(EXP_C2))),
                               u, _mm512_fmadd_ps(_mm512_set1_ps(EXP_C1), b, _mm512_set1_ps(1.0f)));
    __mmask16 ok = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192.0f), _CMP_LE_OQ);
    __mmask16 le0 = _mm512_cmp_ps_mask(n, zero, _CMP_LE_OQ);
    __m512 big = _mm512_mask_blend_ps(le0, _mm512_set1_ps(INFINITY), zero);
    return _mm512_mask_blend_ps(ok, big, _mm512_scalef_ps(j, n));
}

BK_AVX512 static inline __m512 load_f16x16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

BK_AVX512 static float dot_f16_avx512(const float *q, const uint16_t *k, int64_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t body = d & ~(int64_t)63;
    for (int64_t c = 0; c < body; c += 64) { /* exact products: each FMA is the lane's add */
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load_f16x16(k + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 16), load_f16x16(k + c + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 32), load_f16x16(k + c + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 48), load_f16x16(k + c + 48), a3);
    }
    double s = (double)reduce16_avx512(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    for (int64_t i = body; i < d; i++) s = s + (double)q[i] * (double)bk_f16_bits_to_f32(k[i]);
    return (float)s;
}

/* dot_f16_avx512 with the key widened beforehand (the same floats: every f16 value is a float32) */
BK_AVX512 static float dotf_avx512(const float *q, const float *k, int64_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t body = d & ~(int64_t)63;
    for (int64_t c = 0; c < body; c += 64) { /* exact products: each FMA is the lane's add */
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(k + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 16), _mm512_loadu_ps(k + c + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 32), _mm512_loadu_ps(k + c + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 48), _mm512_loadu_ps(k + c + 48), a3);
    }
    double s = (double)reduce16_avx512(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    for (int64_t i = body; i < d; i++) s = s + (double)q[i] * (double)k[i];
    return (float)s;
}

BK_AVX512 static void softmax_avx512(float *w, int64_t nvis, int64_t ns) {
    for (int64_t s = nvis; s < ns; s++) w[s] = -INFINITY;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t c = 0; c < ns; c += 16) {
        __m512 x = _mm512_loadu_ps(w + c);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        vmx = _mm512_max_ps(vmx, x);
    }
    float mx = nan ? NAN : _mm512_reduce_max_ps(vmx); /* numpy's max propagates NaN; otherwise any order */
    __m512 m = _mm512_set1_ps(mx);
    double sum = 0.0;
    for (int64_t c = 0; c < ns; c += 16) {
        __m512 e = expf_ggml16(_mm512_sub_ps(_mm512_loadu_ps(w + c), m));
        _mm512_storeu_ps(w + c, e);
        sum += (double)reduce16_avx512(e);
    }
    __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
    for (int64_t c = 0; c < ns; c += 16) _mm512_storeu_ps(w + c, _mm512_mul_ps(_mm512_loadu_ps(w + c), inv));
}

/* kqv_portable for nd <= KQV_TILE columns: one 16-lane FMA accumulator per column, in registers */
BK_AVX512 static inline __attribute__((always_inline)) void kqv_tile_avx512(const float *p, const float *vt,
                                                                           int64_t ld, int64_t nc, int nd,
                                                                           float *out) {
    __m512 acc[KQV_TILE];
    for (int j = 0; j < nd; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < 16 * nc; c += 16) {
        __m512 pv = _mm512_loadu_ps(p + c);
        for (int j = 0; j < nd; j++) acc[j] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vt + j * ld + c), acc[j]);
    }
    for (int j = 0; j < nd; j++) out[j] = reduce16_avx512(acc[j]);
}

BK_AVX512 static void kqv_avx512(const float *p, const float *vt, int64_t ld, int64_t nc, int nd, float *out) {
    if (nd == KQV_TILE) kqv_tile_avx512(p, vt, ld, nc, KQV_TILE, out);
    else
        for (int j = 0; j < nd; j++) kqv_tile_avx512(p, vt + j * ld, ld, nc, 1, out + j);
}

/* kqv_tile_avx512 for the 4 query heads that share a KV head, 4 columns: each V^T load serves all four. The 16
 * accumulators are named variables (GCC keeps arrays of vectors on the stack). */
#define KQV4_ROW(u)                                                                                                \
    do {                                                                                                           \
        __m512 pv = _mm512_loadu_ps(p + (u) * ps + c);                                                             \
        a##u##0 = _mm512_fmadd_ps(pv, v0, a##u##0), a##u##1 = _mm512_fmadd_ps(pv, v1, a##u##1);                   \
        a##u##2 = _mm512_fmadd_ps(pv, v2, a##u##2), a##u##3 = _mm512_fmadd_ps(pv, v3, a##u##3);                   \
    } while (0)
#define KQV4_OUT(u)                                                                                                \
    out[(u) * os] = reduce16_avx512(a##u##0), out[(u) * os + 1] = reduce16_avx512(a##u##1),                       \
    out[(u) * os + 2] = reduce16_avx512(a##u##2), out[(u) * os + 3] = reduce16_avx512(a##u##3)
BK_AVX512 static void kqv4_avx512(const float *p, int64_t ps, const float *vt, int64_t ld, int64_t nc, float *out,
                                  int64_t os) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    for (int64_t c = 0; c < 16 * nc; c += 16) {
        __m512 v0 = _mm512_loadu_ps(vt + c), v1 = _mm512_loadu_ps(vt + ld + c);
        __m512 v2 = _mm512_loadu_ps(vt + 2 * ld + c), v3 = _mm512_loadu_ps(vt + 3 * ld + c);
        KQV4_ROW(0);
        KQV4_ROW(1);
        KQV4_ROW(2);
        KQV4_ROW(3);
    }
    KQV4_OUT(0);
    KQV4_OUT(1);
    KQV4_OUT(2);
    KQV4_OUT(3);
}

BK_AVX512 static void f16_row_avx512(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_f16x16(src + i));
    f16_row_portable(src + i, dst + i, n - i);
}

/* scores_portable for NG (<= 4) query rows: each key row is converted once and serves all NG dots. The
 * accumulators are named variables (GCC keeps arrays of vectors on the stack); NG is a constant once inlined, so
 * the rows past it compile away. */
#define SC_FMA(u)                                                                                                  \
    if (NG > (u)) {                                                                                                \
        const float *qu = q + (u) * qs + c;                                                                        \
        a##u##0 = _mm512_fmadd_ps(_mm512_loadu_ps(qu), k0, a##u##0);                                               \
        a##u##1 = _mm512_fmadd_ps(_mm512_loadu_ps(qu + 16), k1, a##u##1);                                          \
        a##u##2 = _mm512_fmadd_ps(_mm512_loadu_ps(qu + 32), k2, a##u##2);                                          \
        a##u##3 = _mm512_fmadd_ps(_mm512_loadu_ps(qu + 48), k3, a##u##3);                                          \
    }
#define SC_OUT(u)                                                                                                  \
    if (NG > (u)) {                                                                                                \
        double sd = (double)reduce16_avx512(_mm512_add_ps(_mm512_add_ps(a##u##0, a##u##2),                          \
                                                          _mm512_add_ps(a##u##1, a##u##3)));                        \
        for (int64_t i = body; i < d; i++) sd = sd + (double)q[(u) * qs + i] * (double)bk_f16_bits_to_f32(kr[i]);  \
        w[(u) * ws + s] = (float)sd * scale;                                                                       \
    }
BK_AVX512 static inline __attribute__((always_inline)) void scores_avx512_n(const float *q, int64_t qs, const int NG,
                                                                           const uint16_t *k, int64_t ks, int64_t n,
                                                                           int64_t d, float scale, float *w,
                                                                           int64_t ws) {
    int64_t body = d & ~(int64_t)63;
    for (int64_t s = 0; s < n; s++) {
        const uint16_t *kr = k + s * ks;
        __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
        for (int64_t c = 0; c < body; c += 64) { /* exact products: each FMA is the lane's add */
            __m512 k0 = load_f16x16(kr + c), k1 = load_f16x16(kr + c + 16);
            __m512 k2 = load_f16x16(kr + c + 32), k3 = load_f16x16(kr + c + 48);
            SC_FMA(0) SC_FMA(1) SC_FMA(2) SC_FMA(3)
        }
        SC_OUT(0) SC_OUT(1) SC_OUT(2) SC_OUT(3)
    }
}
#undef SC_FMA
#undef SC_OUT

BK_AVX512 static void scores_avx512(const float *q, int64_t qs, int ng, const uint16_t *k, int64_t ks, int64_t n,
                                    int64_t d, float scale, float *w, int64_t ws) {
    for (; ng >= 4; ng -= 4, q += 4 * qs, w += 4 * ws) scores_avx512_n(q, qs, 4, k, ks, n, d, scale, w, ws);
    if (ng == 3) scores_avx512_n(q, qs, 3, k, ks, n, d, scale, w, ws);
    if (ng == 2) scores_avx512_n(q, qs, 2, k, ks, n, d, scale, w, ws);
    if (ng == 1) scores_avx512_n(q, qs, 1, k, ks, n, d, scale, w, ws);
}

/* pv_lanes_portable for NG (<= 4) rows and the 16 columns at v (rows vs apart): lane l + 16j (j = 0..3) of the
 * 64 is one register chain (a<j><u>) over the cells l + 16j + 64m in order, each V load serving all NG rows; the
 * lanes are then combined as ggml_vec_dot_f16 does, (l, l+32) + (l+16, l+48) and the 16-way tree, now across
 * registers. buf: NG * 256 floats. */
#define PV_FMA(j, u)                                                                                               \
    if (NG > (u)) a##j##u = _mm512_fmadd_ps(_mm512_set1_ps(p[(u) * ps + s]), vv, a##j##u);
#define PV_ROW(j)                                                                                                  \
    {                                                                                                              \
        __m512 vv = load_f16x16(v + s * vs);                                                                       \
        PV_FMA(j, 0) PV_FMA(j, 1) PV_FMA(j, 2) PV_FMA(j, 3)                                                        \
    }
#define PV_STORE(u)                                                                                                \
    if (NG > (u))                                                                                                  \
        _mm512_storeu_ps(buf + ((u) * 16 + l) * 16,                                                                \
                         _mm512_add_ps(_mm512_add_ps(a0##u, a2##u), _mm512_add_ps(a1##u, a3##u)));
BK_AVX512 static inline __attribute__((always_inline)) void pv16_avx512_n(const float *p, int64_t ps, const int NG,
                                                                         const uint16_t *v, int64_t vs, int64_t nb,
                                                                         float *buf, float *out, int64_t os) {
    int64_t full = nb & ~(int64_t)63;
    for (int l = 0; l < 16; l++) {
        __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
        for (int64_t s0 = l; s0 < full; s0 += 64) { /* exact products: each FMA is the lane's add */
            int64_t s = s0;
            PV_ROW(0)
            s += 16;
            PV_ROW(1)
            s += 16;
            PV_ROW(2)
            s += 16;
            PV_ROW(3)
        }
        int64_t s = full + l; /* the last, partial group of 64 cells */
        if (s < nb) PV_ROW(0)
        s += 16;
        if (s < nb) PV_ROW(1)
        s += 16;
        if (s < nb) PV_ROW(2)
        s += 16;
        if (s < nb) PV_ROW(3)
        PV_STORE(0) PV_STORE(1) PV_STORE(2) PV_STORE(3)
    }
    for (int u = 0; u < NG; u++) {
        const float *b = buf + u * 256;
        __m512 h[8], qd[4];
        for (int l = 0; l < 8; l++) h[l] = _mm512_add_ps(_mm512_loadu_ps(b + (8 + l) * 16), _mm512_loadu_ps(b + l * 16));
        for (int l = 0; l < 4; l++) qd[l] = _mm512_add_ps(h[4 + l], h[l]);
        _mm512_storeu_ps(out + u * os, _mm512_add_ps(_mm512_add_ps(qd[0], qd[2]), _mm512_add_ps(qd[1], qd[3])));
    }
}
#undef PV_FMA
#undef PV_ROW
#undef PV_STORE

BK_AVX512 static void pv_lanes_avx512(const float *p, int64_t ps, int ng, const uint16_t *v, int64_t vs, int64_t nb,
                                      int64_t d, float *acc, float *out, int64_t os) {
    int64_t d16 = d & ~(int64_t)15;
    for (int64_t c = 0; c < d16; c += 16) {
        const float *pu = p;
        float *ou = out + c;
        int n = ng;
        for (; n >= 4; n -= 4, pu += 4 * ps, ou += 4 * os) pv16_avx512_n(pu, ps, 4, v + c, vs, nb, acc, ou, os);
        if (n == 3) pv16_avx512_n(pu, ps, 3, v + c, vs, nb, acc, ou, os);
        if (n == 2) pv16_avx512_n(pu, ps, 2, v + c, vs, nb, acc, ou, os);
        if (n == 1) pv16_avx512_n(pu, ps, 1, v + c, vs, nb, acc, ou, os);
    }
    for (int64_t dd = d16; dd < d; dd++) /* the last columns one by one, as the portable lanes */
        for (int u = 0; u < ng; u++) {
            float lane[64] = {0};
            for (int64_t s = 0; s < nb; s++)
                lane[s & 63] = lane[s & 63] + p[u * ps + s] * bk_f16_bits_to_f32(v[s * vs + dd]);
            float s16[16];
            for (int l = 0; l < 16; l++) s16[l] = (lane[l] + lane[32 + l]) + (lane[16 + l] + lane[48 + l]);
            out[u * os + dd] = reduce16(s16);
        }
}

/* pv_tail_portable on 8 columns at a time in double */
BK_AVX512 static void pv_tail_avx512(const float *r, const float *p, const uint16_t *v, int64_t vs, int64_t c0,
                                     int64_t c1, int64_t d, float *out) {
    int64_t d8 = d & ~(int64_t)7;
    for (int64_t dd = 0; dd < d8; dd += 8) {
        __m512d sd = _mm512_cvtps_pd(_mm256_loadu_ps(r + dd));
        for (int64_t c = c0; c < c1; c++) {
            __m256i h8 = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(v + c * vs + dd)));
            __m512d vv = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_cvtph_ps(h8)));
            sd = _mm512_add_pd(sd, _mm512_mul_pd(_mm512_set1_pd((double)p[c]), vv));
        }
        _mm256_storeu_ps(out + dd, _mm512_cvtpd_ps(sd));
    }
    if (d8 < d) pv_tail_portable(r + d8, p, v + d8, vs, c0, c1, d - d8, out + d8);
}

/* x rounded to f16 values (vcvtps2ph, round to nearest even) */
BK_AVX512 static void round_f16_avx512(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_loadu_ps(x + i),
                                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    round_f16_portable(x + i, n - i);
}
#endif

/* ---------------------------------------------------------------- dispatch, work items */

typedef struct {
    float (*dot)(const float *q, const uint16_t *k, int64_t d);
    void (*softmax)(float *w, int64_t nvis, int64_t ns);
    void (*kqv)(const float *p, const float *vt, int64_t ld, int64_t nc, int nd, float *out);
    /* kqv for 4 query heads (p rows ps apart, outputs os apart) x 4 columns at once, or NULL */
    void (*kqv4)(const float *p, int64_t ps, const float *vt, int64_t ld, int64_t nc, float *out, int64_t os);
    /* dot against a key already widened to float32 (prefill), or NULL */
    float (*dotf)(const float *q, const float *k, int64_t d);
    /* decode (t == 1): a KV head's scores, KQV lanes and double tail for several query heads at once */
    void (*scores)(const float *q, int64_t qs, int ng, const uint16_t *k, int64_t ks, int64_t n, int64_t d,
                   float scale, float *w, int64_t ws);
    void (*pv_lanes)(const float *p, int64_t ps, int ng, const uint16_t *v, int64_t vs, int64_t nb, int64_t d,
                     float *acc, float *out, int64_t os);
    void (*pv_tail)(const float *r, const float *p, const uint16_t *v, int64_t vs, int64_t c0, int64_t c1, int64_t d,
                    float *out);
    void (*f16_row)(const uint16_t *src, float *dst, int64_t n);
    void (*round_f16)(float *x, int64_t n);
} att_fns;

static att_fns att_fn(void) {
    att_fns f = {dot_f16_portable,  softmax_portable, kqv_portable,     NULL,
                 NULL,              scores_portable,  pv_lanes_portable, pv_tail_portable,
                 f16_row_portable,  round_f16_portable};
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) /* implies AVX-512F, all these need */
        f = (att_fns){dot_f16_avx512, softmax_avx512, kqv_avx512,      kqv4_avx512,    dotf_avx512, scores_avx512,
                      pv_lanes_avx512, pv_tail_avx512, f16_row_avx512, round_f16_avx512};
#endif
    return f;
}

typedef struct {
    att_fns fn;
    const float *q;
    const uint16_t *kc, *vc;
    float *out;
    int64_t t, heads, kvh, g, d, s_len, sp, n_kv;
    int hg; /* query heads per work item (one KV head's): see bk_attention_f16 */
    float scale;
    float *vt;            /* t > 1: (kvh, d, sp) V transposed, zero past s_len */
    float *kf;            /* t > 1 with fn.dotf: (kvh, s_len, d) K widened to float32 */
    unsigned char *v_bad; /* t > 1: per KV head, V holds an inf or NaN */
    char *scratch;        /* per task: scratch_stride bytes */
    size_t scratch_stride;
    int64_t items;
    atomic_llong next;
} att_t;

/* per task scratch, for the hm = max(HG, hg) query heads an item takes at most: w (hm * sp floats), q16 (hm * d
 * floats), and when t == 1 r (hm * d floats: the KQV lane sums) and acc (max(64 * d, 1024) floats) */
static void task_scratch(const att_t *a, int ith, float **w, float **q16, float **r, float **acc) {
    int64_t hm = a->hg > HG ? a->hg : HG;
    *w = (float *)(a->scratch + (size_t)ith * a->scratch_stride);
    *q16 = *w + hm * a->sp;
    *r = *q16 + hm * a->d;
    *acc = *r + hm * a->d;
}

/* t > 1: V^T (float32) for the sgemm lanes, one KV head per step */
static void transpose_v_task(void *ctx, int ith, int nth) {
    att_t *a = (att_t *)ctx;
    float *w, *q16, *r, *acc;
    task_scratch(a, ith, &w, &q16, &r, &acc);
    for (int64_t h = ith; h < a->kvh; h += nth) {
        float *vt = a->vt + h * a->d * a->sp;
        unsigned char bad = 0;
        for (int64_t s = 0; s < a->s_len; s++) {
            const uint16_t *vr = a->vc + (s * a->kvh + h) * a->d;
            a->fn.f16_row(vr, q16, a->d);
            for (int64_t dd = 0; dd < a->d; dd++) {
                bad |= (vr[dd] & 0x7c00u) == 0x7c00u;
                vt[dd * a->sp + s] = q16[dd];
            }
        }
        for (int64_t dd = 0; dd < a->d; dd++)
            for (int64_t s = a->s_len; s < a->sp; s++) vt[dd * a->sp + s] = 0.0f;
        a->v_bad[h] = bad;
        if (a->kf)
            for (int64_t s = 0; s < a->s_len; s++)
                a->fn.f16_row(a->kc + (s * a->kvh + h) * a->d, a->kf + (h * a->s_len + s) * a->d, a->d);
    }
}

/* t == 1, one work item: query heads hq0 .. hq0 + hg - 1 of one KV head, whose K and V rows are read once for
 * all of them (the row sees every key: no masked cell). Per head, the scores, the soft_max, the probabilities
 * rounded to f16, ggml_vec_dot_f16's 64 float32 lanes over the first nb = min(n_kv & ~63, s_len) cells, and the
 * cells from n_kv & ~63 to s_len added in double (cells past s_len hold zeros on both sides, as do the lanes'
 * cells from s_len to n_kv & ~63: products that change no sum) */
static void decode_task(void *ctx, int ith, int nth) {
    (void)nth;
    att_t *a = (att_t *)ctx;
    float *w, *q16, *r, *acc;
    task_scratch(a, ith, &w, &q16, &r, &acc);
    const int64_t d = a->d, kvd = a->kvh * d, hg = a->hg, s_len = a->s_len, sp = a->sp, ns = (s_len + 15) & ~15;
    const int64_t body = a->n_kv & ~(int64_t)63, nb = body < s_len ? body : s_len;
    for (;;) {
        int64_t i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (i >= a->items) break;
        int64_t hq0 = i * hg, h = hq0 / a->g;
        const uint16_t *kh = a->kc + h * d, *vh = a->vc + h * d;
        memcpy(q16, a->q + hq0 * d, sizeof(float) * (size_t)(hg * d));
        a->fn.round_f16(q16, hg * d);
        a->fn.scores(q16, d, (int)hg, kh, kvd, s_len, d, a->scale, w, sp);
        for (int64_t u = 0; u < hg; u++) {
            a->fn.softmax(w + u * sp, s_len, ns);
            a->fn.round_f16(w + u * sp, s_len);
        }
        a->fn.pv_lanes(w, sp, (int)hg, vh, kvd, nb, d, acc, r, d);
        for (int64_t u = 0; u < hg; u++) a->fn.pv_tail(r + u * d, w + u * sp, vh, kvd, body, s_len, d, a->out + (hq0 + u) * d);
    }
}

/* t > 1, one work item: query heads hq0 .. hq0 + hg - 1 (one KV head) of query row ti; the most expensive (latest)
 * rows are handed out first */
static void attention_task(void *ctx, int ith, int nth) {
    (void)nth;
    att_t *a = (att_t *)ctx;
    float *w, *q16, *r, *acc;
    task_scratch(a, ith, &w, &q16, &r, &acc);
    (void)r, (void)acc;
    const int64_t d = a->d, kvd = a->kvh * a->d, hg = a->hg, groups = a->heads / hg;
    for (;;) {
        int64_t i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (i >= a->items) break;
        int64_t ti = a->t - 1 - i / groups, hq0 = (i % groups) * hg, h = hq0 / a->g;
        int64_t nvis = a->s_len - a->t + ti + 1, ns = (nvis + 15) & ~(int64_t)15;
        memcpy(q16, a->q + (ti * a->heads + hq0) * d, sizeof(float) * (size_t)(hg * d));
        a->fn.round_f16(q16, hg * d);
        for (int64_t u = 0; u < hg; u++) {
            const float *qu = q16 + u * d;
            float *wu = w + u * a->sp;
            if (a->kf) {
                const float *kh = a->kf + h * a->s_len * d;
                for (int64_t s = 0; s < nvis; s++) wu[s] = a->fn.dotf(qu, kh + s * d, d) * a->scale;
            } else {
                for (int64_t s = 0; s < nvis; s++) wu[s] = a->fn.dot(qu, a->kc + s * kvd + h * d, d) * a->scale;
            }
        }
        for (int64_t u = 0; u < hg; u++) a->fn.softmax(w + u * a->sp, nvis, ns);
        float *o = a->out + (ti * a->heads + hq0) * d;
        int64_t nk = a->v_bad[h] ? a->sp : ns; /* 0 * inf must reach the sums: every key */
        for (int64_t u = 0; u < hg; u++)
            for (int64_t s = ns; s < nk; s++) w[u * a->sp + s] = 0.0f;
        const float *vt = a->vt + h * d * a->sp;
        int64_t dd = 0;
        if (hg == HG)
            for (; dd + 4 <= d; dd += 4) a->fn.kqv4(w, a->sp, vt + dd * a->sp, a->sp, nk / 16, o + dd, d);
        for (int64_t u = 0; u < hg; u++) {
            int64_t c = dd;
            for (; c + KQV_TILE <= d; c += KQV_TILE)
                a->fn.kqv(w + u * a->sp, vt + c * a->sp, a->sp, nk / 16, KQV_TILE, o + u * d + c);
            if (c < d) a->fn.kqv(w + u * a->sp, vt + c * a->sp, a->sp, nk / 16, (int)(d - c), o + u * d + c);
        }
    }
}

static int add_size(size_t *acc, size_t a, size_t b) { /* *acc += a * b, 0 on overflow */
    size_t m;
    if (__builtin_mul_overflow(a, b, &m) || __builtin_add_overflow(*acc, m, acc)) return 0;
    return 1;
}

int bk_attention_f16(const float *q, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const uint16_t *kc,
                     const uint16_t *vc, int64_t s_len, int64_t n_ctx, float *out, int nthreads) {
    if (!q || !kc || !vc || !out || t < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || d < 1 || s_len < t ||
        n_ctx < s_len || d > INT32_MAX || heads > INT32_MAX || s_len > INT64_MAX / 64 || t > INT64_MAX / heads)
        return BK_EBADARG;
    att_t a = {0};
    a.fn = att_fn();
    a.q = q, a.kc = kc, a.vc = vc, a.out = out;
    a.t = t, a.heads = heads, a.kvh = kv_heads, a.g = heads / kv_heads, a.d = d, a.s_len = s_len;
    a.sp = (s_len + 15) & ~(int64_t)15;
    int64_t c32 = (s_len + 31) & ~(int64_t)31; /* n_kv = min(ceil32(s_len), ceil32(n_ctx)) */
    a.n_kv = n_ctx >= c32 ? c32 : (n_ctx + 31) & ~(int64_t)31;
    a.scale = 1.0f / sqrtf((float)d);

    /* small problems are not worth waking the pool */
    double work = (double)heads * (double)t * (double)s_len * (double)d;
    int n = nthreads < 1 || work < 65536.0 ? 1 : nthreads;
    if (n > BK_MAX_THREADS) n = BK_MAX_THREADS;
    /* query heads per item: prefill takes HG at once when the grouped kernel applies; decode takes the largest
     * divisor of the group whose items split evenly over the threads (or are many), so K and V are read once
     * per item without one thread getting the most items */
    a.hg = t > 1 && a.fn.kqv4 && a.g % HG == 0 ? HG : 1;
    if (t == 1)
        for (int64_t hg = a.g; hg > 1; hg--)
            if (a.g % hg == 0 && ((heads / hg) % n == 0 || heads / hg >= 4 * (int64_t)n)) {
                a.hg = (int)hg;
                break;
            }
    a.items = heads / a.hg * t;
    if (n > a.items) n = (int)a.items;

    size_t stride = 64, vt_bytes = 0, total = 0, hm = (size_t)(a.hg > HG ? a.hg : HG);
    int ok = add_size(&stride, (size_t)a.sp, hm * sizeof(float)) && add_size(&stride, (size_t)d, hm * sizeof(float)) &&
             (t > 1 || (add_size(&stride, (size_t)d, hm * sizeof(float)) &&
                        add_size(&stride, (size_t)(d > 16 ? d : 16), 64 * sizeof(float))));
    stride &= ~(size_t)63;
    if (t > 1) ok = ok && add_size(&vt_bytes, (size_t)(kv_heads * d), (size_t)a.sp * sizeof(float));
    if (t > 1 && a.fn.dotf) ok = ok && add_size(&vt_bytes, (size_t)(kv_heads * d), (size_t)s_len * sizeof(float));
    ok = ok && add_size(&total, (size_t)n, stride) && add_size(&total, vt_bytes, 1) &&
         add_size(&total, (size_t)kv_heads, 1);
    char *mem = ok ? (char *)bk_scratch(BK_SCRATCH_ATTENTION, total) : NULL;
    if (!mem) return BK_ENOMEM;
    a.scratch = mem, a.scratch_stride = stride;
    a.vt = (float *)(mem + (size_t)n * stride);
    a.kf = t > 1 && a.fn.dotf ? a.vt + kv_heads * d * a.sp : NULL;
    a.v_bad = (unsigned char *)(mem + (size_t)n * stride + vt_bytes);
    atomic_init(&a.next, 0);
    if (t > 1) bk_parallel(transpose_v_task, &a, n < kv_heads ? n : (int)kv_heads);
    bk_parallel(t == 1 ? decode_task : attention_task, &a, n);
    return 0;
}

/* ---------------------------------------------------------------- SiLU gating (ggml's expf lives here) */

#ifdef BK_X86
BK_AVX512 static void silu_mul_avx512(float *gate, const float *up, int64_t n, int64_t *done) {
    const __m512i sign = _mm512_set1_epi32(INT32_MIN);
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 g = _mm512_loadu_ps(gate + j);
        __m512 e = expf_ggml16(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), sign)));
        _mm512_storeu_ps(gate + j, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + j)));
    }
    *done = j;
}
#endif

void bk_silu_mul(float *gate, const float *up, int64_t n) {
    int64_t j = 0;
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) silu_mul_avx512(gate, up, n, &j);
#endif
    for (; j < n; j++) gate[j] = (gate[j] / (1.0f + expf_ggml(-gate[j]))) * up[j];
}

/* ggml's soft_max over one row (see softmax_portable), for the F32-KV attention (bk_attention_f32.c) */
void bk_softmax_ggml(float *w, int64_t nvis, int64_t ns) { att_fn().softmax(w, nvis, ns); }
