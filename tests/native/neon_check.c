/* Cross-check of the NEON kernels (native/bk_neon.c) against the portable ones, for an AArch64 build run under
 * qemu-user (tests/test_neon.py) or on an ARM machine. It links the kernel sources directly: no Python.
 *
 * Every public function runs on the same random inputs with bk_set_isa("portable") and bk_set_isa("neon"):
 * return codes and outputs (whole buffers, pre-filled, so stray or missing writes show) must be the same bits.
 * The one allowance: where both results are NaN the payload may differ (IEEE 754 leaves the payload of an
 * operation on two NaNs open, and a compiler may commute an add); those are counted, not failed.
 * The NEON functions are also called directly: the I2_S row dots (SMLAL and, where the CPU has it, SDOT: the
 * variant the dispatch does not pick is checked too), the F16 dot bodies, and the f16 widening on all 65536
 * inputs.
 *
 *   neon_check [--expect-dotprod 0|1] [--seed N] [--rounds N]      (NEON_CHECK_DEBUG=1: show NaN payload cases)
 * Exit: 0 all equal, 1 a difference (the first ones are printed), 2 no NEON in this build or a bad argument.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet_kernels.h"
#include "bk_internal.h"

#ifndef BK_NEON
int main(void) {
    printf("neon_check: this build has no NEON path (not AArch64); bk_isa: %s\n", bk_isa());
    return 2;
}
#else

static int g_failures, g_nan_payload, g_layer_rc; /* g_layer_rc: a non-zero rc of a layer, for the summary */
static long g_checks;

static void fail(const char *fmt, ...) {
    if (g_failures++ < 25) {
        va_list ap;
        va_start(ap, fmt);
        fputs("MISMATCH ", stdout);
        vprintf(fmt, ap);
        fputc('\n', stdout);
        va_end(ap);
    }
}

/* splitmix64: a fixed, portable sequence for a seed */
static uint64_t g_rng;
static uint64_t rnd(void) {
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int64_t pick(const int64_t *v, int n) { return v[rnd() % (uint64_t)n]; }
static double unif(void) { return (double)(rnd() >> 11) * 0x1p-53; }

static size_t sz(int64_t a) { return a > 0 ? (size_t)a : 0; } /* element counts; negative shapes are rejected */

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        printf("out of memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static void use_isa(const char *name) {
    if (bk_set_isa(name) != 0 || strcmp(bk_isa(), name) != 0) {
        printf("bk_set_isa(\"%s\") failed (bk_isa: %s)\n", name, bk_isa());
        exit(2);
    }
}

static void cmp_rc(const char *what, int a, int b, int want) {
    g_checks++;
    if (a != b || a != want) fail("%s: rc portable %d, neon %d, expected %d", what, a, b, want);
}

static void cmp_bytes(const char *what, const void *a, const void *b, size_t n) {
    g_checks++;
    if (memcmp(a, b, n) == 0) return;
    const uint8_t *x = a, *y = b;
    size_t i = 0;
    while (x[i] == y[i]) i++;
    fail("%s: byte %zu differs (%02x vs %02x)", what, i, x[i], y[i]);
}

static void cmp_i32(const char *what, const int32_t *a, const int32_t *b, size_t n) {
    g_checks++;
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) {
            fail("%s: [%zu] portable %d, neon %d", what, i, a[i], b[i]);
            return;
        }
}

static void cmp_f32(const char *what, const float *a, const float *b, size_t n) {
    g_checks++;
    for (size_t i = 0; i < n; i++) {
        uint32_t x, y;
        memcpy(&x, a + i, 4);
        memcpy(&y, b + i, 4);
        if (x == y) continue;
        if (isnan(a[i]) && isnan(b[i])) {
            if (getenv("NEON_CHECK_DEBUG") && g_nan_payload < 5) printf("nan %s [%zu] %08x %08x\n", what, i, x, y);
            g_nan_payload++;
            continue;
        }
        fail("%s: [%zu] portable %a (0x%08x), neon %a (0x%08x)", what, i, a[i], x, b[i], y);
        return;
    }
}

