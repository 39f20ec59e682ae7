/* Weight-only 8- and 4-bit matmul for the CPU, in MLX's affine format (quant_gemm.h).
 *
 * Why: MLX's CPU quantized_matmul is a scalar loop, 15-30x slower than a float32
 * product here, so 4/8-bit checkpoints used to be dequantized to float32 at load and
 * ran no faster than float32. This kernel reads each packed weight once per product and
 * never expands it in memory: decode reads 1/4 (8-bit) or 1/8 (4-bit) of the float32
 * bytes per token, plus the scales.
 *
 * How: like llama.cpp, the activations are quantized to int8 per row and block of 32
 * (scale d = max|x| / 127), so a block's dot product is an integer sum (AVX512-VNNI
 * vpdpbusd: u8 x s8 -> s32; AVX2 maddubs) followed by one float multiply-add:
 *   out[m,n] = sum_g s[n,g] sum_{blocks of g} d[m,blk] sum_k q[n,k] x8[m,k]
 *            + sum_g b[n,g] sum_{k in g} x[m,k]
 * The bias term uses the float sums of x, so it is exact up to float rounding.
 *
 * Every output is computed by the same sequence of operations whatever tile holds it,
 * so a row's result does not depend on the other rows of the product (batch
 * invariance, tested). Instruction sets are chosen at run time (no -march flag).
 */
#define _GNU_SOURCE /* sched_getaffinity (pool.h) */
#include "quant_gemm.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Activations are quantized in blocks of 32 (as llama.cpp's Q8_0), whatever the
 * weights' group size: finer than a group of 64 or 128, so half the rounding error. */
enum { MAX_THREADS = 64, MAX_GROUPS = 1024, NB = 4, MB = 4, QK = 32 };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CPU_RELAX() __builtin_ia32_pause()
#define HAVE_X86 1
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#include "pool.h"

struct qjob {
    int M, N, K, bits, G, groups, blocks; /* blocks: K / QK activation blocks */
    int packed;           /* the packed layout (quant_gemm.h): lanes of 16 rows */
    size_t row_bytes;
    const uint8_t *w;
    const void *scales, *biases;
    int f16;
    const int8_t *x8;     /* (M, K); 4-bit SIMD paths permute each chunk (see permuted) */
    const float *xd;      /* (M, blocks): each block's int8 scale */
    const float *xsum;    /* (M, groups): sum of the float activations of each weight group */
    const int32_t *x8sum; /* (M, blocks): sum of each block's int8 activations */
    float *out;           /* (M, N) */
};

typedef void (*qrows_fn)(const struct qjob *, int, int);

/* ---- shared scalar helpers ---------------------------------------------------------- */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal half: normalise */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Where row n's group g (or word g) sits in a (rows, count) array, or in its packed
 * (rows/16, count, 16) form. */
static inline size_t param_index(const struct qjob *j, int n, int g, int count) {
    if (!j->packed) return (size_t)n * count + g;
    return ((size_t)(n / 16) * count + g) * 16 + n % 16;
}

/* A row's scales and biases as float32 (converted once per row block). */
static void row_params(const struct qjob *j, int n, float *s, float *b) {
    if (j->packed) { /* generic path only: the SIMD packed tiles load lanes of 16 rows */
        for (int g = 0; g < j->groups; g++) {
            size_t at = param_index(j, n, g, j->groups);
            s[g] = j->f16 ? half_to_float(((const uint16_t *)j->scales)[at]) : ((const float *)j->scales)[at];
            b[g] = j->f16 ? half_to_float(((const uint16_t *)j->biases)[at]) : ((const float *)j->biases)[at];
        }
        return;
    }
    size_t at = (size_t)n * j->groups;
    if (!j->f16) {
        memcpy(s, (const float *)j->scales + at, sizeof(float) * j->groups);
        memcpy(b, (const float *)j->biases + at, sizeof(float) * j->groups);
        return;
    }
    const uint16_t *hs = (const uint16_t *)j->scales + at, *hb = (const uint16_t *)j->biases + at;
    for (int g = 0; g < j->groups; g++) {
        s[g] = half_to_float(hs[g]);
        b[g] = half_to_float(hb[g]);
    }
}

/* Where element i lands: 4-bit SIMD paths put each chunk's even elements first, then
 * its odd ones, the order a chunk's bytes of nibbles unpack in (chunk: the SIMD width
 * in bytes, 64 or 32, a multiple of the activation block; 0: no permutation). */
static inline int permuted(int i, int chunk) {
    if (!chunk) return i;
    int r = i % chunk;
    return i - r + ((r & 1) ? chunk / 2 + r / 2 : r / 2);
}

#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: x + it - it rounds x, for |x| < 2^22 */

