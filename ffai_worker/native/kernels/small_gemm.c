/* The BLAS shim MLX's CPU backend calls on Linux, with a decode-shaped sgemm in front.
 *
 * Why a shim: libmlx (the Linux `mlx[cpu]` wheel) calls `cblas_sgemm`, `cblas_dgemm`
 * and `cblas_cgemm` itself, bound by the dynamic linker to the reference BLAS the
 * wheel bundles. MLX has no hook to pass it another BLAS, and matmuls are written
 * as `a @ b` all through the model code, so the one way to change what they run is
 * to define those symbols in a library that is earlier in the global scope:
 * ffai_worker/native/blas.py loads this library with RTLD_GLOBAL before mlx is imported.
 * The interposition is confined here: this library defines only those three
 * symbols, and forwards each to function pointers it is handed by blas.py (the
 * system OpenBLAS, or the `scipy-openblas32` wheel whose symbols carry a
 * `scipy_` prefix and so cannot be bound to directly).
 *
 * Why the small-M path: OpenBLAS's sgemm packs the whole weight matrix into panels
 * before multiplying, so a decode step (M = 1..16 rows) streams each weight about
 * three times; measured on a 545 MB (151936, 896) LM head, 2-core Xeon: sgemm M=1
 * 74.6 ms, M=8 108 ms, against 28.8 ms for one sgemv. Here each weight row is read
 * once from memory and dotted with all M activation rows while it sits in L1.
 *
 * Built at install time by setuptools (no compiler at import). The tiles are
 * compiled once per instruction set with function target attributes and chosen at
 * run time with __builtin_cpu_supports. No dependencies but pthreads.
 */
#define _GNU_SOURCE /* sched_getaffinity (pool.h) */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default"))) /* built with -fvisibility=hidden */

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { MAX_ROWS = 32, MAX_THREADS = 64 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*dgemm_fn)(int, int, int, int, int, int, double, const double *, int,
                         const double *, int, double, double *, int);
typedef void (*cgemm_fn)(int, int, int, int, int, int, const void *, const void *, int,
                         const void *, int, const void *, void *, int);

struct job {
    int M, N, K, lda, ldb, ldc;
    float alpha, beta;
    const float *A, *B;
    float *C;
};

static inline void store(const struct job *j, int n, int m, float value) {
    float *c = j->C + (size_t)m * j->ldc + n;
    value *= j->alpha;
    *c = j->beta == 0.0f ? value : value + j->beta * *c;
}

/* ---- tiles, one set per instruction set -------------------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CPU_RELAX() __builtin_ia32_pause()

#define VARIANT avx512
#define TARGET __attribute__((target("avx512f,fma")))
#define VW 16
#define FMADD(a, b, c) ((vec_avx512)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD
#undef KEEP_IN_REGISTER

#define VARIANT avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VW 8
#define FMADD(a, b, c) ((vec_avx2)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD
#undef KEEP_IN_REGISTER
#define HAVE_X86_VARIANTS 1

#elif defined(__aarch64__)
#include <arm_neon.h>
#define CPU_RELAX() __asm__ volatile("yield")
/* NEON is part of the aarch64 baseline: one variant, fused multiply-add. */
#define VARIANT neon
#define TARGET
#define VW 4
#define FMADD(a, b, c) ((vec_neon)vfmaq_f32((float32x4_t)(c), (float32x4_t)(a), (float32x4_t)(b)))
#define KEEP_IN_REGISTER(v) __asm__("" : "+w"(v))
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD
#undef KEEP_IN_REGISTER

#else
#define CPU_RELAX() ((void)0)
#endif

/* The portable variant: plain vector arithmetic, unfused (the build turns implicit
 * contraction off, so every tile rounds the same way). */
#define VARIANT generic
#define TARGET
#define VW 8
#define FMADD(a, b, c) ((a) * (b) + (c))
#define KEEP_IN_REGISTER(v) ((void)0)
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD
#undef KEEP_IN_REGISTER

typedef void (*rows_fn)(const struct job *, int, int);

struct variant {
    const char *name;
    rows_fn run;
    int (*supported)(void);
};

static int always(void) { return 1; }
#ifdef HAVE_X86_VARIANTS
static int has_avx512(void) { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }
static int has_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