/* f16 bits -> float, by arithmetic (independent of the kernels' bit conversion) */
static float h2f(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexpf((float)(1024 + m), e - 25);
    return (h & 0x8000) ? -v : v;
}

/* a random f16: mostly normal values of moderate size; with `wild`, also subnormals, zeros, the largest
 * finite, and (extreme cases) inf and NaN */
static uint16_t rand_f16(int wild, int nonfinite) {
    uint64_t r = rnd();
    uint16_t sign = (uint16_t)((r >> 20) & 0x8000);
    unsigned c = (unsigned)(r % 100);
    if (wild && c < 4) return sign | (uint16_t)((r >> 32) & 0x3ff);      /* subnormal or zero */
    if (wild && c < 6) return sign;                                      /* +-0 */
    if (wild && c < 8) return sign | 0x7bff;                             /* 65504 */
    if (nonfinite && c < 9) return sign | 0x7c00;                        /* inf */
    if (nonfinite && c < 10) return sign | 0x7c00 | (uint16_t)(1 + (r >> 40) % 0x3ff); /* NaN, quiet or not */
    uint16_t e = (uint16_t)(9 + (r >> 32) % 12);                         /* 2^-6 .. 2^5 */
    return sign | (uint16_t)(e << 10) | (uint16_t)((r >> 44) & 0x3ff);
}

/* extreme 1: mostly -128 / 127 of either sign; 2: one of them throughout (sums of one sign, at their largest) */
static void rand_q(int8_t *q, size_t n, int extreme) {
    int8_t c = rnd() & 1 ? 127 : -128;
    for (size_t i = 0; i < n; i++) {
        if (extreme == 2) {
            q[i] = c;
            continue;
        }
        uint64_t r = rnd();
        q[i] = extreme && (r & 3) ? ((r >> 8) & 1 ? 127 : -128) : (int8_t)(r >> 16);
    }
}

static void rand_bytes(uint8_t *w, size_t n, int all_ones) {
    for (size_t i = 0; i < n; i++) w[i] = all_ones ? 0xff : (uint8_t)(rnd() >> 24);
}

/* ---------------------------------------------------------------- I2_S */

static void check_i2s(int64_t t, int64_t k, int64_t r, int nthreads, int extreme, int want_rc) {
    size_t nq = sz(t) * sz(k), nw = sz(r) * sz(k) / 4, no = sz(t) * sz(r);
    int8_t *q = xmalloc(nq);
    uint8_t *w = xmalloc(nw);
    int32_t *o[2][2];
    rand_q(q, nq, extreme);
    rand_bytes(w, nw, extreme == 2 || (extreme && (rnd() & 1)));
    char what[96];
    for (int f = 0; f < 2; f++) { /* bk_i2s_raw, bk_i2s_raw_wrap16 */
        int rc[2];
        for (int v = 0; v < 2; v++) {
            use_isa(v ? "neon" : "portable");
            o[f][v] = xmalloc(4 * no);
            memset(o[f][v], 0xa5, 4 * no);
            rc[v] = f ? bk_i2s_raw_wrap16(q, t, k, w, r, o[f][v], nthreads) : bk_i2s_raw(q, t, k, w, r, o[f][v], nthreads);
        }
        snprintf(what, sizeof what, "%s t=%lld k=%lld r=%lld threads=%d", f ? "i2s_raw_wrap16" : "i2s_raw",
                 (long long)t, (long long)k, (long long)r, nthreads);
        cmp_rc(what, rc[0], rc[1], want_rc);
        cmp_i32(what, o[f][0], o[f][1], no);
    }
    /* the row dots themselves, both NEON forms, against the portable product of that row */
    if (want_rc == 0 && k > 0)
        for (int64_t i = 0; i < t && i < 3; i++)
            for (int64_t j = 0; j < r && j < 3; j++) {
                int32_t want = o[0][0][i * r + j];
                int32_t got = bk_i2s_dot_neon(w + j * k / 4, q + i * k, k / QK_I2S);
                g_checks++;
                if (got != want) fail("bk_i2s_dot_neon k=%lld: %d, portable %d", (long long)k, got, want);
                if (bk_neon_has_dotprod()) {
                    got = bk_i2s_dot_neon_dp(w + j * k / 4, q + i * k, k / QK_I2S);
                    g_checks++;
                    if (got != want) fail("bk_i2s_dot_neon_dp k=%lld: %d, portable %d", (long long)k, got, want);
                }
            }
    for (int f = 0; f < 2; f++) free(o[f][0]), free(o[f][1]);
    free(q), free(w);
}

