/* bitnet-crossval native kernels: integer-exact / bit-defined pieces of the BitNet b1.58 forward.
 *
 * Everything here returns what the numpy reference (bitnet_ref/ggml_ref.py, model.py) computes bit for bit: the activation
 * quantizers (bitnet.cpp's quantize_row_i8_s, ggml's quantize_row_q8_K_ref), ternary x int8 products as exact
 * int32 sums, and the float parts whose order is ggml's and is written out here operation for operation: the
 * TQ x Q8_K dot's epilogue, the F16 lm_head, the f16-cache attention and a whole bitnet-cpp decoder layer.
 *
 * Return codes: 0 ok, BK_EBADK when K is not a multiple of the format's block, BK_EBADARG otherwise.
 */
#ifndef BITNET_KERNELS_H
#define BITNET_KERNELS_H

#include <stdint.h>

#define BK_EBADK (-1)
#define BK_EBADARG (-2)
#define BK_ENOMEM (-3)
#define BK_TQ1_0 34
#define BK_TQ2_0 35
#define BK_F16_VEC_DOT 0
#define BK_F16_GEMM 1
#define BK_F32 0 /* ggml type ids of float weights */
#define BK_F16 1

/* the instruction set the products use: "avx512-vnni", "avx2", "neon" (AArch64) or "portable" */
const char *bk_isa(void);
/* force a variant ("avx512-vnni", "avx2", "neon", "portable", or "auto"); -1 if this CPU cannot run it */
int bk_set_isa(const char *name);

/* quantize_row_i8_s per row: q (t, k) int8, s (t,) float scale, sums (t,) int32 sum of q */
int bk_quantize_i8_s(const float *x, int64_t t, int64_t k, int8_t *q, float *s, int32_t *sums);
/* quantize_row_q8_K_ref per 256-value block: q (t, k) int8, d (t, k/256) float */
int bk_quantize_q8_k(const float *x, int64_t t, int64_t k, int8_t *q, float *d);

/* I2_S (x86, 128-value blocks of 32 bytes) x int8: out[t][r] = sum_j code(r, j) * q[t][j], code in 0..3
 * read straight from the packed bytes (bitnet.cpp's raw kernel sum; the caller subtracts act_sum). Several
 * tokens on AVX-512 VNNI go through a GEMM (bk_i2s_gemm.c), which returns BK_ENOMEM if its buffers fail. */
int bk_i2s_raw(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out, int nthreads);
/* the same sum with bitnet.cpp's AVX2 int16 lane accumulation (wraps modulo 2^16 over 32 blocks) */
int bk_i2s_raw_wrap16(const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                      int nthreads);

/* TQ1_0 / TQ2_0 (ggml blocks of 256) x Q8_K int8: out (t, r, k/256, 8) int32, ggml's x86 AVX2 lanes:
 * lane l of a block = sum of code*q over values v with v%32 in [4l, 4l+4) minus sum of q over [32l, 32l+32). */
int bk_tq_lanes(int type, const int8_t *q, int64_t t, int64_t k, const uint8_t *w, int64_t r, int32_t *out,
                int nthreads);

/* The whole TQ1_0 / TQ2_0 x Q8_K dot as ggml's x86 kernel computes it: the lanes above (bsums subtracted), then
 * per block acc = fma(lane, dy * d, acc) (d: the block's f16 scale) and hsum_float_8; dy (t, k/256) the Q8_K
 * scales; out (t, r) float32. BK_ENOMEM when a buffer cannot be allocated. */
int bk_tq_dot(int type, const int8_t *q, const float *dy, int64_t t, int64_t k, const uint8_t *w, int64_t r,
              float *out, int nthreads);

/* F16 rows x float32 activations: out (t, r) float32 = x (t, k) . w (r, k)^T, w the little-endian f16 bytes
 * (read in place, e.g. from a mapped file), in ggml's order for the mode:
 *   BK_F16_VEC_DOT  ggml_vec_dot_f16 (AVX-512): 4x16 float32 lanes over k & ~63, (a0+a2)+(a1+a3),
 *                   _mm512_reduce_add_ps, the tail added in double; x must hold f16 values
 *   BK_F16_GEMM     llamafile tinyBLAS F16 x F32: one 16-lane accumulator acc = fmaf(x, w, acc),
 *                   _mm512_reduce_add_ps; k % 16 == 0 (else BK_EBADK)
 * BK_ENOMEM when a thread's row buffer cannot be allocated. */