/* Best first. */
static const struct variant variants[] = {
#ifdef HAVE_X86_VARIANTS
    {"avx512", run_rows_avx512, has_avx512},
    {"avx2", run_rows_avx2, has_avx2},
#endif
#ifdef __aarch64__
    {"neon", run_rows_neon, always},
#endif
    {"generic", run_rows_generic, always},
};

/* ---- state ------------------------------------------------------------------------- */

static sgemm_fn real_sgemm;
static dgemm_fn real_dgemm;
static cgemm_fn real_cgemm;
static rows_fn run_rows = run_rows_generic;
static const char *isa = "generic";
static int max_rows = 16;
static long min_parallel = 1 << 16; /* N * K elements below which one thread does it */
/* Weights under ~1 MB sit in cache, where OpenBLAS's packed kernels win. */
static long min_elements = 1 << 18;
static atomic_long calls_taken, calls_passed;

/* ---- thread pool (pool.h) ------------------------------------------------------------ */

#include "pool.h"

static void rows_task(const void *ctx, int part, int parts) {
    const struct job *j = ctx;
    int n0, n1;
    pool_split(part, parts, j->N, 16, &n0, &n1);
    run_rows(j, n0, n1);
}

/* ---- entry points ------------------------------------------------------------------ */

/* Called once by blas.py before mlx is imported: the real BLAS's three gemms. */
EXPORT int ffai_blas_init(sgemm_fn sgemm, dgemm_fn dgemm, cgemm_fn cgemm) {
    if (!sgemm || !dgemm || !cgemm) return -1;
    real_sgemm = sgemm;
    real_dgemm = dgemm;
    real_cgemm = cgemm;
    return 0;
}

/* The small-M path: the largest M taken (0: off), the thread count, the smallest
 * weight (N * K elements) taken (-1: default), and the instruction set ("" or NULL:
 * the best this CPU has). Returns the threads it will use, or -1 for an ISA this
 * CPU or build lacks. */
EXPORT int ffai_small_gemm_init(int rows, int threads, long smallest, const char *want) {
    const struct variant *chosen = NULL;
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
        int named = want && *want && strcmp(want, variants[i].name) == 0;
        if ((named || !(want && *want)) && variants[i].supported()) {
            chosen = &variants[i];
            break;
        }
    }
    if (!chosen) return -1;
    run_rows = chosen->run;
    isa = chosen->name;
    if (smallest >= 0) min_elements = smallest;
    max_rows = rows < 0 ? 0 : (rows > MAX_ROWS ? MAX_ROWS : rows);
    return pool_configure(threads);
}

EXPORT const char *ffai_small_gemm_isa(void) { return isa; }

EXPORT long ffai_small_gemm_calls(int taken) { return taken ? calls_taken : calls_passed; }

static void not_initialised(void) {
    fputs("ffai_worker: BLAS shim called before ffai_blas_init\n", stderr);
    abort();
}

EXPORT void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc) {
    if (order != ROW_MAJOR || trans_a != NO_TRANS || trans_b != TRANS || M > max_rows ||
        M < 1 || N < 1 || K < 1 || (long)N * K < min_elements) {
        if (!real_sgemm) not_initialised();
        atomic_fetch_add_explicit(&calls_passed, 1, memory_order_relaxed);
        real_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    atomic_fetch_add_explicit(&calls_taken, 1, memory_order_relaxed);
    struct job j = {M, N, K, lda, ldb, ldc, alpha, beta, A, B, C};
    int share = (long)N * K >= min_parallel && N >= 32 * pool_wanted_threads;
    pool_run(rows_task, &j, share);
}

EXPORT void cblas_dgemm(int order, int trans_a, int trans_b, int M, int N, int K, double alpha,
                 const double *A, int lda, const double *B, int ldb, double beta, double *C,
                 int ldc) {
    if (!real_dgemm) not_initialised();
    real_dgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

EXPORT void cblas_cgemm(int order, int trans_a, int trans_b, int M, int N, int K, const void *alpha,
                 const void *A, int lda, const void *B, int ldb, const void *beta, void *C,
                 int ldc) {
    if (!real_cgemm) not_initialised();
    real_cgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
