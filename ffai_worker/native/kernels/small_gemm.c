/* Decode-shaped float32 matmuls for MLX's CPU backend: C = alpha * A @ B^T + beta * C
 * with A (M, K) a few activation rows and B (N, K) a weight matrix, row-major.
 *
 * Why: MLX calls cblas_sgemm for every matmul. OpenBLAS 0.3.21's sgemm packs the
 * whole weight matrix into panels before multiplying, so a decode step (M = 1..16
 * rows) streams each weight about three times; measured on a 545 MB (151936, 896)
 * LM head, 2-core Xeon: sgemm M=1 74.6 ms, M=8 108 ms, against 28.8 ms for one
 * sgemv. Here each weight row is read once from memory and dotted with all M
 * activation rows while it sits in L1, so a step costs about one pass over the
 * weights whatever M is. Every output is the same dot product in the same order
 * whatever M is or how rows are split over threads, so a sequence's logits do not
 * depend on what it is batched with.
 *
 * Loaded (RTLD_GLOBAL, before the real BLAS) by ffai_worker/blas.py, which hands
 * over the real cblas_sgemm for every other shape. No dependencies but pthreads.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { MAX_ROWS = 32, MAX_THREADS = 64 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static sgemm_fn real_sgemm;
static int max_rows = 16;
static long min_parallel = 1 << 16; /* N * K elements below which one thread does it */
/* Weights under ~1 MB sit in cache, where OpenBLAS's packed AVX-512 kernels win. */
static long min_elements = 1 << 18;
static int n_threads = 1;      /* threads running, the caller included */
static int wanted_threads = 1; /* threads to start on first use */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static atomic_long calls_taken, calls_passed;

struct job {
    int M, N, K, lda, ldb, ldc;
    float alpha, beta;
    const float *A, *B;
    float *C;
};

#define LOAD(p) (*(const v8 *)(p))

/* Explicit FMA where the CPU has it; the build turns implicit contraction off, so
 * every tile rounds the same way. */
#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
static inline v8 fmadd(v8 a, v8 b, v8 c) {
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
#else
static inline v8 fmadd(v8 a, v8 b, v8 c) { return a * b + c; }
#endif

static inline float hsum(v8 s) {
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* A tile of NB weight rows x MB activation rows. Each output has one accumulator
 * summed over k in order, then the same horizontal sum and scalar tail: identical
 * arithmetic whichever tile computes it. Loads per FMA fall as tiles grow. */
#define TILE(NB, MB)                                                                    \
    static void tile_##NB##_##MB(const struct job *j, int n, int m) {                  \
        const float *A = j->A + (size_t)m * j->lda, *W = j->B + (size_t)n * j->ldb;    \
        v8 s[NB][MB];                                                                   \
        for (int r = 0; r < NB; r++)                                                    \
            for (int c = 0; c < MB; c++) s[r][c] = (v8){0};                             \
        int k = 0;                                                                      \
        for (; k + 8 <= j->K; k += 8) {                                                 \
            v8 a[MB];                                                                   \
            for (int c = 0; c < MB; c++) a[c] = LOAD(A + (size_t)c * j->lda + k);       \
            for (int r = 0; r < NB; r++) {                                              \
                v8 w = LOAD(W + (size_t)r * j->ldb + k);                                \
                for (int c = 0; c < MB; c++) s[r][c] = fmadd(a[c], w, s[r][c]);        \
            }                                                                           \
        }                                                                               \
        for (int r = 0; r < NB; r++)                                                    \
            for (int c = 0; c < MB; c++) {                                              \
                float t = hsum(s[r][c]);                                                \
                for (int i = k; i < j->K; i++)                                          \
                    t += A[(size_t)c * j->lda + i] * W[(size_t)r * j->ldb + i];         \
                store(j, n + r, m + c, t);                                              \
            }                                                                           \
    }

static inline void store(const struct job *j, int n, int m, float value) {
    float *c = j->C + (size_t)m * j->ldc + n;
    value *= j->alpha;
    *c = j->beta == 0.0f ? value : value + j->beta * *c;
}

TILE(4, 4)
TILE(4, 1)
TILE(1, 4)
TILE(1, 1)

static void run_rows(const struct job *j, int n0, int n1) {
    int n = n0;
    for (; n + 4 <= n1; n += 4) {
        int m = 0;
        for (; m + 4 <= j->M; m += 4) tile_4_4(j, n, m);
        for (; m < j->M; m++) tile_4_1(j, n, m);
    }
    for (; n < n1; n++) {
        int m = 0;
        for (; m + 4 <= j->M; m += 4) tile_1_4(j, n, m);
        for (; m < j->M; m++) tile_1_1(j, n, m);
    }
}

/* A small pool: workers spin briefly on a generation counter, then sleep. The spin
 * covers the gap between a decode step's matmuls without holding a core for long
 * after the step (prefill's OpenBLAS threads want both cores). */
#define SPIN_SECONDS 200e-6

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static pthread_t workers[MAX_THREADS];
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

static void *worker_main(void *arg) {
    int part = (int)(intptr_t)arg;
    long seen = 0;
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

/* Called once by blas.py: the real sgemm, the largest M taken, the thread count, and
 * the smallest weight (N * K elements) taken. */
int ffai_small_gemm_init(sgemm_fn fallback, int rows, int threads, long smallest) {
    real_sgemm = fallback;
    if (smallest >= 0) min_elements = smallest;
    max_rows = rows < 0 ? 0 : (rows > MAX_ROWS ? MAX_ROWS : rows);
    wanted_threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    return wanted_threads;
}

/* Threads start with the first product big enough to share: a process that never
 * runs one (a client, a tiny model) never has them. */
static void start_pool(void) {
    for (int t = 1; t < wanted_threads; t++) {
        if (pthread_create(&workers[t], NULL, worker_main, (void *)(intptr_t)t) != 0) break;
        pthread_detach(workers[t]);
        n_threads = t + 1;
    }
}

long ffai_small_gemm_calls(int taken) { return taken ? calls_taken : calls_passed; }

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc) {
    if (order != ROW_MAJOR || trans_a != NO_TRANS || trans_b != TRANS || M > max_rows ||
        M < 1 || N < 1 || K < 1 || (long)N * K < min_elements) {
        atomic_fetch_add_explicit(&calls_passed, 1, memory_order_relaxed);
        real_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    atomic_fetch_add_explicit(&calls_taken, 1, memory_order_relaxed);
    struct job j = {M, N, K, lda, ldb, ldc, alpha, beta, A, B, C};
    int parallel = wanted_threads > 1 && (long)N * K >= min_parallel && N >= 32 * wanted_threads;
    if (parallel) pthread_once(&pool_once, start_pool);
    if (parallel && n_threads > 1 && !atomic_flag_test_and_set(&pool_busy)) {
        run_parallel(&j);
        atomic_flag_clear(&pool_busy);
    } else {
        run_rows(&j, 0, N);
    }
}
