/* PLACEHOLDER for the quantized matmul kernel (contract: quant_gemm.h).
 *
 * Plain scalar C, one thread, float32 accumulation in a fixed order (so each output row
 * depends only on its own input row: batch-invariant). It exists so the MLX primitive
 * around it can be built and tested; the real kernel replaces this file. */
#include "quant_gemm.h"

#include <stddef.h>
#include <string.h>

/* IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, NaN). */
static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal half: normalise */
        exp = 113u;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float load_param(const void *p, size_t i, int f16)
{
    return f16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

int ffai_quant_matmul(const float *x, const uint32_t *w, const void *scales, const void *biases, float *out,
                      int M, int N, int K, int bits, int group_size, int scales_f16)
{
    if (!x || !w || !scales || !biases || !out || M < 0 || N < 0 || K <= 0)
        return -1;
    if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128))
        return -1;
    if (K % group_size != 0 || (scales_f16 != 0 && scales_f16 != 1))
        return -1;
    const int per_word = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const size_t words = (size_t)K * (size_t)bits / 32u;
    const int groups = K / group_size;
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * (size_t)K;
        for (int n = 0; n < N; n++) {
            const uint32_t *wr = w + (size_t)n * words;
            float acc = 0.0f;
            for (int g = 0; g < groups; g++) {
                const size_t pi = (size_t)n * (size_t)groups + (size_t)g;
                const float s = load_param(scales, pi, scales_f16);
                const float b = load_param(biases, pi, scales_f16);
                for (int k = g * group_size; k < (g + 1) * group_size; k++) {
                    const uint32_t q = (wr[k / per_word] >> (bits * (k % per_word))) & mask;
                    acc += xr[k] * (s * (float)q + b);
                }
            }
            out[(size_t)m * (size_t)N + n] = acc;
        }
    }
    return 0;
}

const char *ffai_quant_isa(void) { return "generic"; }

int ffai_quant_threads(void) { return 1; }