/* ---------------------------------------------------------------- TQ1_0 / TQ2_0 */

static void check_tq(int type, int64_t t, int64_t k, int64_t r, int nthreads, int extreme, int want_rc) {
    size_t nb = sz(k) / QK_K, bb = type == BK_TQ2_0 ? 66 : 54;
    size_t nq = sz(t) * sz(k), nw = sz(r) * nb * bb, no = sz(t) * sz(r) * nb * 8;
    int8_t *q = xmalloc(nq);
    uint8_t *w = xmalloc(nw);
    int32_t *o[2];
    rand_q(q, nq, extreme);
    rand_bytes(w, nw, 0);
    int rc[2];
    for (int v = 0; v < 2; v++) {
        use_isa(v ? "neon" : "portable");
        o[v] = xmalloc(4 * no);
        memset(o[v], 0x5a, 4 * no);
        rc[v] = bk_tq_lanes(type, q, t, k, w, r, o[v], nthreads);
    }
    char what[96];
    snprintf(what, sizeof what, "tq_lanes type=%d t=%lld k=%lld r=%lld", type, (long long)t, (long long)k, (long long)r);
    cmp_rc(what, rc[0], rc[1], want_rc);
    cmp_i32(what, o[0], o[1], no);
    free(o[0]), free(o[1]), free(q), free(w);
}

/* ---------------------------------------------------------------- F16 */

static void check_f16(int mode, int64_t t, int64_t k, int64_t r, int nthreads, int extreme, int want_rc) {
    size_t nx = sz(t) * sz(k), nw = sz(r) * sz(k), no = sz(t) * sz(r);
    float *x = xmalloc(4 * nx);
    uint8_t *wb = xmalloc(2 * nw + 1), *w = wb + (rnd() & 1); /* rows read in place: odd addresses too */
    float *o[2];
    double scale = ldexp(1.0, (int)(rnd() % 40) - 20);
    for (size_t i = 0; i < nw; i++) {
        uint16_t h = rand_f16(extreme, extreme > 1);
        memcpy(w + 2 * i, &h, 2);
    }
    for (size_t i = 0; i < nx; i++) {
        if (mode == BK_F16_VEC_DOT) /* ggml_vec_dot_f16 takes f16-valued activations */
            x[i] = h2f(rand_f16(extreme, extreme > 1));
        else if (extreme && rnd() % 50 == 0)
            x[i] = (rnd() & 1 ? 1 : -1) * (rnd() & 1 ? 3.0e38f : 1.0e-40f); /* overflowing, subnormal */
        else
            x[i] = (float)((unif() * 2 - 1) * scale);
    }
    int rc[2];
    for (int v = 0; v < 2; v++) {
        use_isa(v ? "neon" : "portable");
        o[v] = xmalloc(4 * no);
        memset(o[v], 0x3c, 4 * no);
        rc[v] = bk_f16_matmul(mode, x, t, k, w, r, o[v], nthreads);
    }
    char what[96];
    snprintf(what, sizeof what, "f16_matmul mode=%d t=%lld k=%lld r=%lld extreme=%d", mode, (long long)t, (long long)k,
             (long long)r, extreme);
    cmp_rc(what, rc[0], rc[1], want_rc);
    cmp_f32(what, o[0], o[1], no);
    /* the NEON dot bodies called directly on a widened row (the dispatch may split tokens differently) */
    if (want_rc == 0 && k > 0 && t > 0 && r > 0) {
        float *row = xmalloc(4 * (size_t)k), got[BK_GEMM_NU];
        for (int64_t j = 0; j < r && j < 2; j++) {
            bk_f16_row_neon(w + 2 * j * k, row, k);
            for (int64_t i = 0; i < t && i < 2; i++) {
                got[0] = mode == BK_F16_VEC_DOT ? bk_vec_dot_f16_neon(x + i * k, row, k) : bk_gemm_f16_neon(x + i * k, row, k);
                snprintf(what, sizeof what, "%s k=%lld", mode == BK_F16_VEC_DOT ? "bk_vec_dot_f16_neon" : "bk_gemm_f16_neon",
                         (long long)k);
                cmp_f32(what, o[0] + i * r + j, got, 1);
            }
            if (mode == BK_F16_GEMM && t >= BK_GEMM_NU) {
                float want[BK_GEMM_NU];
                for (int u = 0; u < BK_GEMM_NU; u++) want[u] = o[0][u * r + j];
                bk_gemmn_f16_neon(x, k, row, k, got);
                snprintf(what, sizeof what, "bk_gemmn_f16_neon k=%lld", (long long)k);
                cmp_f32(what, want, got, BK_GEMM_NU);
            }
        }
        free(row);
    }
    free(o[0]), free(o[1]), free(x), free(wb);
}

