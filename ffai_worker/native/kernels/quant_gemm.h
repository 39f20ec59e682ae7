/* ffai_worker/native/kernels/quant_gemm.h: the contract between the MLX primitive
 * (quant_ops.cpp) and the weight-only quantized matmul kernel (quant_gemm.c). */
#ifndef FFAI_QUANT_GEMM_H
#define FFAI_QUANT_GEMM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* out[M,N] = x[M,K] @ dequant(w)[N,K]^T, MLX affine format: w[n, k] = scale[n, k/G] * q[n, k] + bias[n, k/G],
 * q unsigned (bits = 4 or 8), packed little-endian in uint32 words exactly as mx.quantize writes them
 * (row n has K*bits/32 words; for bits=4, element k sits in bits 4*(k%8) of word k/8).
 * x, out: row-major contiguous float32. scales/biases: (N, K/G) contiguous, float32 if scales_f16 == 0,
 * IEEE half if scales_f16 == 1. G (group_size) in {32, 64, 128}; K % G == 0.
 * Returns 0, or -1 for arguments it cannot take (then the caller must fall back). Thread-safe. */
int ffai_quant_matmul(const float *x, const uint32_t *w, const void *scales, const void *biases, float *out,
                      int M, int N, int K, int bits, int group_size, int scales_f16);
const char *ffai_quant_isa(void); /* e.g. "avx512-vnni", "avx2", "generic" */
int ffai_quant_threads(void);

#ifdef __cplusplus
}
#endif

#endif /* FFAI_QUANT_GEMM_H */
