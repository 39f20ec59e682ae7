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
#define _POSIX_C_SOURCE 200809L
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
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD

#define VARIANT avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VW 8
#define FMADD(a, b, c) ((vec_avx2)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD
#define HAVE_X86_VARIANTS 1

#elif defined(__aarch64__)
#include <arm_neon.h>
#define CPU_RELAX() __asm__ volatile("yield")
/* NEON is part of the aarch64 baseline: one variant, fused multiply-add. */
#define VARIANT neon
#define TARGET
#define VW 4
#define FMADD(a, b, c) ((vec_neon)vfmaq_f32((float32x4_t)(c), (float32x4_t)(a), (float32x4_t)(b)))
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD

#else
#define CPU_RELAX() ((void)0)
#endif

/* The portable variant: plain vector arithmetic, unfused (the build turns implicit
 * contraction off, so every tile rounds the same way). */
#define VARIANT generic
#define TARGET
#define VW 8
#define FMADD(a, b, c) ((a) * (b) + (c))
#include "small_gemm_tiles.h"
#undef VARIANT
#undef TARGET
#undef VW
#undef FMADD

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

/* ---- thread pool ------------------------------------------------------------------- */

/* Workers spin briefly on a generation counter, then sleep. The spin covers the gap
 * between a decode step's matmuls without holding a core for long after the step
 * (prefill's OpenBLAS threads want both cores). */
#define SPIN_SECONDS 200e-6

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int n_threads = 1;      /* threads running, the caller included */
static int wanted_threads = 1; /* threads to start on first use */
static atomic_int pool_started;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static const struct job *current;
static atomic_long generation;
static atomic_int pending;
static atomic_flag pool_busy = ATOMIC_FLAG_INIT; /* a second calling thread runs alone */

static void split(int part, int parts, int N, int *n0, int *n1) {
    /* Chunks of 16 rows keep each thread's writes off its neighbours' cache lines. */
    int blocks = (N + 15) / 16;
    *n0 = (int)((long)blocks * part / parts) * 16;
    *n1 = (int)((long)blocks * (part + 1) / parts) * 16;
    if (*n1 > N) *n1 = N;
}

static long start_generation; /* the generation workers see as done when they start */

static void *worker_main(void *arg) {
    int part = (int)(intptr_t)arg;
    long seen = start_generation; /* written before pthread_create, which orders it */
    for (;;) {
        long gen = atomic_load_explicit(&generation, memory_order_acquire);
        double until = seconds() + SPIN_SECONDS;
        for (int spin = 0; gen == seen; spin++) {
            CPU_RELAX();
            gen = atomic_load_explicit(&generation, memory_order_acquire);
            if ((spin & 63) == 0 && seconds() > until) break;
        }
        if (gen == seen) {
            pthread_mutex_lock(&lock);
            while ((gen = atomic_load(&generation)) == seen) pthread_cond_wait(&wake, &lock);
            pthread_mutex_unlock(&lock);
        }
        seen = gen;
        int n0, n1;
        split(part, n_threads, current->N, &n0, &n1);
        run_rows(current, n0, n1);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
    }
    return NULL;
}

/* Threads start with the first product big enough to share: a process that never
 * runs one (a client, a tiny model) never has them. */
static void start_pool(void) {
    pthread_mutex_lock(&start_lock);
    if (!atomic_load(&pool_started)) {
        start_generation = atomic_load(&generation);
        for (int t = 1; t < wanted_threads; t++) {
            pthread_t thread;
            if (pthread_create(&thread, NULL, worker_main, (void *)(intptr_t)t) != 0) break;
            pthread_detach(thread);
            n_threads = t + 1;
        }
        atomic_store(&pool_started, 1);
    }
    pthread_mutex_unlock(&start_lock);
}

static void run_parallel(const struct job *j) {
    current = j;
    atomic_store(&pending, n_threads - 1);
    pthread_mutex_lock(&lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    int n0, n1;
    split(0, n_threads, j->N, &n0, &n1);
    run_rows(j, n0, n1);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) CPU_RELAX();
}

/* fork(): a child has only the forking thread, so the pool's workers are gone. Before
 * the fork no product may be in flight (it would be half done in the child); after
 * it the child forgets the pool and starts a fresh one on its first shared product. */
static void before_fork(void) {
    while (atomic_flag_test_and_set(&pool_busy)) CPU_RELAX();
    pthread_mutex_lock(&start_lock);
    pthread_mutex_lock(&lock);
}

static void after_fork_parent(void) {
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&start_lock);
    atomic_flag_clear(&pool_busy);
}

static void after_fork_child(void) {
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&start_lock);
    pthread_cond_init(&wake, NULL); /* its waiters were the parent's threads */
    n_threads = 1;
    atomic_store(&pending, 0);
    atomic_store(&pool_started, 0);
    atomic_flag_clear(&pool_busy);
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
    wanted_threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    static int registered;
    if (!registered && wanted_threads > 1)
        registered = pthread_atfork(before_fork, after_fork_parent, after_fork_child) == 0;
    return wanted_threads;
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
    int parallel = wanted_threads > 1 && (long)N * K >= min_parallel && N >= 32 * wanted_threads;
    if (parallel && !atomic_load(&pool_started)) start_pool();
    if (parallel && n_threads > 1 && !atomic_flag_test_and_set(&pool_busy)) {
        run_parallel(&j);
        atomic_flag_clear(&pool_busy);
    } else {
        run_rows(&j, 0, N);
    }
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
