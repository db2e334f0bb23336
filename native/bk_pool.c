/* The kernels' thread pool: workers wait on a generation counter (a short spin, then a condition variable),
 * so the hundreds of small products of one decoded token do not each pay for thread creation. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "bk_internal.h"

#if defined(BK_X86)
#include <immintrin.h>
#define BK_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define BK_PAUSE() __asm__ __volatile__("yield") /* the spin-wait hint, as pause on x86 */
#else
#define BK_PAUSE() ((void)0)
#endif

#define SPIN_ROUNDS 4000 /* tens of microseconds of pause (more would steal a busy core) before sleeping */

static pthread_mutex_t g_call = PTHREAD_MUTEX_INITIALIZER; /* one bk_parallel at a time */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_start = PTHREAD_COND_INITIALIZER, g_done = PTHREAD_COND_INITIALIZER;
static atomic_ulong g_gen;
static atomic_int g_pending;
static bk_task_fn g_fn;
static void *g_ctx;
static int g_n, g_run;  /* tasks in the call; those the pool's threads run (indices 1..g_run-1) */
static int g_workers;   /* started workers: indices 1..g_workers */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static _Thread_local int t_in_task;
static unsigned long g_seen_at_start[BK_MAX_THREADS];

static void *worker(void *arg) {
    int ith = (int)(intptr_t)arg;
    unsigned long seen = g_seen_at_start[ith]; /* not g_gen now: the first call may already have begun */
    t_in_task = 1;
    for (;;) {
        unsigned long gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&g_gen, memory_order_acquire)) == seen && spins++ < SPIN_ROUNDS) BK_PAUSE();
        if (gen == seen) {
            pthread_mutex_lock(&g_mu);
            while ((gen = atomic_load(&g_gen)) == seen) pthread_cond_wait(&g_start, &g_mu);
            pthread_mutex_unlock(&g_mu);
        }
        seen = gen;
        if (ith < g_run) g_fn(g_ctx, ith, g_n); /* every worker reports, so none lags into the next call */
        if (atomic_fetch_sub(&g_pending, 1) == 1) {
            pthread_mutex_lock(&g_mu);
            pthread_cond_signal(&g_done);
            pthread_mutex_unlock(&g_mu);
        }
    }
    return NULL;
}

/* a forked child has none of the parent's workers, and its locks may be held by threads that are gone */
static void reset_in_child(void) {
    g_workers = 0;
    t_in_task = 0;
    pthread_mutex_init(&g_call, NULL);
    pthread_mutex_init(&g_mu, NULL);
    pthread_cond_init(&g_start, NULL);
    pthread_cond_init(&g_done, NULL);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, reset_in_child); }

/* start workers up to n - 1; returns how many tasks can run (1 + workers) */
static int ensure_workers(int n) {
    while (g_workers < n - 1) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        g_seen_at_start[g_workers + 1] = atomic_load(&g_gen);
        int rc = pthread_create(&tid, &attr, worker, (void *)(intptr_t)(g_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        g_workers++;
    }
    return g_workers + 1;
}

void bk_parallel(bk_task_fn fn, void *ctx, int n) {
    if (n < 1) n = 1;
    if (n > BK_MAX_THREADS) n = BK_MAX_THREADS;
    if (n == 1 || t_in_task) {
        for (int i = 0; i < n; i++) fn(ctx, i, n);
        return;
    }
    pthread_once(&g_once, register_fork_handler);
    pthread_mutex_lock(&g_call);
    int have = ensure_workers(n);
    int run = n < have ? n : have; /* tasks the pool runs; any beyond (no thread could start) run here */
    pthread_mutex_lock(&g_mu);
    g_fn = fn, g_ctx = ctx, g_n = n, g_run = run;
    atomic_store(&g_pending, g_workers);
    atomic_fetch_add_explicit(&g_gen, 1, memory_order_release);
    pthread_cond_broadcast(&g_start);
    pthread_mutex_unlock(&g_mu);
    t_in_task = 1;
    fn(ctx, 0, n);
    for (int i = run; i < n; i++) fn(ctx, i, n);
    t_in_task = 0;
    int spins = 0;
    while (atomic_load_explicit(&g_pending, memory_order_acquire) > 0 && spins++ < SPIN_ROUNDS) BK_PAUSE();
    if (atomic_load(&g_pending) > 0) {
        pthread_mutex_lock(&g_mu);
        while (atomic_load(&g_pending) > 0) pthread_cond_wait(&g_done, &g_mu);
        pthread_mutex_unlock(&g_mu);
    }
    pthread_mutex_unlock(&g_call);
}

/* ---------------------------------------------------------------- per-thread scratch buffers */

typedef struct {
    void *p[BK_SCRATCH_SLOTS];
    size_t cap[BK_SCRATCH_SLOTS];
} scratch_set;

static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *arg) {
    scratch_set *set = (scratch_set *)arg;
    for (int i = 0; i < BK_SCRATCH_SLOTS; i++) free(set->p[i]);
    free(set);
}

static void scratch_key_init(void) { pthread_key_create(&g_scratch_key, scratch_free); }

void *bk_scratch(int slot, size_t bytes) {
    if (slot < 0 || slot >= BK_SCRATCH_SLOTS) return NULL;
    pthread_once(&g_scratch_once, scratch_key_init);
    scratch_set *set = (scratch_set *)pthread_getspecific(g_scratch_key);
    if (!set) {
        set = (scratch_set *)calloc(1, sizeof *set);
        if (!set || pthread_setspecific(g_scratch_key, set) != 0) {
            free(set);
            return NULL;
        }
    }
    if (set->cap[slot] >= bytes && set->p[slot]) return set->p[slot];
    free(set->p[slot]);
    /* big buffers on 2 MiB boundaries with huge pages: a few faults instead of one per 4 KiB page */
    size_t align = bytes >= ((size_t)4 << 20) ? ((size_t)2 << 20) : 64;
    size_t size = (bytes + align - 1) / align * align;
    set->p[slot] = aligned_alloc(align, size ? size : align);
    set->cap[slot] = set->p[slot] ? size : 0;
#ifdef MADV_HUGEPAGE
    if (set->p[slot] && align > 64) madvise(set->p[slot], size, MADV_HUGEPAGE);
#endif
    return set->p[slot];
}