int bk_f16_matmul(int mode, const float *x, int64_t t, int64_t k, const uint8_t *w, int64_t r, float *out,
                  int nthreads);

/* ggml's attention (non-flash, AVX-512 order) over an f16 KV cache, as bitnet-cpp's profile computes it:
 * q (t, heads, d) float32 (rounded to f16 here), kc/vc (s_len, kv_heads, d) f16 bits for positions 0..s_len-1,
 * the t queries at positions s_len-t .. s_len-1 (causal), query head h reads KV head h / (heads/kv_heads);
 * out (t, heads*d) float32. n_ctx: the context length (the t == 1 path pads V to min(ceil32(s_len), ceil32(n_ctx))).
 * Bit for bit bitnet_ref's Model._attention_ggml (bk_attention.c). BK_EBADARG unless t >= 1, kv_heads divides
 * heads, d >= 1 and t <= s_len <= n_ctx; BK_ENOMEM. */
int bk_attention_f16(const float *q, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const uint16_t *kc,
                     const uint16_t *vc, int64_t s_len, int64_t n_ctx, float *out, int nthreads);

/* The exact profile's product (bk_exact.c): out (t, r) float64 = x (t, k) float64 times the rows of w in
 * bitnet_ref.exact_sum's order (ternary: 4-value groups added in order per scale block, out += s * scale;
 * float rows: 8 lanes and a fixed lane tree).
 * type: ggml's id, 34 TQ1_0 / 35 TQ2_0 / 36 I2_S (x86) packed bytes, with scale (scale_rows x nb) float32
 * (scale_rows 1 or r; nb = k/256 for TQ, 1 for I2_S), or 0 F32 / 1 F16 row bytes (scale ignored).
 * BK_EBADK when k is not a multiple of the format's block, BK_EBADARG, BK_ENOMEM. */
int bk_exact_matmul(int type, const double *x, int64_t t, int64_t k, const uint8_t *w, int64_t r,
                    const float *scale, int64_t scale_rows, int64_t nb, double *out, int nthreads);

/* bk_exact_matmul for n <= BK_EXACT_MANY ternary matrices of one type on the same activations (a layer's Q, K
 * and V, or gate and up): matrix m has r[m] rows, its scale (scale_rows[m] x nb, nb as above), out[m] (t, r[m]).
 * The same bits as n calls; the per-token tables are computed once. */
#define BK_EXACT_MANY 4
int bk_exact_matmul_many(int type, const double *x, int64_t t, int64_t k, int n, const uint8_t *const *w,
                         const int64_t *r, const float *const *scale, const int64_t *scale_rows, double *const *out,
                         int nthreads);

/* The exact profile's attention products (bk_exact.c) in bitnet_ref.exact_sum's order: q (t, heads, d) float64,
 * w (heads, t, s_len) float64, kc/vc (s_len, kv_heads, d) float32 caches read in place; query head h reads KV
 * head h / (heads / kv_heads). bk_exact_scores: out (heads, t, s_len), q . k in 8 lanes, folded.
 * bk_exact_values: out (t, heads, d), the w-weighted sum of the V rows in key order. BK_EBADARG. */
int bk_exact_scores(const double *q, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const float *kc,
                    int64_t s_len, double *out, int nthreads);
int bk_exact_values(const double *w, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const float *vc,
                    int64_t s_len, double *out, int nthreads);

/* The exact profile's elementwise steps (bk_exact.c), float64, bit for bit bitnet_ref's numpy definitions
 * (exact_sum.rms_norm, Model._rope, Model._ffn_act); rows are split over the threads. BK_EBADARG.
 * bk_exact_rms: out (t, k) = (x * (1 / sqrt(ms + eps))) * gain, ms = (x . x in 8 lanes, folded) / k.
 * bk_exact_rope: x (t, heads, d), d even, rotated in place in NeoX pairs (i, i + d/2): (a c - b s, a s + b c),
 * cos/sin (t, d/2).
 * bk_exact_relu2_mul: out (t, n) = max(gate, 0)^2 * up (a NaN gate stays NaN, as numpy's maximum). */
int bk_exact_rms(const double *x, int64_t t, int64_t k, const float *gain, double eps, double *out, int nthreads);
int bk_exact_rope(double *x, int64_t t, int64_t heads, int64_t d, const double *cos, const double *sin,
                  int nthreads);
int bk_exact_relu2_mul(const double *gate, const double *up, int64_t t, int64_t n, double *out, int nthreads);

