/* The quantized matmul kernel's contract (quant_gemm.c), called by the MLX primitive
 * in quant_ops.cpp. */
#ifndef FFAI_QUANT_GEMM_H
#define FFAI_QUANT_GEMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* out[M,N] = x[M,K] @ dequant(w)[N,K]^T in MLX's affine format:
 * w[n, k] = scale[n, k/G] * q[n, k] + bias[n, k/G], q unsigned (bits = 4 or 8), packed
 * little-endian in uint32 words exactly as mx.quantize writes them (row n has K*bits/32
 * words; for bits = 4, element k sits in bits 4*(k%8) of word k/8).
 * x, out: row-major contiguous float32. scales/biases: (N, K/G) contiguous, float32 if
 * scales_f16 == 0, IEEE half if scales_f16 == 1. G (group_size) in {32, 64, 128};
 * K % G == 0. The activations are quantized to int8 per row and block of 32 (like
 * llama.cpp's Q8_0 activations), so the result is within int8 rounding of the float product.
 * Returns 0, or -1 for arguments it cannot take (then the caller must fall back).
 * Thread-safe. A row's result does not depend on the other rows. */
int ffai_quant_matmul(const float *x, const uint32_t *w, const void *scales, const void *biases,
                      float *out, int M, int N, int K, int bits, int group_size, int scales_f16);

/* The same product on weights in the packed layout (quant.py's pack): rows in blocks of
 * 16, N padded to Np = 16 * ceil(N / 16) with zero rows; w as (Np/16, K*bits/32, 16)
 * uint32, word i of a block's 16 rows side by side, and scales/biases as (Np/16, K/G, 16).
 * A block's weights are then one contiguous stream, and one SIMD load holds a word of
 * each of 16 rows: each lane accumulates its own row, with no horizontal sums. N is the
 * true output width (out is (M, N)). Same return value and guarantees as above. */
int ffai_quant_matmul_packed(const float *x, const uint32_t *w, const void *scales,
                             const void *biases, float *out, int M, int N, int K, int bits,
                             int group_size, int scales_f16);

/* out[i] = silu(g[i]) * u[i], float32, with MLX's exp polynomial (act_kernels.h). */
void ffai_silu_mul(const float *g, const float *u, float *out, size_t n);

/* Softmax of each row of x (rows, cols) into out. causal_length > 0: row r attends only
 * its first causal_offset + r % causal_length + 1 columns (the rest get 0), the causal
 * mask of a (.., L, T) score block with L = causal_length and T - L = causal_offset. */
void ffai_softmax_rows(const float *x, float *out, int rows, int cols, int causal_length,
                       int causal_offset);

/* RMSNorm of each row of x (rows, cols): x * (1 / sqrt(mean(x^2) + eps)) * w[col]. */
void ffai_rms_norm(const float *x, const float *w, float *out, int rows, int cols, float eps);

/* out[r] = the index of row r's largest value (MLX's argmax: the first NaN if any, else the
 * first largest), x (rows, cols) float32, cols >= 1. */
void ffai_argmax_rows(const float *x, int32_t *out, int rows, int cols);

/* RoPE of a decode step (attn_kernels.h): the first rope_dims features of each head
 * rotate (rotate_half layout) by position * rope_scale * inv_freq[i], after the rotated
 * features are multiplied by rope_mscale (LongRoPE; 1 otherwise). */
struct ffai_rope {
    const float *inv_freq; /* rope_dims / 2 entries; NULL: no rotation */
    int rope_dims;
    float rope_scale, rope_mscale;
};

/* Stores row b's new key or value (kv_heads * head_dim floats at x + b * x_stride),
 * rotated by `rope` (keys) or as is (values, rope->inv_freq NULL), at position
 * positions[b] of row b's slot in cache ((batch, kv_heads, capacity, head_dim)
 * contiguous). Returns 0, or -1 for arguments it cannot take (nothing written then). */
int ffai_kv_write(float *cache, const float *x, long x_stride, const int32_t *positions,
                  int batch, int kv_heads, int capacity, int head_dim, const struct ffai_rope *rope);

/* One decode step's attention over the caches ffai_kv_write filled: row b's query
 * heads (heads * head_dim floats at q + b * q_stride), rotated by `rope` and scaled by
 * `scale`, each attend positions [max(0, pos - window + 1) if window > 0 else 0, pos]
 * of their key head (heads / kv_heads query heads share one), pos = positions[b].
 * softcap > 0: scores become softcap * tanh(score / softcap) before the softmax.
 * out: (batch, heads * head_dim). Returns 0, or -1 for arguments it cannot take. */
int ffai_decode_attention(const float *q, long q_stride, const float *k_cache,
                          const float *v_cache, const int32_t *positions, float *out, int batch,
                          int heads, int kv_heads, int capacity, int head_dim,
                          const struct ffai_rope *rope, float scale, int window, float softcap);

/* The instruction set in use: "avx512-vnni", "avx2", "generic" (best this CPU has). */
const char *ffai_quant_isa(void);

/* Threads a shared product uses, the caller included. */
int ffai_quant_threads(void);

/* Chooses the thread count (< 1: keep) and the instruction set (NULL or "": the best
 * this CPU has). Returns the thread count, or -1 for an ISA this CPU or build lacks. */
int ffai_quant_configure(int threads, const char *isa);

#ifdef __cplusplus
}
#endif

#endif
