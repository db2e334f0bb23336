/* One BitNet b1.58 decoder layer as the bitnet-cpp numerics profile computes it (see bitnet_kernels.h), so a
 * decoded token costs one call per layer instead of dozens of numpy operations. Every step repeats the numpy
 * definition in bitnet_ref/model.py (Model.forward with ggml_cpu=True, activations i8_s, an f16 KV cache),
 * operation for operation in float32 (the build disables FMA contraction: every rounding is written out). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifdef BK_X86
#include <immintrin.h>
#endif

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };

uint16_t bk_f32_to_f16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((x >> 13) & 0x3ffu); /* NaN, quieted */
    if (x >= 0x47800000u) return sign | 0x7c00u;                                 /* >= 2^16: inf */
    if (x >= 0x38800000u) { /* normal in f16: round to nearest even at bit 13; a carry may reach inf */
        uint32_t r = x + 0xfffu + ((x >> 13) & 1u) - 0x38000000u;
        return sign | (uint16_t)(r >> 13);
    }
    if (x < 0x33000000u) return sign; /* below 2^-25 (and 2^-25 itself, a tie to even): zero */
    /* subnormal: the value in units of 2^-24, rounded to nearest even */
    uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126u - e;
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return sign | (uint16_t)q;
}

#ifdef BK_X86
/* vcvtps2ph rounds to nearest even and quiets a NaN keeping its top payload bits: bk_f32_to_f16_bits exactly */
__attribute__((target("avx512f"))) static int64_t f32_to_f16_avx512(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return i;
}
#endif

int bk_f32_to_f16(const float *x, int64_t n, uint16_t *out) {
    if (n < 0) return BK_EBADARG;
    int64_t i = 0;
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) i = f32_to_f16_avx512(x, n, out);
#endif
    for (; i < n; i++) out[i] = bk_f32_to_f16_bits(x[i]);
    return 0;
}

/* row-parallel work: fn(ctx, i0, i1) over [0, t) in contiguous ranges; a single range below ROWS_PER_TASK rows */
#define ROWS_PER_TASK 8
typedef void (*rows_fn)(void *ctx, int64_t i0, int64_t i1);
typedef struct {
    rows_fn fn;
    void *ctx;
    int64_t t;
} rows_job;

static void rows_task(void *arg, int ith, int nth) {
    rows_job *j = (rows_job *)arg;
    j->fn(j->ctx, j->t * ith / nth, j->t * (ith + 1) / nth);
}

static void for_rows(rows_fn fn, void *ctx, int64_t t, int nthreads) {
    rows_job j = {fn, ctx, t};
    int64_t most = t / ROWS_PER_TASK;
    int n = most < 1 ? 1 : (most < nthreads ? (int)most : nthreads);
    bk_parallel(rows_task, &j, n);
}

int bk_cos_sin(const float *theta, int64_t n, float *c, float *s) {
    if (n < 0) return BK_EBADARG;
    for (int64_t i = 0; i < n; i++) c[i] = cosf(theta[i]), s[i] = sinf(theta[i]);
    return 0;
}

/* ggml's rms_norm then the gain: float32 squares summed in double in order, mean rounded to float,
 * scale = 1/sqrtf(mean + eps), y = (x * scale) * gain */
typedef struct {
    const float *x, *gain;
    float *y;
    int64_t n;
    float eps;
} rms_t;

static void rms_rows(void *arg, int64_t i0, int64_t i1) {
    const rms_t *a = (const rms_t *)arg;
    int64_t n = a->n, i = i0;
    for (; i + 4 <= i1; i += 4) { /* four rows' sums side by side: four independent chains, each in order */
        const float *r = a->x + i * n;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        for (int64_t j = 0; j < n; j++) {
            s0 += (double)(r[j] * r[j]);
            s1 += (double)(r[n + j] * r[n + j]);
            s2 += (double)(r[2 * n + j] * r[2 * n + j]);
            s3 += (double)(r[3 * n + j] * r[3 * n + j]);
        }
        double sums[4] = {s0, s1, s2, s3};
        for (int u = 0; u < 4; u++) {
            float scale = 1.0f / sqrtf((float)(sums[u] / (double)n) + a->eps);
            for (int64_t j = 0; j < n; j++) a->y[(i + u) * n + j] = (r[u * n + j] * scale) * a->gain[j];
        }
    }
    for (; i < i1; i++) {
        const float *r = a->x + i * n;
        double sum = 0.0;
        for (int64_t j = 0; j < n; j++) sum += (double)(r[j] * r[j]);
        float scale = 1.0f / sqrtf((float)(sum / (double)n) + a->eps);
        for (int64_t j = 0; j < n; j++) a->y[i * n + j] = (r[j] * scale) * a->gain[j];
    }
}

