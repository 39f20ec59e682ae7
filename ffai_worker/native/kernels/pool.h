/* A small fork-safe thread pool that splits one product across cores.
 *
 * Included by each kernel library (small_gemm.c, quant_gemm.c): every library gets its
 * own static pool, started on its first product big enough to share, so a process that
 * never runs one (a client, a tiny model) never has the threads.
 *
 * Workers spin briefly on a generation counter, then sleep. The spin covers the gap
 * between a decode step's matmuls without holding a core for long after the step
 * (prefill's OpenBLAS threads want both cores). Where the pool has every core this
 * process may use, workers spin for less: the longer gaps between products are where
 * MLX's own thread runs the small ops and the Python thread builds the next step, and
 * a spinning worker takes their core, while a sleeping one wakes late for the next
 * product (0.5B q8 decode step on 2 cores, spin 200 / 0 / 80 us: 48 / 42 / 36 ms,
 * benchmarks/NOTES.md).
 *
 * The includer defines CPU_RELAX() and MAX_THREADS before including this file. */
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define SPIN_MICROSECONDS 200
#define SPIN_MICROSECONDS_ALL_CORES 80
#ifndef POOL_CHUNKS_PER_THREAD
#define POOL_CHUNKS_PER_THREAD 4 /* chunks a shared task is cut into, per thread */
#endif

typedef void (*pool_task)(const void *ctx, int part, int parts);

static double pool_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static atomic_int pool_spin_us = SPIN_MICROSECONDS; /* 0 where the pool has every core */
static int pool_threads = 1;        /* threads running, the caller included */
static int pool_wanted_threads = 1; /* threads to start on first use */
static atomic_int pool_started;
static pthread_mutex_t pool_start_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pool_task pool_current_task;
static int pool_parts = 1; /* threads on the current task: fewer than started if lowered */
static const void *pool_current_ctx;
static atomic_long pool_generation;
/* The current task's chunks, claimed one at a time: (chunks << 16) | next unclaimed. A
 * thread that finds none left stops, so a late or descheduled worker delays nobody: the
 * running threads take its share (static halves made the caller wait, yielding, for a
 * worker that the Python thread had pushed off its core). */
static atomic_uint pool_claim;
static atomic_int pool_done; /* chunks of the current task finished */
static atomic_flag pool_busy = ATOMIC_FLAG_INIT; /* a second calling thread runs alone */
static long pool_start_generation; /* the generation workers see as done when they start */

/* Runs chunks of the current task until none is left unclaimed. A claim that succeeds
 * belongs to a task still in flight: its caller waits for every claimed chunk. */
static void pool_work(void) {
    for (;;) {
        unsigned claim = atomic_fetch_add_explicit(&pool_claim, 1, memory_order_acq_rel);
        int next = (int)(claim & 0xffff), chunks = (int)(claim >> 16);
        if (next >= chunks) return;
        pool_current_task(pool_current_ctx, next, chunks);
        atomic_fetch_add_explicit(&pool_done, 1, memory_order_release);
    }
}

static void *pool_worker_main(void *arg) {
    int part = (int)(intptr_t)arg;
    long seen = pool_start_generation; /* written before pthread_create, which orders it */
    for (;;) {
        long gen = atomic_load_explicit(&pool_generation, memory_order_acquire);
        int spin_us = atomic_load_explicit(&pool_spin_us, memory_order_relaxed);
        double until = spin_us ? pool_seconds() + 1e-6 * spin_us : 0.0;
        for (int spin = 0; gen == seen && spin_us; spin++) {
            CPU_RELAX();
            gen = atomic_load_explicit(&pool_generation, memory_order_acquire);
            if ((spin & 63) == 0 && pool_seconds() > until) break;
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool_lock);
            while ((gen = atomic_load(&pool_generation)) == seen)
                pthread_cond_wait(&pool_wake, &pool_lock);
            pthread_mutex_unlock(&pool_lock);
        }
        seen = gen;
        if (part < pool_parts) pool_work();
    }
    return NULL;
}

