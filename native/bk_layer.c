/* One BitNet b1.58 decoder layer as the bitnet-cpp numerics profile computes it (see bitnet_kernels.h), so a
 * decoded token costs one call per layer instead of dozens of numpy operations. Every step repeats the numpy
 * definition in bitnet_ref/model.py (Model.forward with ggml_cpu=True, activations i8_s, an f16 KV cache),
 * operation for operation in float32 (the build disables FMA contraction: every rounding is written out). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

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

int bk_f32_to_f16(const float *x, int64_t n, uint16_t *out) {
    if (n < 0) return BK_EBADARG;
    for (int64_t i = 0; i < n; i++) out[i] = bk_f32_to_f16_bits(x[i]);
    return 0;
}

/* ggml's rms_norm then the gain: float32 squares summed in double in order, mean rounded to float,
 * scale = 1/sqrtf(mean + eps), y = (x * scale) * gain */
static void rms_norm(const float *x, int64_t t, int64_t n, const float *gain, float eps, float *y) {
    for (int64_t i = 0; i < t; i++) {
        const float *r = x + i * n;
        double sum = 0.0;
        for (int64_t j = 0; j < n; j++) sum += (double)(r[j] * r[j]);
        float mean = (float)(sum / (double)n);
        float scale = 1.0f / sqrtf(mean + eps);
        for (int64_t j = 0; j < n; j++) y[i * n + j] = (r[j] * scale) * gain[j];
    }
}

/* what a layer call needs besides the weights: the i8_s activations of one input and its products */
typedef struct {
    int8_t *q;
    float *s;
    int32_t *sums, *raw;
    int nthreads;
} scratch_t;

static int quantize(scratch_t *sc, const float *x, int64_t t, int64_t k) {
    return bk_quantize_i8_s(x, t, k, sc->q, sc->s, sc->sums);
}

/* ggml.c's I2_S epilogue on the quantized input: ((float)raw - (float)act_sum) / act_scale * w_scale, then the
 * optional `.scale` tensor (a factor of 1 changes nothing) */
static int project(scratch_t *sc, const bk_layer *L, int p, int64_t t, int64_t k, int64_t rows, float *out) {
    int rc = bk_i2s_raw(sc->q, t, k, L->w[p], rows, sc->raw, sc->nthreads);
    if (rc) return rc;
    for (int64_t i = 0; i < t; i++) {
        float asum = (float)sc->sums[i], s = sc->s[i];
        for (int64_t r = 0; r < rows; r++) {
            float v = (((float)sc->raw[i * rows + r] - asum) / s) * L->w_scale[p];
            out[i * rows + r] = v * L->out_scale[p];
        }
    }
    return 0;
}

/* model.py's _fma: the float32 product is exact in double, then one double and one float rounding (ggml's true
 * fmaf differs only where that double rounding does, which the numpy definition does not model either) */
static inline float fma_np(float a, float b, float c) { return (float)((double)a * (double)b + (double)c); }

/* NeoX RoPE on (t, heads, d): pairs (i, i + d/2), fma(x0, c, -(x1*s)) and fma(x0, s, x1*c) */
static void rope(float *x, int64_t t, int64_t heads, int64_t d, const float *cs, const float *sn) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < t; i++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (i * heads + h) * d;
            for (int64_t j = 0; j < half; j++) {
                float c = cs[i * half + j], s = sn[i * half + j], x0 = v[j], x1 = v[j + half];
                v[j] = fma_np(x0, c, -(x1 * s));
                v[j + half] = fma_np(x0, s, x1 * c);
            }
        }
}

int bk_bitnet_layer(const bk_layer *L, float *x, int64_t t, int64_t s_len, uint16_t *kc, uint16_t *vc,
                    const float *cos, const float *sin, int last_only, int nthreads) {
    if (!L || !x || !kc || !vc || !cos || !sin || t < 1 || s_len < t || s_len > L->n_ctx || L->heads < 1 ||
        L->kv_heads < 1 || L->heads % L->kv_heads || L->head_dim < 2 || L->head_dim % 2 ||
        L->hidden != L->heads * L->head_dim || L->ffn < 1)
        return BK_EBADARG;
    if (L->hidden % QK_I2S || L->ffn % QK_I2S) return BK_EBADK;
    int64_t n = L->hidden, nf = L->ffn, kvd = L->kv_heads * L->head_dim, wide = nf > n ? nf : n;
    size_t nbytes = sizeof(float) * (size_t)(t * (3 * n + 2 * kvd + 2 * nf)) + sizeof(int32_t) * (size_t)(t * wide) +
                    (size_t)(t * wide) + (sizeof(float) + sizeof(int32_t)) * (size_t)t + 64;
    char *mem = (char *)malloc(nbytes);
    if (!mem) return BK_ENOMEM;
    float *h = (float *)mem, *qf = h + t * n, *kf = qf + t * n, *vf = kf + t * kvd, *att = vf + t * kvd;
    float *gate = att + t * n, *up = gate + t * nf;
    scratch_t sc = {0};
    sc.raw = (int32_t *)(up + t * nf);
    sc.s = (float *)(sc.raw + t * wide);
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
    rms_norm(x, t, n, L->attn_norm, L->eps, h);
    TRY(quantize(&sc, h, t, n));
    TRY(project(&sc, L, P_Q, t, n, n, qf));
    TRY(project(&sc, L, P_K, t, n, kvd, kf));
    TRY(project(&sc, L, P_V, t, n, kvd, vf));
    rope(qf, t, L->heads, L->head_dim, cos, sin);
    rope(kf, t, L->kv_heads, L->head_dim, cos, sin);
    int64_t p0 = s_len - t;
    bk_f32_to_f16(kf, t * kvd, kc + p0 * kvd);
    bk_f32_to_f16(vf, t * kvd, vc + p0 * kvd);
    TRY(bk_attention_f16(qf, t, L->heads, L->kv_heads, L->head_dim, kc, vc, s_len, L->n_ctx, att, nthreads));
    rms_norm(att, t, n, L->attn_sub_norm, L->eps, h);
    TRY(quantize(&sc, h, t, n));
    TRY(project(&sc, L, P_O, t, n, n, qf));
    for (int64_t j = 0; j < t * n; j++) x[j] = x[j] + qf[j];

    /* llama.cpp's last layer keeps only the rows whose logits are asked for before the FFN */
    int64_t tf = t;
    if (last_only && t > 1) {
        memmove(x, x + (t - 1) * n, sizeof(float) * (size_t)n);
        tf = 1;
    }

    /* feed-forward: relu(gate)^2 * up */
    rms_norm(x, tf, n, L->ffn_norm, L->eps, h);
    TRY(quantize(&sc, h, tf, n));
    TRY(project(&sc, L, P_GATE, tf, n, nf, gate));
    TRY(project(&sc, L, P_UP, tf, n, nf, up));
    for (int64_t j = 0; j < tf * nf; j++) {
        float g = gate[j] > 0.0f ? gate[j] : 0.0f;
        gate[j] = (g * g) * up[j];
    }
    rms_norm(gate, tf, nf, L->ffn_sub_norm, L->eps, up);
    TRY(quantize(&sc, up, tf, nf));
    TRY(project(&sc, L, P_DOWN, tf, nf, n, qf));
    for (int64_t j = 0; j < tf * n; j++) x[j] = x[j] + qf[j];
#undef TRY
done:
    free(mem);
    return rc;
}