/* cosf and sinf of n float32 angles, from the C math library this module links (ggml's RoPE calls them) */
int bk_cos_sin(const float *theta, int64_t n, float *c, float *s);

/* float32 -> f16 bits, round to nearest even (numpy's astype(float16)) */
int bk_f32_to_f16(const float *x, int64_t n, uint16_t *out);

/* One BitNet decoder layer (both sub-norms; FFN gated by ReLU^2, bitnet-b1.58, or SiLU, bitnet) as bitnet_ref's
 * bitnet-cpp profile computes it, every projection an I2_S (x86) tensor with a per-tensor scale:
 *   x (t, hidden) float32, updated in place; with last_only (and t > 1) the FFN runs on the last row only, as
 *   llama.cpp's last layer does when only the last logits are wanted, and row 0 of x holds the result;
 *   kc, vc: this layer's f16 K and V cache (n_ctx or more positions, kv_heads, head_dim): positions
 *   s_len - t .. s_len - 1 are written, 0 .. s_len - 1 are read;
 *   cos, sin (t, head_dim / 2): the RoPE angles' cosines and sines (bitnet_ref computes them with libm).
 * BK_EBADARG for inconsistent sizes, BK_EBADK when hidden or ffn is not a multiple of 128, BK_ENOMEM. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, ffn, n_ctx;
    float eps;
    int silu; /* 0: relu(gate)^2 * up; 1: silu(gate) * up */
    const float *attn_norm, *attn_sub_norm, *ffn_norm, *ffn_sub_norm; /* gains */
    const uint8_t *w[7]; /* attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down: I2_S bytes */
    float w_scale[7];    /* their per-tensor I2_S scales */
    float out_scale[7];  /* the optional `.scale` tensors; 1 where absent */
} bk_layer;
int bk_bitnet_layer(const bk_layer *L, float *x, int64_t t, int64_t s_len, uint16_t *kc, uint16_t *vc,
                    const float *cos, const float *sin, int last_only, int nthreads);

/* ggml's attention (non-flash, AVX-512 order) over an F32 KV cache, as the llama-cpp profile computes it:
 * q (t, heads, d) float32; kc/vc (s_len, kv_heads, d) float32; the t queries at positions s_len-t .. s_len-1
 * (causal); out (t, heads*d). Bit for bit Model._attention_ggml with kv_cache "f32" (bk_attention_f32.c).
 * BK_EBADARG unless d is a multiple of 64 (the definition's float32 KQ path) and t <= s_len; BK_ENOMEM. */
int bk_attention_f32(const float *q, int64_t t, int64_t heads, int64_t kv_heads, int64_t d, const float *kc,
                     const float *vc, int64_t s_len, float *out, int nthreads);

/* float weights times float32 activations as the llama-cpp profile defines them: out (t, r) float32, each the
 * exact products summed in double (8 lanes, bk_ggml_layer.c) and rounded once; w: BK_F32 float rows or BK_F16
 * little-endian f16 bytes (read in place). The caller rounds x to f16 where the profile does. */
int bk_f64_matmul(int wtype, const float *x, int64_t t, int64_t k, const void *w, int64_t r, float *out,
                  int nthreads);

/* One decoder layer as the llama-cpp profile computes it (mainline's arithmetic: Q8_K activations for TQ1_0 /
 * TQ2_0, f16-rounded activations for F16 weights, double sums for F16 / F32, ggml's F32-KV attention), in
 * place on x as bk_bitnet_layer: kc, vc are float32 caches (n_ctx or more positions, kv_heads, head_dim);
 * head_dim must be a multiple of 64. BK_EBADARG, BK_EBADK (TQ with hidden or ffn not a multiple of 256),
 * BK_ENOMEM. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, ffn, n_ctx;
    float eps;
    int silu; /* 0: relu(gate)^2 * up; 1: silu(gate) * up */
    const float *attn_norm, *attn_sub_norm, *ffn_norm, *ffn_sub_norm; /* gains */
    const void *w[7]; /* attn_q .. ffn_down: TQ1_0 / TQ2_0 block bytes, or float32 (rows, K) values */
    int type[7];      /* BK_TQ1_0, BK_TQ2_0, BK_F16 (float32 values, f16-rounded activations) or BK_F32 */
    float out_scale[7]; /* the optional `.scale` tensors; 1 where absent */
} bk_llama_layer;
int bk_llama_cpp_layer(const bk_llama_layer *L, float *x, int64_t t, int64_t s_len, float *kc, float *vc,
                       const float *cos, const float *sin, int last_only, int nthreads);

#endif