/* Row m of x as int8 per block of 32 (see quantize_activations). */
static void quantize_row(const struct qjob *j, const float *x, int chunk, int m, int8_t *x8,
                         float *xd, float *xsum, int32_t *x8sum) {
    const float *row = x + (size_t)m * j->K;
    for (int g = 0; g < j->groups; g++) {
        float sum = 0.0f;
        for (int i = g * j->G; i < (g + 1) * j->G; i++) sum += row[i];
        xsum[(size_t)m * j->groups + g] = sum;
    }
    for (int blk = 0; blk < j->blocks; blk++) {
        const float *src = row + (size_t)blk * QK;
        int8_t *dst = x8 + (size_t)m * j->K + (size_t)blk * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(src[i]);
            amax = a > amax ? a : amax;
        }
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < QK; i++) {
            /* Round to nearest even as nearbyintf does (|v| <= 127 here), without the
             * libm call the baseline ISA needs for it (~20 ns an element). */
            float q = (src[i] * id + ROUND_MAGIC) - ROUND_MAGIC;
            int v = q > 127.0f ? 127 : (q < -127.0f ? -127 : (int)q);
            dst[permuted(blk * QK + i, chunk) - blk * QK] = (int8_t)v;
            total += v;
        }
        xd[(size_t)m * j->blocks + blk] = amax / 127.0f;
        x8sum[(size_t)m * j->blocks + blk] = total;
    }
}

struct quantize_task_args {
    const struct qjob *j;
    const float *x;
    int chunk;
};

static void quantize_task(const void *ctx, int part, int parts) {
    const struct quantize_task_args *t = ctx;
    const struct qjob *j = t->j;
    int m0, m1;
    pool_split(part, parts, j->M, 1, &m0, &m1);
    /* The job's buffers are const for the tiles; quant_matmul allocated them for this. */
    for (int m = m0; m < m1; m++)
        quantize_row(j, t->x, t->chunk, m, (int8_t *)j->x8, (float *)j->xd, (float *)j->xsum,
                     (int32_t *)j->x8sum);
}

/* Each row of x to int8 per block of 32 with its scale (xd), the block sums of the int8
 * values (x8sum) and the float sums per weight group (xsum), into j's buffers. Rows are
 * independent, so a prefill's many rows go over the pool. */
static void quantize_activations(const struct qjob *j, const float *x, int chunk) {
    struct quantize_task_args t = {j, x, chunk};
    pool_run(quantize_task, &t, j->M >= 16);
}

static inline int weight_at(const struct qjob *j, int n, int k) {
    const int per_word = 32 / j->bits;
    uint32_t word;
    memcpy(&word, j->w + 4 * param_index(j, n, k / per_word, j->K / per_word), sizeof word);
    return (int)((word >> (j->bits * (k % per_word))) & ((1u << j->bits) - 1));
}

/* ---- generic: plain C, any CPU -------------------------------------------------------- */

static void qrows_generic(const struct qjob *j, int n0, int n1) {
    float s[MAX_GROUPS], b[MAX_GROUPS];
    const int per_group = j->G / QK;
    for (int n = n0; n < n1; n++) {
        row_params(j, n, s, b);
        for (int m = 0; m < j->M; m++) {
            const int8_t *xq = j->x8 + (size_t)m * j->K;
            const float *xd = j->xd + (size_t)m * j->blocks, *xs = j->xsum + (size_t)m * j->groups;
            float acc = 0.0f, bias = 0.0f;
            for (int g = 0; g < j->groups; g++) {
                float group = 0.0f;
                for (int blk = g * per_group; blk < (g + 1) * per_group; blk++) {
                    int32_t isum = 0;
                    for (int k = blk * QK; k < (blk + 1) * QK; k++) isum += weight_at(j, n, k) * xq[k];
                    group += (float)isum * xd[blk];
                }
                acc += group * s[g];
            }
            for (int g = 0; g < j->groups; g++) bias += b[g] * xs[g];
            j->out[(size_t)m * j->N + n] = acc + bias;
        }
    }
}

#ifdef HAVE_X86
#include "quant_gemm_x86.h"
#include "quant_packed_x86.h"
#endif

/* ---- dispatch ------------------------------------------------------------------------ */

struct qvariant {
    const char *name;
    qrows_fn q8, q4, packed8, packed4; /* packed*: the packed layout, rows n0..n1 */
    int chunk; /* 4-bit activations are permuted within chunks of this many (permuted) */
    int packed_chunk; /* the same, for the packed layout */
    int group_multiple, k_multiple; /* the group sizes and widths it takes */
    int (*supported)(void);
};

static int always(void) { return 1; }

/* Best first. */
static const struct qvariant qvariants[] = {
#ifdef HAVE_X86
    {"avx512-vnni", qrows_avx512_q8, qrows_avx512_q4, prows_avx512_q8, prows_avx512_q4, 64, 8, 32,
     64, has_avx512_vnni},
    {"avx2", qrows_avx2_q8, qrows_avx2_q4, prows_avx2_q8, prows_avx2_q4, 32, 8, 32, 32, has_avx2},
#endif
    {"generic", qrows_generic, qrows_generic, qrows_generic, qrows_generic, 0, 0, 1, 1, always},
};
enum { N_VARIANTS = sizeof qvariants / sizeof qvariants[0] };