/* every f16 input through the NEON widening (8 at a time and the tails): exactly the portable conversion,
 * signaling NaNs kept signaling */
static void check_f16_rows(void) {
    uint8_t *src = xmalloc(2 * 65536 + 2);
    float *dst = xmalloc(4 * 65536 + 4);
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        memcpy(src + 1 + 2 * i, &h, 2);
    }
    for (int64_t n = 0; n <= 17; n++) { /* tails: 0..7 values after the full vectors */
        dst[n] = 12345.0f;
        bk_f16_row_neon(src + 1, dst, n);
        g_checks++;
        if (dst[n] != 12345.0f) fail("bk_f16_row_neon n=%lld wrote past the row", (long long)n);
    }
    bk_f16_row_neon(src + 1, dst, 65536);
    for (uint32_t i = 0; i < 65536; i++) {
        uint32_t got, want;
        memcpy(&got, dst + i, 4);
        if (((i >> 10) & 0x1f) == 0x1f && (i & 0x3ff)) /* NaN: sign, all-ones exponent, payload shifted */
            want = ((i & 0x8000u) << 16) | 0x7f800000u | ((i & 0x3ffu) << 13);
        else {
            float f = h2f((uint16_t)i);
            memcpy(&want, &f, 4);
        }
        g_checks++;
        if (got != want) fail("bk_f16_row_neon(0x%04x) = 0x%08x, want 0x%08x", i, got, want);
    }
    free(src), free(dst);
}

/* ---------------------------------------------------------------- quantizers, f16 rounding */

static void rand_act(float *x, size_t n) {
    int kind = (int)(rnd() % 5);
    double scale = ldexp(1.0, (int)(rnd() % 60) - 30);
    for (size_t i = 0; i < n; i++) {
        double g = (unif() * 2 - 1) * scale;
        x[i] = kind == 0 ? 0.0f : kind == 1 ? (float)(g * 1e-30) : kind == 2 ? (float)(g * 1e25)
               : kind == 3 && rnd() % 7 == 0 ? (rnd() & 1 ? 3.0e38f : -3.0e38f) : (float)g;
    }
}