static void rms_norm(const float *x, int64_t t, int64_t n, const float *gain, float eps, float *y, int nthreads) {
    rms_t a = {x, gain, y, n, eps};
    for_rows(rms_rows, &a, t, nthreads);
}

/* what a layer call needs besides the weights: the i8_s activations of one input and its products */
typedef struct {
    int8_t *q;
    float *s;
    int32_t *sums, *raw;
    int nthreads;
} scratch_t;

typedef struct {
    scratch_t *sc;
    const float *x;
    int64_t k;
} quant_t;

static void quantize_rows(void *arg, int64_t i0, int64_t i1) {
    const quant_t *a = (const quant_t *)arg;
    scratch_t *sc = a->sc;
    bk_quantize_i8_s(a->x + i0 * a->k, i1 - i0, a->k, sc->q + i0 * a->k, sc->s + i0, sc->sums + i0);
}

/* quantize_row_i8_s per row, rows split over the pool (k >= 0, so it cannot fail) */
static int quantize(scratch_t *sc, const float *x, int64_t t, int64_t k) {
    quant_t a = {sc, x, k};
    for_rows(quantize_rows, &a, t, sc->nthreads);
    return 0;
}

/* ggml.c's I2_S epilogue on the quantized input: ((float)raw - (float)act_sum) / act_scale * w_scale, then the
 * optional `.scale` tensor (a factor of 1 changes nothing) */
typedef struct {
    const scratch_t *sc;
    int64_t rows;
    float w_scale, out_scale;
    float *out;
} epi_t;

static void epilogue_rows_portable(void *arg, int64_t i0, int64_t i1) {
    const epi_t *e = (const epi_t *)arg;
    for (int64_t i = i0; i < i1; i++) {
        float asum = (float)e->sc->sums[i], s = e->sc->s[i];
        const int32_t *raw = e->sc->raw + i * e->rows;
        float *o = e->out + i * e->rows;
        for (int64_t r = 0; r < e->rows; r++) o[r] = ((((float)raw[r] - asum) / s) * e->w_scale) * e->out_scale;
    }
}

#ifdef BK_X86
/* the same IEEE operations on 16 lanes */
__attribute__((target("avx512f"))) static void epilogue_rows_avx512(void *arg, int64_t i0, int64_t i1) {
    const epi_t *e = (const epi_t *)arg;
    const __m512 ws = _mm512_set1_ps(e->w_scale), os = _mm512_set1_ps(e->out_scale);
    for (int64_t i = i0; i < i1; i++) {
        float asum = (float)e->sc->sums[i], s = e->sc->s[i];
        const __m512 va = _mm512_set1_ps(asum), vs = _mm512_set1_ps(s);
        const int32_t *raw = e->sc->raw + i * e->rows;
        float *o = e->out + i * e->rows;
        int64_t r = 0;
        for (; r + 16 <= e->rows; r += 16) {
            __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(raw + r))), va);
            _mm512_storeu_ps(o + r, _mm512_mul_ps(_mm512_mul_ps(_mm512_div_ps(v, vs), ws), os));
        }
        for (; r < e->rows; r++) o[r] = ((((float)raw[r] - asum) / s) * e->w_scale) * e->out_scale;
    }
}
#endif

/* gate = relu(gate)^2 * up (ggml_relu: x > 0 ? x : 0, then ggml_sqr and ggml_mul, float32) */
static void relu2_mul_portable(float *gate, const float *up, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float g = gate[j] > 0.0f ? gate[j] : 0.0f;
        gate[j] = (g * g) * up[j];
    }
}

#ifdef BK_X86
/* max_ps(x, 0) returns its second operand, +0, for a NaN or a zero x: x > 0 ? x : 0 exactly */
__attribute__((target("avx512f"))) static void relu2_mul_avx512(float *gate, const float *up, int64_t n) {
    const __m512 zero = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 g = _mm512_max_ps(_mm512_loadu_ps(gate + j), zero);
        _mm512_storeu_ps(gate + j, _mm512_mul_ps(_mm512_mul_ps(g, g), _mm512_loadu_ps(up + j)));
    }
    relu2_mul_portable(gate + j, up + j, n - j);
}
#endif

static void relu2_mul(float *gate, const float *up, int64_t n) {
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) {
        relu2_mul_avx512(gate, up, n);
        return;
    }
#endif
    relu2_mul_portable(gate, up, n);
}

/* the n (<= 3) projections p[m] (rows[m] outputs each) of the quantized input: their integer products in one
 * parallel region (bk_i2s_raw_many: sc->raw holds them one after another), then each one's epilogue */