static void pool_start(void) {
    pthread_mutex_lock(&pool_start_lock);
    if (!atomic_load(&pool_started)) {
        pool_start_generation = atomic_load(&pool_generation);
        for (int t = 1; t < pool_wanted_threads; t++) {
            pthread_t thread;
            if (pthread_create(&thread, NULL, pool_worker_main, (void *)(intptr_t)t) != 0) break;
            pthread_detach(thread);
            pool_threads = t + 1;
        }
        atomic_store(&pool_started, 1);
    }
    pthread_mutex_unlock(&pool_start_lock);
}

/* Runs task(ctx, chunk, chunks) for every chunk, on the caller and whichever workers
 * are awake. With one thread, or while another caller holds the pool, the caller runs
 * it all alone as task(ctx, 0, 1). A task's output for a row must not depend on how
 * its rows were cut (every kernel here computes each row the same way in any chunk). */
static void pool_run(pool_task task, const void *ctx, int share) {
    if (share && pool_wanted_threads > 1 && !atomic_load(&pool_started)) pool_start();
    /* A count lowered after the start leaves the extra workers idle for this task. */
    int parts = pool_wanted_threads < pool_threads ? pool_wanted_threads : pool_threads;
    if (!share || parts < 2 || atomic_flag_test_and_set(&pool_busy)) {
        task(ctx, 0, 1);
        return;
    }
    int chunks = parts * POOL_CHUNKS_PER_THREAD;
    pool_current_task = task;
    pool_current_ctx = ctx;
    pool_parts = parts;
    atomic_store_explicit(&pool_done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool_claim, (unsigned)chunks << 16, memory_order_release);
    pthread_mutex_lock(&pool_lock);
    atomic_fetch_add_explicit(&pool_generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    pool_work();
    /* A worker that claimed a chunk but lost its core (more runnable threads than
     * cores) cannot finish while this thread spins: after a short spin, yield. */
    for (int spin = 0; atomic_load_explicit(&pool_done, memory_order_acquire) < chunks; spin++) {
        if (spin < 4096)
            CPU_RELAX();
        else
            sched_yield();
    }
    atomic_flag_clear(&pool_busy);
}

/* fork(): a child has only the forking thread, so the pool's workers are gone. Before
 * the fork no product may be in flight (it would be half done in the child); after
 * it the child forgets the pool and starts a fresh one on its first shared product. */
static void pool_before_fork(void) {
    while (atomic_flag_test_and_set(&pool_busy)) CPU_RELAX();
    pthread_mutex_lock(&pool_start_lock);
    pthread_mutex_lock(&pool_lock);
}

static void pool_after_fork_parent(void) {
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&pool_start_lock);
    atomic_flag_clear(&pool_busy);
}

static void pool_after_fork_child(void) {
    pthread_mutex_unlock(&pool_lock);
    pthread_mutex_unlock(&pool_start_lock);
    pthread_cond_init(&pool_wake, NULL); /* its waiters were the parent's threads */
    pool_threads = 1;
    atomic_store(&pool_claim, 0);
    atomic_store(&pool_started, 0);
    atomic_flag_clear(&pool_busy);
}

/* Cores this process may run on. */
static int pool_cpus(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)online : 1;
}

/* Sets the thread count used from the first shared product on (the caller included). */
static int pool_configure(int threads) {
    pool_wanted_threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    atomic_store(&pool_spin_us, pool_wanted_threads >= pool_cpus() ? SPIN_MICROSECONDS_ALL_CORES
                                                                     : SPIN_MICROSECONDS);
    static int registered;
    if (!registered && pool_wanted_threads > 1)
        registered = pthread_atfork(pool_before_fork, pool_after_fork_parent,
                                    pool_after_fork_child) == 0;
    return pool_wanted_threads;
}

/* Chunks of `align` rows keep each thread's writes off its neighbours' cache lines. */
static void pool_split(int part, int parts, int N, int align, int *n0, int *n1) {
    int blocks = (N + align - 1) / align;
    *n0 = (int)((long)blocks * part / parts) * align;
    *n1 = (int)((long)blocks * (part + 1) / parts) * align;
    if (*n1 > N) *n1 = N;
    if (*n0 > N) *n0 = N;
}