static void check_quant(int64_t t, int64_t k) {
    size_t n = (size_t)(t * k), nb = (size_t)(t * (k / QK_K + 1));
    float *x = xmalloc(4 * n);
    rand_act(x, n);
    int8_t *q[2], *q8[2];
    float *s[2], *d[2];
    int32_t *sums[2];
    uint16_t *h[2];
    int rc[2][3];
    for (int v = 0; v < 2; v++) {
        use_isa(v ? "neon" : "portable");
        q[v] = xmalloc(n), q8[v] = xmalloc(n), s[v] = xmalloc(4 * (size_t)t), sums[v] = xmalloc(4 * (size_t)t), d[v] = xmalloc(4 * nb);
        h[v] = xmalloc(2 * n);
        memset(q[v], 0x11, n), memset(q8[v], 0x11, n), memset(s[v], 0x22, 4 * (size_t)t), memset(sums[v], 0x33, 4 * (size_t)t);
        memset(d[v], 0x44, 4 * nb), memset(h[v], 0x55, 2 * n);
        rc[v][0] = bk_quantize_i8_s(x, t, k, q[v], s[v], sums[v]);
        rc[v][1] = bk_f32_to_f16(x, (int64_t)n, h[v]);
        rc[v][2] = bk_quantize_q8_k(x, t, k, q8[v], d[v]);
    }
    cmp_rc("bk_quantize_i8_s", rc[0][0], rc[1][0], 0);
    cmp_rc("bk_f32_to_f16", rc[0][1], rc[1][1], 0);
    cmp_rc("bk_quantize_q8_k", rc[0][2], rc[1][2], k % QK_K ? BK_EBADK : 0);
    cmp_f32("bk_quantize_i8_s s", s[0], s[1], (size_t)t);
    cmp_i32("bk_quantize_i8_s sums", sums[0], sums[1], (size_t)t);
    cmp_bytes("bk_quantize_i8_s q", q[0], q[1], n);
    cmp_bytes("bk_f32_to_f16", h[0], h[1], 2 * n);
    cmp_bytes("bk_quantize_q8_k q", q8[0], q8[1], n);
    cmp_f32("bk_quantize_q8_k d", d[0], d[1], nb);
    for (int v = 0; v < 2; v++) free(q[v]), free(q8[v]), free(s[v]), free(sums[v]), free(d[v]), free(h[v]);
    free(x);
}

/* ---------------------------------------------------------------- one decoder layer */