static int project_many(scratch_t *sc, const bk_layer *L, int n, const int *p, int64_t t, int64_t k,
                        const int64_t *rows, float *const *out) {
    const uint8_t *w[3];
    int32_t *raw[3];
    int64_t off = 0;
    for (int m = 0; m < n; m++) w[m] = L->w[p[m]], raw[m] = sc->raw + off, off += t * rows[m];
    int rc = bk_i2s_raw_many(sc->q, t, k, n, w, rows, raw, sc->nthreads);
    if (rc) return rc;
    rows_fn fn = epilogue_rows_portable;
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) fn = epilogue_rows_avx512;
#endif
    for (int m = 0; m < n; m++) {
        scratch_t one = *sc;
        one.raw = raw[m];
        epi_t e = {&one, rows[m], L->w_scale[p[m]], L->out_scale[p[m]], out[m]};
        for_rows(fn, &e, t, sc->nthreads);
    }
    return 0;
}

static int project(scratch_t *sc, const bk_layer *L, int p, int64_t t, int64_t k, int64_t rows, float *out) {
    return project_many(sc, L, 1, &p, t, k, &rows, &out);
}

/* NeoX RoPE on the rows [i0, i1) of (t, heads, d): pairs (j, j + d/2), fma(x0, c, -(x1*s)) and fma(x0, s, x1*c)
 * (ggml's contracted rotation, ggml_ref.py's _fma: one rounding each) */
typedef struct {
    float *x;
    int64_t heads, d;
    const float *cs, *sn;
} rope_t;

static void rope_pairs(float *v, const float *cs, const float *sn, int64_t j0, int64_t half) {
    for (int64_t j = j0; j < half; j++) {
        float c = cs[j], s = sn[j], x0 = v[j], x1 = v[j + half];
        v[j] = fmaf(x0, c, -(x1 * s));
        v[j + half] = fmaf(x0, s, x1 * c);
    }
}

static void rope_rows_portable(void *arg, int64_t i0, int64_t i1) {
    const rope_t *a = (const rope_t *)arg;
    int64_t half = a->d / 2;
    for (int64_t i = i0; i < i1; i++)
        for (int64_t h = 0; h < a->heads; h++)
            rope_pairs(a->x + (i * a->heads + h) * a->d, a->cs + i * half, a->sn + i * half, 0, half);
}

#ifdef BK_X86
/* the same on 16 pairs at a time; -(x1*s) flips the sign bit of the rounded product, as the scalar code does */
__attribute__((target("avx512f"))) static void rope_rows_avx512(void *arg, int64_t i0, int64_t i1) {
    const rope_t *a = (const rope_t *)arg;
    int64_t half = a->d / 2, body = half & ~(int64_t)15;
    const __m512i sign = _mm512_set1_epi32((int32_t)0x80000000u);
    for (int64_t i = i0; i < i1; i++) {
        const float *cs = a->cs + i * half, *sn = a->sn + i * half;
        for (int64_t h = 0; h < a->heads; h++) {
            float *v = a->x + (i * a->heads + h) * a->d;
            for (int64_t j = 0; j < body; j += 16) {
                __m512 c = _mm512_loadu_ps(cs + j), s = _mm512_loadu_ps(sn + j);
                __m512 x0 = _mm512_loadu_ps(v + j), x1 = _mm512_loadu_ps(v + j + half);
                __m512 nxs = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(x1, s)), sign));
                _mm512_storeu_ps(v + j, _mm512_fmadd_ps(x0, c, nxs));
                _mm512_storeu_ps(v + j + half, _mm512_fmadd_ps(x0, s, _mm512_mul_ps(x1, c)));
            }
            rope_pairs(v, cs, sn, body, half);
        }
    }
}
#endif

static void rope(float *x, int64_t t, int64_t heads, int64_t d, const float *cs, const float *sn, int nthreads) {
    rope_t a = {x, heads, d, cs, sn};
    rows_fn fn = rope_rows_portable;
#ifdef BK_X86
    if (bk_current_isa() == ISA_VNNI) fn = rope_rows_avx512;
#endif
    for_rows(fn, &a, t, nthreads);
}