static int chosen_variant = -1; /* index into qvariants; -1: not chosen yet */
static atomic_int configured; /* threads set, by the caller or on the first product */

static int best_variant(void) {
    for (int i = 0; i < N_VARIANTS; i++)
        if (qvariants[i].supported()) return i;
    return N_VARIANTS - 1;
}

int ffai_quant_configure(int threads, const char *isa) {
    int chosen = -1;
    for (int i = 0; i < N_VARIANTS; i++) {
        int named = isa && *isa && strcmp(isa, qvariants[i].name) == 0;
        if ((named || !(isa && *isa)) && qvariants[i].supported()) {
            chosen = i;
            break;
        }
    }
    if (chosen < 0) return -1;
    chosen_variant = chosen;
    if (threads >= 1) atomic_store(&configured, 1);
    return threads >= 1 ? pool_configure(threads) : pool_wanted_threads;
}

const char *ffai_quant_isa(void) {
    if (chosen_variant < 0) chosen_variant = best_variant();
    return qvariants[chosen_variant].name;
}

int ffai_quant_threads(void) { return pool_wanted_threads; }

/* The best variant this call's shape allows, from the chosen one down (the packed
 * tiles take any group size and width the contract allows). */
static const struct qvariant *variant_for(int group_size, int K, int packed) {
    if (chosen_variant < 0) chosen_variant = best_variant();
    for (int i = chosen_variant; i < N_VARIANTS; i++)
        if (qvariants[i].supported() && (packed || (group_size % qvariants[i].group_multiple == 0 &&
                                                    K % qvariants[i].k_multiple == 0)))
            return &qvariants[i];
    return &qvariants[N_VARIANTS - 1];
}

#include "act_kernels.h"
#include "attn_kernels.h"

struct qtask {
    const struct qjob *job;
    qrows_fn rows;
};

static void qrows_task(const void *ctx, int part, int parts) {
    const struct qtask *t = ctx;
    int n0, n1;
    pool_split(part, parts, t->job->N, 16, &n0, &n1);
    if (n0 < n1) t->rows(t->job, n0, n1);
}

static int quant_matmul(const float *x, const uint32_t *w, const void *scales, const void *biases,
                        float *out, int M, int N, int K, int bits, int group_size, int scales_f16,
                        int packed) {
    if (!x || !w || !scales || !biases || !out || M < 1 || N < 1 || K < 1) return -1;
    if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128))
        return -1;
    if (K % group_size || K / group_size > MAX_GROUPS) return -1;
    if (!atomic_exchange(&configured, 1)) {
        pool_configure(pool_cpus()); /* until the caller says otherwise */
    }
    const struct qvariant *v = variant_for(group_size, K, packed);
    struct qjob j = {M, N, K, bits, group_size, K / group_size, K / QK, packed, (size_t)K * bits / 8,
                     (const uint8_t *)w, scales, biases, scales_f16 != 0,
                     NULL, NULL, NULL, NULL, out};
    size_t blocks = (size_t)M * j.blocks, groups = (size_t)M * j.groups;
    int8_t *x8 = malloc((size_t)M * K + 64);
    float *xf = malloc(sizeof(float) * (blocks + groups));
    int32_t *x8sum = malloc(sizeof(int32_t) * blocks);
    if (!x8 || !xf || !x8sum) {
        free(x8), free(xf), free(x8sum);
        return -1;
    }
    int chunk = bits == 8 ? 0 : (packed ? v->packed_chunk : v->chunk);
    j.x8 = x8, j.xd = xf, j.xsum = xf + blocks, j.x8sum = x8sum;
    quantize_activations(&j, x, chunk);
    qrows_fn rows = packed ? (bits == 8 ? v->packed8 : v->packed4) : (bits == 8 ? v->q8 : v->q4);
    struct qtask task = {&j, rows};
    /* Below ~256 KB of weight bytes x rows a second thread saves less than it costs. */
    int share = (long)N * K * bits / 8 * M >= (256L << 10) && N >= 32 * pool_wanted_threads;
    pool_run(qrows_task, &task, share);
    free(x8), free(xf), free(x8sum);
    return 0;
}

int ffai_quant_matmul(const float *x, const uint32_t *w, const void *scales, const void *biases,
                      float *out, int M, int N, int K, int bits, int group_size, int scales_f16) {
    return quant_matmul(x, w, scales, biases, out, M, N, K, bits, group_size, scales_f16, 0);
}

int ffai_quant_matmul_packed(const float *x, const uint32_t *w, const void *scales,
                             const void *biases, float *out, int M, int N, int K, int bits,
                             int group_size, int scales_f16) {
    return quant_matmul(x, w, scales, biases, out, M, N, K, bits, group_size, scales_f16, 1);
}