static void check_layer(int64_t t, int last_only, int nthreads) {
    bk_layer L;
    memset(&L, 0, sizeof L);
    L.hidden = 256, L.heads = 4, L.kv_heads = 2, L.head_dim = 64, L.ffn = 384, L.n_ctx = 8, L.eps = 1e-5f;
    int64_t n = L.hidden, kvd = L.kv_heads * L.head_dim, half = L.head_dim / 2;
    const int64_t rows[7] = {n, kvd, kvd, n, L.ffn, L.ffn, n}, cols[7] = {n, n, n, n, n, n, L.ffn};
    float *gain = xmalloc(4 * 4 * (size_t)L.ffn);
    for (int64_t i = 0; i < 4 * L.ffn; i++) gain[i] = (float)(0.5 + unif());
    L.attn_norm = gain, L.attn_sub_norm = gain + L.ffn, L.ffn_norm = gain + 2 * L.ffn, L.ffn_sub_norm = gain + 3 * L.ffn;
    uint8_t *wmem[7];
    for (int i = 0; i < 7; i++) {
        size_t nw = (size_t)(rows[i] * cols[i] / 4);
        wmem[i] = xmalloc(nw);
        for (size_t j = 0; j < nw; j++) { /* codes 0..2 (values -1, 0, 1), as I2_S writes them */
            uint8_t b = 0;
            for (int e = 0; e < 4; e++) b = (uint8_t)(b << 2 | rnd() % 3);
            wmem[i][j] = b;
        }
        L.w[i] = wmem[i], L.w_scale[i] = (float)(0.01 + 0.05 * unif()), L.out_scale[i] = i == 3 ? 0.5f : 1.0f;
    }
    size_t nx = (size_t)(t * n), nc = (size_t)(L.n_ctx * kvd), na = (size_t)(t * half);
    float *x0 = xmalloc(4 * nx), *cs = xmalloc(4 * na), *sn = xmalloc(4 * na);
    for (size_t i = 0; i < nx; i++) x0[i] = (float)(unif() * 2 - 1);
    for (size_t i = 0; i < na; i++) cs[i] = cosf((float)(unif() * 6.28)), sn[i] = sinf((float)(unif() * 6.28));
    float *x[2];
    uint16_t *kc[2], *vc[2];
    int rc[2];
    for (int v = 0; v < 2; v++) {
        use_isa(v ? "neon" : "portable");
        x[v] = xmalloc(4 * nx), kc[v] = xmalloc(2 * nc), vc[v] = xmalloc(2 * nc);
        memcpy(x[v], x0, 4 * nx), memset(kc[v], 0, 2 * nc), memset(vc[v], 0, 2 * nc);
        rc[v] = bk_bitnet_layer(&L, x[v], t, t, kc[v], vc[v], cs, sn, last_only, nthreads);
    }
    if (rc[0]) g_layer_rc = rc[0];
    g_checks++;
    if (rc[0] != rc[1]) fail("bk_bitnet_layer t=%lld: rc portable %d, neon %d", (long long)t, rc[0], rc[1]);
    cmp_f32("bk_bitnet_layer x", x[0], x[1], nx);
    cmp_bytes("bk_bitnet_layer k cache", kc[0], kc[1], 2 * nc);
    cmp_bytes("bk_bitnet_layer v cache", vc[0], vc[1], 2 * nc);
    for (int v = 0; v < 2; v++) free(x[v]), free(kc[v]), free(vc[v]);
    for (int i = 0; i < 7; i++) free(wmem[i]);
    free(gain), free(x0), free(cs), free(sn);
}