int bk_bitnet_layer(const bk_layer *L, float *x, int64_t t, int64_t s_len, uint16_t *kc, uint16_t *vc,
                    const float *cos, const float *sin, int last_only, int nthreads) {
    if (!L || !x || !kc || !vc || !cos || !sin || t < 1 || s_len < t || s_len > L->n_ctx || L->heads < 1 ||
        L->kv_heads < 1 || L->heads % L->kv_heads || L->head_dim < 2 || L->head_dim % 2 ||
        L->hidden != L->heads * L->head_dim || L->ffn < 1)
        return BK_EBADARG;
    if (L->hidden % QK_I2S || L->ffn % QK_I2S) return BK_EBADK;
    int64_t n = L->hidden, nf = L->ffn, kvd = L->kv_heads * L->head_dim, wide = nf > n ? nf : n;
    int64_t nraw = n + 2 * kvd > 2 * nf ? n + 2 * kvd : 2 * nf; /* raw products of Q, K, V or of gate, up */
    size_t nbytes = sizeof(float) * (size_t)(t * (3 * n + 2 * kvd + 2 * nf)) + sizeof(int32_t) * (size_t)(t * nraw) +
                    (size_t)(t * wide) + (sizeof(float) + sizeof(int32_t)) * (size_t)t + 64;
    char *mem = (char *)bk_scratch(BK_SCRATCH_LAYER, nbytes);
    if (!mem) return BK_ENOMEM;
    float *h = (float *)mem, *qf = h + t * n, *kf = qf + t * n, *vf = kf + t * kvd, *att = vf + t * kvd;
    float *gate = att + t * n, *up = gate + t * nf;
    scratch_t sc = {0};
    sc.raw = (int32_t *)(up + t * nf);
    sc.s = (float *)(sc.raw + t * nraw);
    sc.sums = (int32_t *)(sc.s + t);
    sc.q = (int8_t *)(sc.sums + t);
    sc.nthreads = nthreads;
    int rc = 0;
#define TRY(call)            \
    do {                     \
        if ((rc = (call))) { \
            goto done;       \
        }                    \
    } while (0)

    /* attention */
    rms_norm(x, t, n, L->attn_norm, L->eps, h, nthreads);
    TRY(quantize(&sc, h, t, n));
    {
        const int p[3] = {P_Q, P_K, P_V};
        const int64_t r[3] = {n, kvd, kvd};
        float *const o[3] = {qf, kf, vf};
        TRY(project_many(&sc, L, 3, p, t, n, r, o));
    }
    rope(qf, t, L->heads, L->head_dim, cos, sin, nthreads);
    rope(kf, t, L->kv_heads, L->head_dim, cos, sin, nthreads);
    int64_t p0 = s_len - t;
    bk_f32_to_f16(kf, t * kvd, kc + p0 * kvd);
    bk_f32_to_f16(vf, t * kvd, vc + p0 * kvd);
    TRY(bk_attention_f16(qf, t, L->heads, L->kv_heads, L->head_dim, kc, vc, s_len, L->n_ctx, att, nthreads));
    rms_norm(att, t, n, L->attn_sub_norm, L->eps, h, nthreads);
    TRY(quantize(&sc, h, t, n));
    TRY(project(&sc, L, P_O, t, n, n, qf));
    for (int64_t j = 0; j < t * n; j++) x[j] = x[j] + qf[j];

    /* llama.cpp's last layer keeps only the rows whose logits are asked for before the FFN */
    int64_t tf = t;
    if (last_only && t > 1) {
        memmove(x, x + (t - 1) * n, sizeof(float) * (size_t)n);
        tf = 1;
    }

    /* feed-forward: relu(gate)^2 * up, or silu(gate) * up */
    rms_norm(x, tf, n, L->ffn_norm, L->eps, h, nthreads);
    TRY(quantize(&sc, h, tf, n));
    {
        const int p[2] = {P_GATE, P_UP};
        const int64_t r[2] = {nf, nf};
        float *const o[2] = {gate, up};
        TRY(project_many(&sc, L, 2, p, tf, n, r, o));
    }
    if (L->silu)
        bk_silu_mul(gate, up, tf * nf);
    else
        relu2_mul(gate, up, tf * nf);
    rms_norm(gate, tf, nf, L->ffn_sub_norm, L->eps, up, nthreads);
    TRY(quantize(&sc, up, tf, nf));
    TRY(project(&sc, L, P_DOWN, tf, nf, n, qf));
    for (int64_t j = 0; j < tf * n; j++) x[j] = x[j] + qf[j];
#undef TRY
done:
    return rc;
}

/* the pieces above for the llama-cpp profile's layer (bk_ggml_layer.c): the same operations, the same bits */
void bk_rms_norm(const float *x, int64_t t, int64_t n, const float *gain, float eps, float *y, int nthreads) {
    rms_norm(x, t, n, gain, eps, y, nthreads);
}
void bk_rope(float *x, int64_t t, int64_t heads, int64_t d, const float *cs, const float *sn, int nthreads) {
    rope(x, t, heads, d, cs, sn, nthreads);
}
void bk_relu2_mul(float *gate, const float *up, int64_t n) { relu2_mul(gate, up, n); }
void bk_for_rows(void (*fn)(void *ctx, int64_t i0, int64_t i1), void *ctx, int64_t t, int nthreads) {
    for_rows(fn, ctx, t, nthreads);
}