int main(int argc, char **argv) {
    int expect_dp = -1, rounds = 60;
    uint64_t seed = 20240611;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--expect-dotprod") == 0) expect_dp = atoi(argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--seed") == 0) seed = strtoull(argv[++i], NULL, 0);
        else if (i + 1 < argc && strcmp(argv[i], "--rounds") == 0) rounds = atoi(argv[++i]);
        else {
            printf("usage: %s [--expect-dotprod 0|1] [--seed N] [--rounds N]\n", argv[0]);
            return 2;
        }
    }
    g_rng = seed;
    /* the dispatch: neon by default, the x86 names refused */
    bk_set_isa("auto");
    int dp = bk_neon_has_dotprod();
    printf("neon_check: bk_isa() = %s, dotprod: %s (I2_S row dot: %s), seed %llu\n", bk_isa(), dp ? "yes" : "no",
           dp ? "SDOT" : "SMLAL", (unsigned long long)seed);
    g_checks++;
    if (strcmp(bk_isa(), "neon") != 0) fail("auto dispatch chose %s, not neon", bk_isa());
    g_checks++;
    if (bk_set_isa("avx2") != -1 || bk_set_isa("avx512-vnni") != -1 || bk_set_isa("sse9") != -1)
        fail("an x86 or unknown ISA name was accepted");
    g_checks++;
    if (expect_dp >= 0 && dp != expect_dp) fail("dotprod detected %d, expected %d", dp, expect_dp);

    check_f16_rows();

    /* shapes: block edges, odd counts, the 8-block int16 groups of the SMLAL dot, the GEMM's 8-token groups */
    static const int64_t ts[] = {1, 1, 2, 3, 4, 5, 8, 9, 16, 17};
    static const int64_t rs[] = {1, 2, 3, 5, 8, 17, 33};
    static const int64_t nbs[] = {1, 2, 3, 7, 8, 9, 16, 17, 24, 33};
    static const int64_t k16[] = {16, 32, 48, 64, 80, 112, 128, 256, 272, 320, 1024};
    static const int64_t kany[] = {1, 7, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 200, 257, 320, 1000};
    for (int round = 0; round < rounds; round++) {
        int threads = round % 3 ? 1 : 3, extreme = round % 4 == 1;
        check_i2s(pick(ts, 10), QK_I2S * pick(nbs, 10), pick(rs, 7), threads, extreme, 0);
        check_tq(round & 1 ? BK_TQ1_0 : BK_TQ2_0, pick(ts, 10), QK_K * (1 + (int64_t)(rnd() % 6)), pick(rs, 7), threads,
                 extreme, 0);
        check_f16(BK_F16_VEC_DOT, pick(ts, 10), pick(kany, 16), pick(rs, 7), threads, round % 4, 0);
        check_f16(BK_F16_GEMM, pick(ts, 10), pick(k16, 11), pick(rs, 7), threads, round % 4, 0);
        check_quant(pick(ts, 10), pick(kany, 16) * (round & 1 ? QK_K : 1));
    }
    /* extremes: every code 3 against q = -128 or 127 over many blocks (|sum| at its maximum: the SMLAL dot's
     * int16 lanes must be widened in time), big products through the thread pool, empty shapes */
    for (int e = 0; e < 6; e++) check_i2s(3, QK_I2S * (64 + e), 5, e % 2 ? 4 : 1, 2, 0);
    for (int e = 0; e < 4; e++) check_i2s(2, QK_I2S * (7 + e), 3, 1, 2, 0);
    check_i2s(24, QK_I2S * 20, 40, 4, 0, 0);
    check_tq(BK_TQ1_0, 9, QK_K * 8, 20, 4, 1, 0);
    check_f16(BK_F16_GEMM, 19, 2560, 40, 4, 0, 0);
    check_f16(BK_F16_VEC_DOT, 1, 2560 + 37, 70, 4, 1, 0);
    check_f16(BK_F16_VEC_DOT, 3, 640, 9, 1, 2, 0); /* inf and NaN in both operands */
    check_f16(BK_F16_GEMM, 9, 640, 9, 1, 3, 0);
    check_i2s(0, QK_I2S, 3, 1, 0, 0), check_i2s(2, 0, 3, 1, 0, 0), check_i2s(2, QK_I2S, 0, 1, 0, 0);
    check_f16(BK_F16_VEC_DOT, 2, 0, 3, 1, 0, 0), check_f16(BK_F16_GEMM, 0, 16, 3, 1, 0, 0);
    check_tq(BK_TQ2_0, 2, 0, 3, 1, 0, 0);
    /* rejected shapes: the same code from both variants, nothing written */
    check_i2s(2, 100, 3, 1, 0, BK_EBADK), check_i2s(2, QK_I2S + 1, 3, 1, 0, BK_EBADK);
    check_i2s(-1, QK_I2S, 3, 1, 0, BK_EBADARG), check_i2s(2, QK_I2S, -1, 1, 0, BK_EBADARG);
    check_tq(BK_TQ2_0, 2, QK_I2S, 3, 1, 0, BK_EBADK), check_tq(BK_TQ1_0, 2, QK_K + 16, 3, 1, 0, BK_EBADK);
    check_tq(7, 2, QK_K, 3, 1, 0, BK_EBADARG);
    check_f16(BK_F16_GEMM, 2, 24, 3, 1, 0, BK_EBADK), check_f16(5, 2, 32, 3, 1, 0, BK_EBADARG);
    check_f16(BK_F16_VEC_DOT, 2, 32, -1, 1, 0, BK_EBADARG);
    check_quant(2, 100); /* q8_k: BK_EBADK */
    /* one decoder layer, prefill and last-row forms */
    check_layer(3, 0, 1), check_layer(4, 1, 3), check_layer(1, 0, 1);

    printf("neon_check: %ld checks, %d mismatches, %d NaN-vs-NaN payload differences (allowed); bk_bitnet_layer rc %d\n",
           g_checks, g_failures, g_nan_payload, g_layer_rc);
    return g_failures ? 1 : 0;
}
#endif
