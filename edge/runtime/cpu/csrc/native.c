/* edge-rag's CPU decode step for llama-family decoders (edge/runtime/cpu/backend.py drives it).

   One call of er_step() runs every token of an engine step (decode rows and prompt pieces mixed)
   through all layers, reading and writing K/V in a paged fp16 block pool, and writes the logits of
   the rows that want them. Compiled at first use by edge/runtime/cpu/build.py with the system cc.

   Linears: int4 (group 32/64/128, zero point 8) and int8 (per channel) weights, repacked at load
   (edge/runtime/cpu/weights.py) into tiles of NT = 16 output columns x QB = 32 inputs. Activations
   are quantized per row and per 32-block to int8 (scale = absmax / 127), so a row's numbers never
   depend on the rows beside it. For each (row, column, block) the integer dot
       idot = sum_k (w_k - zp) * a_k          (exact in int32 on every path)
   is accumulated in float in ONE fixed order on every ISA path:
       acc += (float)idot * (wscale * ascale)  (block order 0, 1, 2, ...; no FMA: -ffp-contract=off)
   so the AVX-512 VNNI, AVX2 and scalar paths give the same bits, batched or alone.

   Tile layouts (bytes; c = column in the tile, t = 0..3):
     int4: [tile][block][chunk i = 0..3][c][t]: low nibble = w[c][32b + 4i + t],
           high nibble = w[c][32b + 16 + 4i + t]   (unpacked: chunk i -> k-groups i and i + 4)
           scales float [tile][block][c]
     int8: [tile][block][group j = 0..7][c][t] = w[c][32b + 4j + t] + 128;  scales float [tile][c]
   A k-group is 4 consecutive inputs: one int32 lane of vpdpbusd / vpmaddwd per column. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define QB 32
#define NT 16
#define MR 8

/* ER_YMM: 256-bit float code (an AVX2 CPU's), ER_ZMM: 512-bit. YMM_VNNI: the AVX2 tile's dots by ymm vpdpbusd (AVX-VNNI
   without AVX-512: Intel Alder Lake and later client cores). AVXVNNI_EVEX (EDGE_RAG_NATIVE_ISA=avxvnni on a CPU
   with AVX-512 VNNI but no AVX-VNNI): that build's code with the instruction's EVEX form, to test and time it there. */
#if defined(AVXVNNI_EVEX) || (defined(__AVX__) && !defined(__AVX512F__))
#define ER_YMM 1
#elif defined(__AVX512F__)
#define ER_ZMM 1
#endif
#if defined(__AVX2__) && (defined(AVXVNNI_EVEX) || defined(__AVXVNNI__))
#define YMM_VNNI 1
#if defined(__AVXVNNI__)
#define ydpbusd _mm256_dpbusd_avx_epi32
#else
#define ydpbusd _mm256_dpbusd_epi32
#endif
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(AVXVNNI_EVEX)
#define HAVE_AVX512BW 1
#if defined(__AVX512VNNI__)
#define HAVE_VNNI 1
#endif
#endif

typedef _Float16 kv_t;

/* ISA_AVX512: AVX-512BW without VNNI (Skylake-SP, Cascade Lake without VNNI): the zmm tile of the VNNI
   path with vpmaddubsw + vpmaddwd in place of vpdpbusd */
enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_VNNI = 3 };

int er_ymm_vnni(void) { /* 1 where the avx2 tile takes its dots by vpdpbusd (the "avxvnni" path) */
#if defined(YMM_VNNI)
    return 1;
#else
    return 0;
#endif
}

int er_isa_max(void) {
#if defined(HAVE_VNNI)
    return ISA_VNNI;
#elif defined(HAVE_AVX512BW)
    return ISA_AVX512;
#elif defined(__AVX2__)
    return ISA_AVX2;
#else
    return ISA_SCALAR;
#endif
}

static int g_isa = -1;

int er_set_isa(int isa) { /* -1: the best this build has; returns the path in use or -1 */
    if (isa < 0) isa = er_isa_max();
    if (isa > er_isa_max()) return -1;
    g_isa = isa;
    return isa;
}

static inline int cur_isa(void) { return g_isa < 0 ? er_isa_max() : g_isa; }

/* ---- a tiny thread pool ---------------------------------------------------------------------
   Not OpenMP: libgomp's barriers spin for ~300k iterations before sleeping, and with other
   processes on the cores a spinning thread steals the time its partner needs (a SmolLM2 8-row
   step measured 195 ms at load 4 against 37 ms with spinning off). Here a step is handed to
   sleeping workers through a condition variable (one wake-up per step); a thread that waits inside
   a step (for a phase's last items, the caller waiting for the workers) spins up to SPIN_NS, then yields up to
   YIELD_NS, then sleeps on a futex. Why all three:
   - sleeping at once risks a wake-up, which on a VM can cost more than a barrier's usual wait, for
     waits that end within a neighbour's short burst (an HTTP write); not measured to matter: 8
     streamed clients gave 554 tok/s sleeping after 30 us and 544 with the yield stage (two runs);
   - yielding forever loses to a long-running neighbour: a yielding core never goes idle, so the
     kernel never pulls the partner thread (queued behind another process on the other core) onto
     it (a 1-row step measured 35.7 ms instead of 3.5 while a test suite ran beside it). */
typedef void (*job_fn)(void *arg, int tid, int nth);
#define MAX_THREADS 64
#ifndef SPIN_NS
#define SPIN_NS 20000 /* longer than a phase's usual wait on a quiet machine (a few us) */
#endif
#ifndef YIELD_NS
#define YIELD_NS 1000000 /* covers a short burst of another thread (an HTTP write), short against a time slice */
#endif
static struct {
    int size; /* threads incl. the caller */
    pthread_t th[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int gen;
    job_fn fn;
    void *arg;
    int nth;
    atomic_int done, done_sleeping;
} P = {1, {0}, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t pool_init_mu = PTHREAD_MUTEX_INITIALIZER;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
static inline void futex_wait(atomic_int *a, int val) { syscall(SYS_futex, (int *)a, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0); }
static inline void futex_wake(atomic_int *a) { syscall(SYS_futex, (int *)a, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0); }
#else /* no futex: yield (what the pool did before) */
static inline void futex_wait(atomic_int *a, int val) { (void)a; (void)val; sched_yield(); }
static inline void futex_wake(atomic_int *a) { (void)a; }
#endif

/* Wait until *a != val: spin up to SPIN_NS, yield up to YIELD_NS, then sleep on the futex (counted
   in *sleepers so the waker knows to call futex_wake). Sequentially consistent atomics: a waker that changes *a and
   then reads *sleepers == 0 is ordered before the sleeper's increment, so the sleeper's futex_wait
   sees the new *a and returns. */
static void wait_change(atomic_int *a, int val, atomic_int *sleepers) {
    long long t0 = 0;
    for (int i = 0; atomic_load(a) == val; i++) {
        if (i < 64) {
            cpu_relax();
            continue;
        }
        long long t = now_ns();
        if (!t0) t0 = t;
        if (t - t0 < SPIN_NS) {
            for (int j = 0; j < 32 && atomic_load(a) == val; j++) cpu_relax();
        } else if (t - t0 < SPIN_NS + YIELD_NS) {
            sched_yield();
        } else {
            atomic_fetch_add(sleepers, 1);
            while (atomic_load(a) == val) futex_wait(a, val);
            atomic_fetch_sub(sleepers, 1);
            return;
        }
    }
}

static void *worker(void *p) {
    int tid = (int)(intptr_t)p, seen = 0;
    for (;;) {
        pthread_mutex_lock(&P.mu);
        while (P.gen == seen) pthread_cond_wait(&P.cv, &P.mu);
        seen = P.gen;
        job_fn fn = P.fn;
        void *arg = P.arg;
        int nth = P.nth;
        pthread_mutex_unlock(&P.mu);
        if (tid < nth) fn(arg, tid, nth);
        atomic_fetch_add(&P.done, 1);
        if (atomic_load(&P.done_sleeping)) futex_wake(&P.done);
    }
    return NULL;
}

static void pool_grow(int n) {
    pthread_mutex_lock(&pool_init_mu);
    if (n > MAX_THREADS) n = MAX_THREADS;
    while (P.size < n) {
        if (pthread_create(&P.th[P.size], NULL, worker, (void *)(intptr_t)P.size) != 0) break;
        pthread_detach(P.th[P.size]);
        P.size++;
    }
    pthread_mutex_unlock(&pool_init_mu);
}

/* ---- phases: work claimed from a counter, completion counted ------------------------------------
   A step is a chain of phases (a layer: qkv, attention, o, gate|up, down); each phase's work is items
   (column tiles of a GEMM, (row, kv head) units of attention, rows) that the threads claim from an
   atomic counter in small chunks, and a thread starts on a phase's items once the phase before has
   counted all of its items done. Nothing waits for a thread to *arrive*, as a barrier does: when one
   thread is descheduled (steal time on a VM, a neighbour process on its core), the other claims what
   is left of the phase and waits only for the chunk in the descheduled thread's hands. Every output
   element is still computed whole by one thread, in the one fixed order, so which thread takes which
   chunk changes no bit. Waits spin / yield / sleep as wait_change. */
typedef struct __attribute__((aligned(64))) {
    atomic_int next, done, sleepers;
    char pad[64 - 3 * sizeof(atomic_int)]; /* one cache line a phase */
} phase_t;
static inline int claim(phase_t *p, int c) { return atomic_fetch_add(&p->next, c); }
static inline void finish(phase_t *p, int n) {
    atomic_fetch_add(&p->done, n);
    if (atomic_load(&p->sleepers)) futex_wake(&p->done);
}
static void wait_phase(phase_t *p, int n) {
    for (int d; (d = atomic_load(&p->done)) < n;) wait_change(&p->done, d, &p->sleepers);
}
/* items per claim: ~16 claims per thread a phase (an atomic on a shared line costs ~0.1 us) */
static inline int chunk_of(int n, int nth) {
    int c = n / (nth * 16);
    return c < 1 ? 1 : c;
}

/* fn(arg, tid, nth) on nth threads (the caller is tid 0); returns when all are done. One job at
   a time per process (the engine runs one step at a time). */
static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER;
static void run_parallel(job_fn fn, void *arg, int nth) {
    if (nth < 1) nth = 1;
    if (nth > MAX_THREADS) nth = MAX_THREADS;
    if (nth == 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&run_mu);
    if (P.size < nth) pool_grow(nth);
    if (P.size < nth) nth = P.size;
    int workers = P.size - 1;
    atomic_store(&P.done, 0);
    pthread_mutex_lock(&P.mu);
    P.fn = fn;
    P.arg = arg;
    P.nth = nth;
    P.gen++;
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    fn(arg, 0, nth);
    for (int d; (d = atomic_load(&P.done)) < workers;) wait_change(&P.done, d, &P.done_sleeping);
    pthread_mutex_unlock(&run_mu);
}

typedef struct {
    int32_t kind;  /* 4 | 8 */
    int32_t n, k;  /* output / input features (k % 32 == 0) */
    int32_t tiles; /* ceil(n / 16) */
    const uint8_t *w;
    const float *s;
    const float *bias; /* [n] or NULL */
} er_lin;

typedef struct {
    const float *ln1, *ln2;
    er_lin qkv, o, gu, down;
} er_layer;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab;
    int32_t block_size, num_blocks, max_ctx, threads;
    float eps, attn_scale;
    const er_layer *layers;
    const float *norm;
    er_lin head;
    const float *cos, *sin; /* [max_ctx][head_dim / 2] */
    void *kv;               /* [layers][2][n_kv][num_blocks][one block]: K [head_dim][block_size], V [block_size][head_dim] */
    int32_t kv_int8;        /* 0: fp16 blocks; 1: int8 blocks, each followed by its block_size fp16 scales (see kv_blk) */
} er_model;

/* ---- element-wise: exp, SwiGLU ------------------------------------------------------------- */

/* float vectors of VL lanes (GCC vector extensions): one zmm of 16 with AVX-512, one ymm of 8 with AVX
   (NOTE: not 16 lanes as two ymm: GCC 12 keeps a 64-byte vector that a loop carries in memory on AVX2,
   stored and reloaded in xmm pieces every iteration, which made the AVX2 build's attention 3-4x slower
   than the AVX-512 build's; docs/measurements.md, session 11), 16 in a plain -march=x86-64 build (SSE / scalar code).
   Every lane does the same IEEE operations in the same order on every build (no FMA: -ffp-contract=off;
   fp16 -> float is exact), and no result depends on which lanes share a vector (lane_sum keeps 16
   lanes on every build), so all builds give the same bits. */
#if defined(ER_YMM)
#define VL 8
#else
#define VL 16
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
static inline vf ldf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stf(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* VL fp16 -> float. NOTE: not __builtin_convertvector on a _Float16 vector: GCC 12 converts that one
   element at a time (vpinsrw + vcvtph2ps each), which made attention 2x slower than scalar code. */
static inline vf ldh(const kv_t *p) {
#if defined(ER_ZMM)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && defined(__AVX__)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    float f[VL];
    for (int i = 0; i < VL; i++) f[i] = (float)p[i];
    return ldf(f);
#endif
}
/* VL int8 -> float (exact on every path) */
static inline vf ld8(const int8_t *p) {
#if defined(ER_ZMM)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    float f[VL];
    for (int i = 0; i < VL; i++) f[i] = (float)p[i];
    return ldf(f);
#endif
}
static inline vf splat(float a) { return (vf){0} + a; }
typedef int32_t vi __attribute__((vector_size(4 * VL)));

/* exp(x) in plain float operations (Cephes expf: round to the nearest power of two, a degree-6
   polynomial, scale by the exponent bits), written once for 16 lanes; a single value takes lane 0
   of a splat, so a tail gives the bits its lane would (glibc's expf is not vectorisable here). Inputs are clamped to [-87, 88]; relative error ~1e-7. Rounding to nearest
   (even) is (v + 1.5 * 2^23) - 1.5 * 2^23, exact for |v| < 2^22. */
#define EXP_LO (-87.f)
#define EXP_HI 88.f
#define RND 12582912.f
static inline vf vmax(vf a, vf b) { vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmin(vf a, vf b) { vi m = a < b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf exp_v(vf x) {
    x = vmax(x, splat(EXP_LO));
    x = vmin(x, splat(EXP_HI));
    vf n = (x * 1.44269504088896341f + RND) - RND;
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf z = r * r;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r;
    p = p + 1.f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

/* y[i] = exp(x[i] - sub), n values (in place allowed); a last partial chunk through a padded copy */
static void exp_sub(float *y, const float *x, float sub, int n) {
    int i = 0;
    for (; i + VL <= n; i += VL) stf(y + i, exp_v(ldf(x + i) - sub));
    if (i < n) {
        float t[VL] = {0};
        memcpy(t, x + i, sizeof(float) * (n - i));
        stf(t, exp_v(ldf(t) - sub));
        memcpy(y + i, t, sizeof(float) * (n - i));
    }
}

/* g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u */
static void swiglu(float *g, const float *u, int n) {
    int i = 0;
    for (; i + VL <= n; i += VL) {
        vf x = ldf(g + i);
        stf(g + i, (x / (1.f + exp_v(0.f - x))) * ldf(u + i));
    }
    for (; i < n; i++) g[i] = (g[i] / (1.f + exp_v(splat(0.f - g[i]))[0])) * u[i]; /* the vector exp's bits */
}

/* ---- activations -> int8 per 32-block ------------------------------------------------------ */

static void quantize_row(const float *x, int k, int8_t *q, float *s, int32_t *sum) {
    for (int b = 0; b < k / QB; b++) {
        const float *xb = x + b * QB;
        float amax = 0.f;
#if defined(__AVX2__)
        const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, nosign), _mm256_and_ps(v1, nosign)),
                                 _mm256_max_ps(_mm256_and_ps(v2, nosign), _mm256_and_ps(v3, nosign)));
        float mm[8];
        _mm256_storeu_ps(mm, m);
        for (int i = 0; i < 8; i++) amax = mm[i] > amax ? mm[i] : amax; /* a max is exact in any order */
#else
        for (int i = 0; i < QB; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
#endif
        float d = amax / 127.f;
        float id = amax > 0.f ? 127.f / amax : 0.f;
#if defined(__AVX2__)
        /* x * id rounded to nearest even (cvtps: the default rounding, as nearbyintf), then clamped */
        const __m256 idv = _mm256_set1_ps(id);
        const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
        __m256i i0 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), hi), lo);
        __m256i i1 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v1, idv)), hi), lo);
        __m256i i2 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), hi), lo);
        __m256i i3 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v3, idv)), hi), lo);
        __m256i tot = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        int32_t ts[8];
        _mm256_storeu_si256((__m256i *)ts, tot);
        int32_t acc = 0;
        for (int i = 0; i < 8; i++) acc += ts[i];
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QB), p);
#else
        int32_t acc = 0;
        for (int i = 0; i < QB; i++) {
            float v = nearbyintf(xb[i] * id);
            v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
            q[b * QB + i] = (int8_t)v;
            acc += (int8_t)v;
        }
#endif
        s[b] = d;
        sum[b] = acc;
    }
}

/* ---- integer block dots: idot[m][c] for MR rows x 16 columns of one tile and block --------- */

/* The weights stream from memory once a step (91 MB for SmolLM2, more than the L3): each thread asks
   PF_AHEAD bytes ahead of the block being multiplied (its thread's tiles are one sequential stream)
   for the weights and, int4, their scales. A prefetch never faults, so reading ahead past the
   array's end is harmless; it changes no arithmetic. Measured: an 8-row SmolLM2 step, 2 threads,
   10.19 -> 8.95 ms (session 9's machine). One-row tiles (batch-1 decode) prefetch too since session
   15 (PF_MIN_ROWS 1): on a Zen 5 EPYC, 2 cores, SmolLM2 int4 decode through the engine went from a
   median of 192-209 to 226-243 tok/s (AVX-512 path) and from 161 to 202-214 (the AVX2 path): the
   int4 linears read 16 GB/s against the head's 30 without it (-DER_PROFILE phases); the head's
   long stream the hardware prefetcher follows alone, the small per-layer matrices it did not. Session
   9's machine measured the opposite at one row (3.26 vs 3.39 ms a step without / with); -DPF_MIN_ROWS=2
   in $EDGE_RAG_NATIVE_CFLAGS restores that. */
#ifndef PF_AHEAD
#define PF_AHEAD 2048
#endif
#ifndef PF_MIN_ROWS
#define PF_MIN_ROWS 1
#endif
/* NOTE: always_inline: a function whose body is only __builtin_prefetch looks side-effect free to
   GCC 12, which then marks it const and deletes the calls that it did not inline (this one's first
   form: no prefetch was left in the tiles; the asm has them now). */
static inline __attribute__((always_inline)) void prefetch_weights(const er_lin *L, int tile, int kb, int b) {
    if (L->kind == 4) { /* 256 B of weights and 64 B of scales a block */
        const char *w = (const char *)(L->w + ((size_t)tile * kb + b) * 256) + PF_AHEAD;
        __builtin_prefetch(w, 0, 3);
        __builtin_prefetch(w + 64, 0, 3);
        __builtin_prefetch(w + 128, 0, 3);
        __builtin_prefetch(w + 192, 0, 3);
        __builtin_prefetch((const char *)(L->s + ((size_t)tile * kb + b) * NT) + PF_AHEAD / 4, 0, 3);
    } else { /* 512 B of weights a block */
        const char *w = (const char *)(L->w + ((size_t)tile * kb + b) * 512) + PF_AHEAD;
        __builtin_prefetch(w, 0, 3);
        __builtin_prefetch(w + 64, 0, 3);
        __builtin_prefetch(w + 128, 0, 3);
        __builtin_prefetch(w + 192, 0, 3);
        __builtin_prefetch(w + 256, 0, 3);
        __builtin_prefetch(w + 320, 0, 3);
        __builtin_prefetch(w + 384, 0, 3);
        __builtin_prefetch(w + 448, 0, 3);
    }
}

static void idots_scalar(const er_lin *L, int tile, int b, int mr, const int8_t *xq, int ldq, int32_t idot[MR][NT]) {
    int kb = L->k / QB;
    for (int m = 0; m < mr; m++) {
        const int8_t *a = xq + (size_t)m * ldq + b * QB;
        for (int c = 0; c < NT; c++) {
            int32_t acc = 0;
            if (L->kind == 4) {
                const uint8_t *w = L->w + ((size_t)tile * kb + b) * 256;
                for (int i = 0; i < 4; i++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t byte = w[i * 64 + c * 4 + t];
                        acc += ((int32_t)(byte & 15) - 8) * a[4 * i + t];
                        acc += ((int32_t)(byte >> 4) - 8) * a[16 + 4 * i + t];
                    }
            } else {
                const uint8_t *w = L->w + ((size_t)tile * kb + b) * 512;
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++) acc += ((int32_t)w[j * 64 + c * 4 + t] - 128) * a[4 * j + t];
            }
            idot[m][c] = acc;
        }
    }
}

/* int4 without VNNI: a vpmaddubsw lane (nibbles 0..15 x s8 pairs) is at most 2 * 15 * 127 = 3,810 in
   magnitude, so a 32-block's 8 of them sum exactly in int16 (30,480 < 32,767): one vpaddw a k-group and
   one vpmaddwd a block, not a vpmaddwd + vpaddd a k-group (the GEMMs are compute bound at 8 rows without
   VNNI). The same int32 dot, so the same bits (measured against the per-group form: docs/measurements.md, native, session 9). */

#if defined(__AVX2__)
/* The AVX2 tile whole (what an AVX2-only CPU runs): rows r and 8-column halves nh (constants after
   inlining) in one pass over the K blocks, their float accumulators in ymm registers. An AVX2 CPU has
   16 ymm registers (not 32 zmm): a pass holds r x nh <= 4 (int16 sums or int32 dots, and float
   accumulators, 2 x 4 registers, plus the k-group's weights and the broadcast activations), so
   tile_rows runs an 8-row tile as 4 passes of 4 rows x 1 half (the tile's weights, 4-12 KB, are in
   L1 after the first) and 1 or 2 rows as one pass of both halves. u8 x s8 pairs: int4 nibbles 0..15
   x s8 (|a| <= 127): 2 * 15 * 127 = 3,810, no int16 saturation, the 8 k-groups summed in int16 (see
   above); int8 weights: sign trick (|w| x sign(a, w)): 2 * 127 * 127 = 32,258 < 32,767. The same
   int32 dots and the same float operations in the same order as the other paths, so the same bits. */
static inline __attribute__((always_inline)) void tile_ymm(const int r, const int nh, const er_lin *L, int tile, int h0,
                                                          const int8_t *xq, const float *xs, const int32_t *xsum, float *out, int ldo,
                                                          const int32_t *rowmap, int accumulate, int pf) {
    int kb = L->k / QB, ldq = L->k;
    const int four = L->kind == 4;
    const __m256i lo = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[4][2], ws[2];
#pragma GCC unroll 4
    for (int m = 0; m < r; m++)
#pragma GCC unroll 2
        for (int h = 0; h < nh; h++) acc[m][h] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int h = 0; h < nh; h++) ws[h] = _mm256_loadu_ps(L->s + (size_t)tile * NT + 8 * (h0 + h)); /* int8: per channel */
    for (int b = 0; b < kb; b++) {
        if (pf) prefetch_weights(L, tile, kb, b);
        const int8_t *ab = xq + b * QB; /* row m's k-group g: ab + m * ldq + 4 * g */
        __m256i d[4][2];
#define A4_(m, g) ({ int32_t a4_; memcpy(&a4_, ab + (size_t)(m) * ldq + 4 * (g), 4); _mm256_set1_epi32(a4_); })
#if defined(YMM_VNNI)
        /* vpdpbusd on the stored bytes (int4: nibbles w + 8; int8: w + 128) as tile_zmm's, the zero point's share
           subtracted up front: a k-group's 32 products one instruction, not vpmaddubsw + vpaddw (int4) or the sign
           trick's four (int8). The same int32 dots. */
        /* A dot is split over S chains (k-groups g % S), added at the end (exact): vpdpbusd's latency is 4-5 cycles at
           two an issue cycle, and a pass holds only r x nh <= 4 dots (as one chain each, a 1-row pass ran 15% slower
           than the vpmaddubsw form on a Zen 4). S x r x nh = 8 chains. */
        {
            const int32_t zp = four ? 8 : 128;
            const int S = r * nh <= 2 ? 4 : 2;
            __m256i c[4][2][4];
#pragma GCC unroll 4
            for (int m = 0; m < r; m++)
#pragma GCC unroll 2
                for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
                    for (int t = 0; t < S; t++) c[m][h][t] = t ? _mm256_setzero_si256() : _mm256_set1_epi32(-zp * xsum[(size_t)m * kb + b]);
            const uint8_t *w = L->w + ((size_t)tile * kb + b) * (four ? 256 : 512) + 32 * h0;
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i wg[2];
#pragma GCC unroll 2
                for (int h = 0; h < nh; h++) {
                    if (four) {
                        __m256i x = _mm256_loadu_si256((const __m256i *)(w + 64 * (g & 3) + 32 * h));
                        wg[h] = _mm256_and_si256(g < 4 ? x : _mm256_srli_epi16(x, 4), lo);
                    } else {
                        wg[h] = _mm256_loadu_si256((const __m256i *)(w + 64 * g + 32 * h));
                    }
                }
#pragma GCC unroll 4
                for (int m = 0; m < r; m++) {
                    __m256i av = A4_(m, g);
#pragma GCC unroll 2
                    for (int h = 0; h < nh; h++) {
                        c[m][h][g % S] = ydpbusd(c[m][h][g % S], wg[h], av);
                        __asm__("" : "+x"(c[m][h][g % S]));
                    }
                }
            }
#pragma GCC unroll 4
            for (int m = 0; m < r; m++)
#pragma GCC unroll 2
                for (int h = 0; h < nh; h++) {
                    __m256i t01 = _mm256_add_epi32(c[m][h][0], c[m][h][1]);
                    d[m][h] = S == 4 ? _mm256_add_epi32(t01, _mm256_add_epi32(c[m][h][2], c[m][h][3])) : t01;
                }
        }
        (void)ones;
        (void)flip;
#else
        if (four) {
            const uint8_t *w = L->w + ((size_t)tile * kb + b) * 256 + 32 * h0;
            __m256i s16[4][2];
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i wg[2];
#pragma GCC unroll 2
                for (int h = 0; h < nh; h++) {
                    __m256i x = _mm256_loadu_si256((const __m256i *)(w + 64 * (g & 3) + 32 * h));
                    wg[h] = _mm256_and_si256(g < 4 ? x : _mm256_srli_epi16(x, 4), lo);
                }
#pragma GCC unroll 4
                for (int m = 0; m < r; m++) {
                    __m256i av = A4_(m, g);
#pragma GCC unroll 2
                    for (int h = 0; h < nh; h++) {
                        __m256i p = _mm256_maddubs_epi16(wg[h], av);
                        s16[m][h] = g ? _mm256_add_epi16(s16[m][h], p) : p;
                        __asm__("" : "+x"(s16[m][h])); /* summed where made (as tile_zmm: else GCC makes all products first and spills) */
                    }
                }
            }
#pragma GCC unroll 4
            for (int m = 0; m < r; m++)
#pragma GCC unroll 2
                for (int h = 0; h < nh; h++)
                    d[m][h] = _mm256_sub_epi32(_mm256_madd_epi16(s16[m][h], ones), _mm256_set1_epi32(8 * xsum[(size_t)m * kb + b]));
        } else {
            const uint8_t *w = L->w + ((size_t)tile * kb + b) * 512 + 32 * h0;
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m256i sw[2], wa[2];
#pragma GCC unroll 2
                for (int h = 0; h < nh; h++) {
                    sw[h] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 64 * g + 32 * h)), flip); /* w itself */
                    wa[h] = _mm256_abs_epi8(sw[h]);
                }
#pragma GCC unroll 4
                for (int m = 0; m < r; m++) {
                    __m256i av = A4_(m, g);
#pragma GCC unroll 2
                    for (int h = 0; h < nh; h++) {
                        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[h], _mm256_sign_epi8(av, sw[h])), ones);
                        d[m][h] = g ? _mm256_add_epi32(d[m][h], p) : p;
                        __asm__("" : "+x"(d[m][h]));
                    }
                }
            }
        }
#endif
#undef A4_
#pragma GCC unroll 4
        for (int m = 0; m < r; m++) {
            __m256 xsv = _mm256_set1_ps(xs[(size_t)m * kb + b]);
#pragma GCC unroll 2
            for (int h = 0; h < nh; h++) {
                __m256 wsv = four ? _mm256_loadu_ps(L->s + ((size_t)tile * kb + b) * NT + 8 * (h0 + h)) : ws[h];
                acc[m][h] = _mm256_add_ps(acc[m][h], _mm256_mul_ps(_mm256_cvtepi32_ps(d[m][h]), _mm256_mul_ps(wsv, xsv)));
            }
        }
    }
#pragma GCC unroll 2
    for (int h = 0; h < nh; h++) {
        int n0 = tile * NT + 8 * (h0 + h);
        int nc = L->n - n0 < 8 ? L->n - n0 : 8;
#pragma GCC unroll 4
        for (int m = 0; m < r; m++) {
            float *o = out + (size_t)(rowmap ? rowmap[m] : m) * ldo + n0;
            __m256 v = acc[m][h];
            if (nc == 8) {
                if (L->bias) v = _mm256_add_ps(v, _mm256_loadu_ps(L->bias + n0));
                if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(o), v);
                _mm256_storeu_ps(o, v);
            } else { /* the last tile's columns past n */
                float t[8];
                _mm256_storeu_ps(t, v);
                for (int c = 0; c < nc; c++) {
                    float e = t[c];
                    if (L->bias) e = e + L->bias[n0 + c];
                    o[c] = accumulate ? o[c] + e : e;
                }
            }
        }
    }
}
/* one function a pass shape (the asm of each is readable on its own: no spills, checked with objdump) */
#define YMM_PASS_(R, NH)                                                                                                       \
    static __attribute__((noinline)) void ymm_##R##x##NH(const er_lin *L, int tile, int h0, const int8_t *xq, const float *xs, \
                                                         const int32_t *xsum, float *out, int ldo, const int32_t *rowmap,      \
                                                         int accumulate, int pf) {                                             \
        tile_ymm(R, NH, L, tile, h0, xq, xs, xsum, out, ldo, rowmap, accumulate, pf);                                          \
    }
YMM_PASS_(1, 2)
YMM_PASS_(2, 2)
YMM_PASS_(3, 1)
YMM_PASS_(4, 1)
#undef YMM_PASS_
#endif


#if defined(HAVE_AVX512BW)
/* The zmm paths whole: dots and the float accumulation of mr (a constant after inlining) rows
   held in zmm registers across the K blocks; the same float operations, in the same order, as
   tile_rows' generic epilogue. vnni (a constant): vpdpbusd; else (AVX-512BW) vpmaddubsw + vpmaddwd
   (int4: nibbles 0..15 x s8, no int16 saturation; int8: the sign trick of the AVX2 path, |w| x
   (a negated where w < 0), with a mask since AVX-512 has no vpsignb). The int32 dots are exact
   either way, so both give the bits of the other paths. */
static inline __attribute__((always_inline)) void tile_zmm(const int mr, const int vnni, const er_lin *L, int tile, const int8_t *xq,
                                                          const float *xs, const int32_t *xsum, float *out, int ldo, const int32_t *rowmap,
                                                          int accumulate) {
    int kb = L->k / QB, ldq = L->k;
    __m512 acc[MR];
#pragma GCC unroll 8
    for (int m = 0; m < mr; m++) acc[m] = _mm512_setzero_ps();
    const __m512i lo = _mm512_set1_epi8(15);
    const int four = L->kind == 4;
    const int32_t zp = four ? 8 : (vnni ? 128 : 0); /* the sign trick reads w itself, not w + 128 */
    const __m512i ones = _mm512_set1_epi16(1), flip = _mm512_set1_epi8((char)0x80);
    __m512 wsv = _mm512_loadu_ps(L->s + (size_t)tile * NT); /* int8: per channel */
    for (int b = 0; b < kb; b++) {
        if (mr >= PF_MIN_ROWS) prefetch_weights(L, tile, kb, b);
        const int8_t *ab = xq + b * QB; /* row m's k-group g: ab + m * ldq + 4 * g */
        __m512i d[MR];
#define A4_(m, g) ({ int32_t a4_; memcpy(&a4_, ab + (size_t)(m) * ldq + 4 * (g), 4); _mm512_set1_epi32(a4_); })
        if (four) wsv = _mm512_loadu_ps(L->s + ((size_t)tile * kb + b) * NT);
        if (vnni) {
#if defined(HAVE_VNNI)
            __m512i W[8];
            if (four) {
                const uint8_t *w = L->w + ((size_t)tile * kb + b) * 256;
                for (int i = 0; i < 4; i++) {
                    __m512i x = _mm512_loadu_si512((const void *)(w + 64 * i));
                    W[i] = _mm512_and_si512(x, lo);
                    W[i + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), lo);
                }
            } else {
                const uint8_t *w = L->w + ((size_t)tile * kb + b) * 512;
                for (int j = 0; j < 8; j++) W[j] = _mm512_loadu_si512((const void *)(w + 64 * j));
            }
            /* g outer, rows inner: mr independent dpbusd chains (a row's 8 dots in a chain would
               wait on each other's latency) */
#pragma GCC unroll 8
            for (int m = 0; m < mr; m++) d[m] = _mm512_set1_epi32(-zp * xsum[(size_t)m * kb + b]); /* the zero point's share, subtracted up front (exact) */
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++)
#pragma GCC unroll 8
                for (int m = 0; m < mr; m++) d[m] = _mm512_dpbusd_epi32(d[m], W[g], A4_(m, g));
#endif
        } else if (four) {
            /* without VNNI each k-group's weights are unpacked where they are used (one live weight
               register, not 8: with 8 rows' sums and accumulators held, 8 more spilled) */
            const uint8_t *w = L->w + ((size_t)tile * kb + b) * 256;
            __m512i s16[MR]; /* the 8 vpmaddubsw results summed in int16 (see above) */
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m512i x = _mm512_loadu_si512((const void *)(w + 64 * (g & 3)));
                __m512i wg = _mm512_and_si512(g < 4 ? x : _mm512_srli_epi16(x, 4), lo);
#pragma GCC unroll 8
                for (int m = 0; m < mr; m++) {
                    __m512i p = _mm512_maddubs_epi16(wg, A4_(m, g));
                    s16[m] = g ? _mm512_add_epi16(s16[m], p) : p;
                    __asm__("" : "+v"(s16[m])); /* each product summed where it is made (GCC 12 otherwise makes all 64 first and spills them) */
                }
            }
#pragma GCC unroll 8
            for (int m = 0; m < mr; m++) d[m] = _mm512_add_epi32(_mm512_madd_epi16(s16[m], ones), _mm512_set1_epi32(-zp * xsum[(size_t)m * kb + b]));
        } else {
            /* int8 without VNNI: the sign trick, |w| x (a negated where w < 0), w's sign as a mask (AVX-512
               has no vpsignb); a k-group's weights, mask and |w| made where they are used */
            const uint8_t *w = L->w + ((size_t)tile * kb + b) * 512;
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                __m512i sw = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + 64 * g)), flip); /* w itself */
                __mmask64 neg = _mm512_movepi8_mask(sw);
                __m512i wa = _mm512_abs_epi8(sw);
#pragma GCC unroll 8
                for (int m = 0; m < mr; m++) {
                    __m512i av = A4_(m, g);
                    av = _mm512_mask_sub_epi8(av, neg, _mm512_setzero_si512(), av);
                    __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(wa, av), ones);
                    d[m] = g ? _mm512_add_epi32(d[m], p) : p;
                    __asm__("" : "+v"(d[m])); /* as in the int4 loop: summed where made, not spilled */
                }
            }
        }
#undef A4_
#pragma GCC unroll 8
        for (int m = 0; m < mr; m++) {
            __m512i dm = d[m];
            __m512 sc = _mm512_mul_ps(wsv, _mm512_set1_ps(xs[(size_t)m * kb + b]));
            acc[m] = _mm512_add_ps(acc[m], _mm512_mul_ps(_mm512_cvtepi32_ps(dm), sc));
        }
    }
    int n0 = tile * NT;
    int nc = L->n - n0 < NT ? L->n - n0 : NT;
    __mmask16 k = (__mmask16)((1u << nc) - 1u);
#pragma GCC unroll 8 /* acc[] stays in registers (a loop over a variable m kept it in memory) */
    for (int m = 0; m < mr; m++) {
        float *o = out + (size_t)(rowmap ? rowmap[m] : m) * ldo + n0;
        __m512 v = acc[m];
        if (L->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, L->bias + n0));
        if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, o), v);
        _mm512_mask_storeu_ps(o, k, v);
    }
}
#endif

/* One tile (16 columns) for rows [0, mr): out[m][n] (+)= sum_b (float)idot * (ws * xs) + bias. */
static void tile_rows(const er_lin *L, int tile, int mr, const int8_t *xq, const float *xs, const int32_t *xsum,
                      float *out, int ldo, const int32_t *rowmap, int accumulate, int isa) {
#if defined(HAVE_AVX512BW)
#define TILE_MR_(V)                                                                        \
    switch (mr) {                                                                          \
    case 1: tile_zmm(1, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;   \
    case 2: tile_zmm(2, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;   \
    case 3: tile_zmm(3, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;   \
    case 4: tile_zmm(4, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;   \
    case 5: tile_zmm(5, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;   \
    case 6: tile_zmm(6, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;   \
    case 7: tile_zmm(7, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;   \
    default: tile_zmm(8, V, L, tile, xq, xs, xsum, out, ldo, rowmap, accumulate); return;  \
    }
#if defined(HAVE_VNNI)
    if (isa == ISA_VNNI) { TILE_MR_(1) }
#endif
    if (isa == ISA_AVX512) { TILE_MR_(0) }
#undef TILE_MR_
#endif
#if defined(__AVX2__)
    if (isa == ISA_AVX2) { /* passes of r rows x nh halves, r x nh <= 4 (tile_ymm); weights prefetched in the first */
        int pf = mr >= PF_MIN_ROWS, kb = L->k / QB;
        for (int m0 = 0; m0 < mr; m0 += 4) {
            int r = mr - m0 < 4 ? mr - m0 : 4;
            const int8_t *q = xq + (size_t)m0 * L->k;
            const float *s = xs + (size_t)m0 * kb;
            const int32_t *z = xsum + (size_t)m0 * kb;
            float *o = rowmap ? out : out + (size_t)m0 * ldo;
            const int32_t *rm = rowmap ? rowmap + m0 : NULL;
            switch (r) {
            case 1: ymm_1x2(L, tile, 0, q, s, z, o, ldo, rm, accumulate, pf); break;
            case 2: ymm_2x2(L, tile, 0, q, s, z, o, ldo, rm, accumulate, pf); break;
            case 3: ymm_3x1(L, tile, 0, q, s, z, o, ldo, rm, accumulate, pf); ymm_3x1(L, tile, 1, q, s, z, o, ldo, rm, accumulate, 0); break;
            default: ymm_4x1(L, tile, 0, q, s, z, o, ldo, rm, accumulate, pf); ymm_4x1(L, tile, 1, q, s, z, o, ldo, rm, accumulate, 0); break;
            }
            pf = 0;
        }
        return;
    }
#endif
    int kb = L->k / QB;
    int ldq = L->k;
    float acc[MR][NT];
    int32_t idot[MR][NT];
    memset(acc, 0, sizeof acc);
    for (int b = 0; b < kb; b++) {
        if (mr >= PF_MIN_ROWS) prefetch_weights(L, tile, kb, b);
        idots_scalar(L, tile, b, mr, xq, ldq, idot);
        const float *ws = L->kind == 4 ? L->s + ((size_t)tile * kb + b) * NT : L->s + (size_t)tile * NT;
        for (int m = 0; m < mr; m++) {
            float a = xs[(size_t)m * kb + b];
            for (int c = 0; c < NT; c++) {
                float sc = ws[c] * a;
                float v = (float)idot[m][c] * sc;
                acc[m][c] = acc[m][c] + v;
            }
        }
    }
    int n0 = tile * NT;
    int nc = L->n - n0 < NT ? L->n - n0 : NT;
    for (int m = 0; m < mr; m++) {
        float *o = out + (size_t)(rowmap ? rowmap[m] : m) * ldo + n0;
        for (int c = 0; c < nc; c++) {
            float v = acc[m][c];
            if (L->bias) v = v + L->bias[n0 + c];
            o[c] = accumulate ? o[c] + v : v;
        }
    }
}

/* y[M][n] for quantized activations (xq [M][k], xs / xsum [M][k/32]): the column tiles of phase p,
   claimed in chunks of chunk_of(tiles) from t0, a chunk start this thread has claimed (see
   first_tiles; >= tiles: none left). An output element is computed whole by one thread. */
static void gemm_q(const er_lin *L, int M, const int8_t *xq, const float *xs, const int32_t *xsum, float *out, int ldo,
                   const int32_t *rowmap, int accumulate, phase_t *p, int t0, int nth) {
    int isa = cur_isa();
    int kb = L->k / QB, c = chunk_of(L->tiles, nth);
    for (; t0 < L->tiles; t0 = claim(p, c)) {
        int t1 = t0 + c < L->tiles ? t0 + c : L->tiles;
        for (int t = t0; t < t1; t++)
            for (int m0 = 0; m0 < M; m0 += MR) {
                int mr = M - m0 < MR ? M - m0 : MR;
                tile_rows(L, t, mr, xq + (size_t)m0 * L->k, xs + (size_t)m0 * kb, xsum + (size_t)m0 * kb,
                          rowmap ? out : out + (size_t)m0 * ldo, ldo, rowmap ? rowmap + m0 : NULL, accumulate, isa);
            }
        finish(p, t1 - t0);
    }
}
static inline int first_tiles(phase_t *p, const er_lin *L, int nth) { return claim(p, chunk_of(L->tiles, nth)); }
/* gate_up_act's items: units of 4 tiles */
static inline int first_units(phase_t *p, const er_lin *L, int nth) { return claim(p, chunk_of(L->tiles / 4, nth)); }

/* The MLP's gate|up linear (rows interleaved by 16: gate 0..15, up 0..15, gate 16..31, ...; see
   weights.py interleave16) with SwiGLU and the quantization of down's input fused: the items are
   units of 4 tiles, i.e. 32 intermediate features = one 32-block of down's input, which the thread
   that computes a unit finishes alone. Units of phase p from u0 (see first_units). gu: [M][2I]
   scratch; xq / xs / xsum: down's input. */
static void gate_up_act(const er_lin *L, int M, const int8_t *aq, const float *as, const int32_t *asum, float *gu, int8_t *xq,
                        float *xs, int32_t *xsum, phase_t *p, int u0, int nth) {
    int isa = cur_isa(), kb = L->k / QB, I = L->n / 2, units = L->tiles / 4, c = chunk_of(units, nth);
    for (; u0 < units; u0 = claim(p, c)) {
        int u1 = u0 + c < units ? u0 + c : units;
        for (int u = u0; u < u1; u++) {
            for (int t = 4 * u; t < 4 * u + 4; t++)
                for (int m0 = 0; m0 < M; m0 += MR) {
                    int mr = M - m0 < MR ? M - m0 : MR;
                    tile_rows(L, t, mr, aq + (size_t)m0 * L->k, as + (size_t)m0 * kb, asum + (size_t)m0 * kb, gu + (size_t)m0 * L->n, L->n,
                              NULL, 0, isa);
                }
            for (int m = 0; m < M; m++) {
                float *r = gu + (size_t)m * L->n + 64 * u, h[QB];
                swiglu(r, r + 16, 16); /* silu(gate) * up of features 32u .. 32u + 15 */
                swiglu(r + 32, r + 48, 16);
                memcpy(h, r, 16 * sizeof(float));
                memcpy(h + 16, r + 32, 16 * sizeof(float));
                quantize_row(h, QB, xq + (size_t)m * I + QB * u, xs + (size_t)m * (I / QB) + u, xsum + (size_t)m * (I / QB) + u);
            }
        }
        finish(p, u1 - u0);
    }
}

/* rows of x quantized, the items of phase p (one row a claim) */
static void quantize_rows(const float *x, int ldx, int M, int k, int8_t *xq, float *xs, int32_t *xsum, phase_t *p) {
    for (int m; (m = claim(p, 1)) < M; finish(p, 1))
        quantize_row(x + (size_t)m * ldx, k, xq + (size_t)m * k, xs + (size_t)m * (k / QB), xsum + (size_t)m * (k / QB));
}

struct lin_job {
    const er_lin *L;
    int M;
    const float *x;
    float *out;
    int8_t *xq;
    float *xs;
    int32_t *xsum;
    phase_t ph[2];
};

static void linear_body(void *a, int tid, int nth) {
    struct lin_job *j = a;
    (void)tid;
    quantize_rows(j->x, j->L->k, j->M, j->L->k, j->xq, j->xs, j->xsum, &j->ph[0]);
    wait_phase(&j->ph[0], j->M);
    gemm_q(j->L, j->M, j->xq, j->xs, j->xsum, j->out, j->L->n, NULL, 0, &j->ph[1], first_tiles(&j->ph[1], j->L, nth), nth);
}

/* A linear on float rows (tests and the kernel benchmark): out = x @ W.T (+ bias). */
int er_linear(const er_lin *L, int M, const float *x, float *out, int threads) {
    if (L->k % QB) return -1;
    int8_t *xq = malloc((size_t)M * L->k + 64);
    float *xs = malloc(sizeof(float) * (size_t)M * (L->k / QB) + 64);
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)M * (L->k / QB) + 64);
    if (!xq || !xs || !xsum) return -2;
    struct lin_job j = {L, M, x, out, xq, xs, xsum, {{0}}};
    run_parallel(linear_body, &j, threads);
    free(xq);
    free(xs);
    free(xsum);
    return 0;
}

/* ---- the rest of a layer ------------------------------------------------------------------- */

static inline float sum8(const float *a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

static void rms_norm_row(const float *x, const float *w, int n, float eps, float *y) {
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[i + l] * x[i + l];
    for (; i < n; i++) acc[0] += x[i] * x[i];
    float r = 1.f / sqrtf(sum8(acc) / (float)n + eps);
    for (i = 0; i < n; i++) y[i] = (x[i] * r) * w[i];
}

static void rope_head(float *x, const float *cs, const float *sn, int d) {
    int h = d / 2;
    for (int i = 0; i < h; i++) {
        float x1 = x[i], x2 = x[i + h];
        x[i] = x1 * cs[i] - x2 * sn[i];
        x[i + h] = x2 * cs[i] + x1 * sn[i];
    }
}

/* ---- attention over the paged fp16 (or int8) pool ----------------------------------------------------
   In VL-lane vectors (vf): a head's numbers never depend on which other heads or rows are
   computed beside it. */

/* K (which 0: [head_dim][block_size]) or V (1: [block_size][head_dim]) of one block and kv head:
   block_size x head_dim halves, contiguous (2 KB for SmolLM2). The pool is [layers][K/V][kv heads]
   [blocks]: a row's neighbouring blocks of one kv head are neighbours in memory (the engine keeps a
   sequence's blocks in one region), so its K (or V) is one sequential stream for the prefetcher.
   int8 KV (M->kv_int8, the plan's kv_dtype "int8"): a block is block_size x head_dim int8 values in
   the same order, then block_size fp16 scales, one per position (token and kv head): x ~ q * scale
   with scale = fp16(absmax / 127), q = round(x / scale). block_size x (head_dim + 2) bytes: the
   planner's int8 bytes per token (edge.plan.kv_bytes_per_token), so the pool is the planned one. */
static inline size_t kv_blk_bytes(const er_model *M) {
    return (size_t)M->block_size * (M->kv_int8 ? M->head_dim + 2 : M->head_dim * 2);
}
static inline char *kv_blk(const er_model *M, int layer, int which, int block, int kvh) {
    return (char *)M->kv + ((((size_t)layer * 2 + which) * M->n_kv + kvh) * M->num_blocks + block) * kv_blk_bytes(M);
}
static inline kv_t *kv_at(const er_model *M, int layer, int which, int block, int kvh) { return (kv_t *)kv_blk(M, layer, which, block, kvh); }
/* an int8 block's values and scales */
static inline int8_t *kv8_at(const er_model *M, int layer, int which, int block, int kvh) { return (int8_t *)kv_blk(M, layer, which, block, kvh); }
static inline kv_t *kv8_scales(const er_model *M, const int8_t *blk) { return (kv_t *)(blk + (size_t)M->block_size * M->head_dim); }

static inline __attribute__((always_inline)) void prefetch_bytes(const void *p, int n) { /* always_inline: see prefetch_weights */
    for (int i = 0; i < n; i += 64) __builtin_prefetch((const char *)p + i, 0, 3);
}

/* K of a block is stored transposed, [head_dim][block_size] (V stays [block_size][head_dim]), so
   the scores of 16 positions are one vector: s[o] = sum_i q[i] * K[i][o] with 4 partial sums
   (i mod 4, in order of i), folded (a0 + a1) + (a2 + a3), times the scale. nh heads (a constant
   after inlining) share each K load. A last chunk of < 16 positions is computed whole when it lies
   inside the block (block_size % 16 == 0: lanes past e read other slots of the block and are not
   stored), else in scalar with the same per-lane sums: the same bits either way.
   int8 K (q8, a constant after inlining; ks: the block's scales): the sum runs over the int8
   values, then s[o] = (sum * ks[o]) * scale. */
static inline __attribute__((always_inline)) void kscores(const int nh, const int q8, const void *kbv, const kv_t *ks, int bs, int e,
                                                          const float *q, int d, float scale, float *sc, int ldsc) {
    const kv_t *kb = kbv;
    const int8_t *k8 = kbv;
    int o0 = 0;
    for (; o0 < e && o0 + VL <= bs; o0 += VL) {
        vf a[4][4];
#pragma GCC unroll 4
        for (int h = 0; h < nh; h++) a[h][0] = a[h][1] = a[h][2] = a[h][3] = (vf){0};
        for (int i = 0; i < d; i += 4) {
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                vf k = q8 ? ld8(k8 + (size_t)(i + r) * bs + o0) : ldh(kb + (size_t)(i + r) * bs + o0);
#pragma GCC unroll 4
                for (int h = 0; h < nh; h++) a[h][r] = a[h][r] + splat(q[(size_t)h * d + i + r]) * k;
            }
        }
        int w = e - o0 < VL ? e - o0 : VL;
#pragma GCC unroll 4
        for (int h = 0; h < nh; h++) {
            vf v = (a[h][0] + a[h][1]) + (a[h][2] + a[h][3]);
            v = q8 ? (v * ldh(ks + o0)) * splat(scale) : v * splat(scale);
            if (w == VL) {
                stf(sc + (size_t)h * ldsc + o0, v);
            } else {
                float t[VL];
                stf(t, v);
                memcpy(sc + (size_t)h * ldsc + o0, t, sizeof(float) * w);
            }
        }
    }
    for (; o0 < e; o0++)
        for (int h = 0; h < nh; h++) {
            float a[4] = {0.f, 0.f, 0.f, 0.f};
            for (int i = 0; i < d; i += 4)
                for (int r = 0; r < 4; r++)
                    a[r] = a[r] + q[(size_t)h * d + i + r] * (q8 ? (float)k8[(size_t)(i + r) * bs + o0] : (float)kb[(size_t)(i + r) * bs + o0]);
            float v = (a[0] + a[1]) + (a[2] + a[3]);
            sc[(size_t)h * ldsc + o0] = q8 ? (v * (float)ks[o0]) * scale : v * scale;
        }
}

/* out[h][i] = sum_j p[h][j] * V[j][i], in order of j (o = o + p * v), for nh heads and nv vectors
   of 16 dims from i0 (constants after inlining): the heads' sums stay in registers over all
   positions, each V vector is loaded once for the nh heads. V blocks are prefetched one ahead here
   and each during attend's K pass: the engine's blocks of a row need not be neighbours in the
   pool, so the hardware prefetcher does not follow them (8 rows at past 60-180 over scattered
   blocks: attention 2.88 -> 2.28 ms a step; over neighbouring blocks unchanged).
   int8 V (q8): o = o + (p * vscale[j]) * v8, the product p * vscale a scalar float. */
static inline __attribute__((always_inline)) void vsum(const int nh, const int nv, const int q8, const er_model *M, int layer,
                                                       const int32_t *table, int kvh, int n, const float *p, int ldp, int i0, float *out,
                                                       int ldo) {
    int d = M->head_dim, bs = M->block_size, bb = (int)kv_blk_bytes(M);
    vf o[4][4];
#pragma GCC unroll 4
    for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) o[h][v] = (vf){0};
    for (int j0 = 0, blk = 0; j0 < n; j0 += bs, blk++) {
        const char *vblk = kv_blk(M, layer, 1, table[blk], kvh);
        const kv_t *vb = (const kv_t *)vblk + i0, *vs = kv8_scales(M, (const int8_t *)vblk);
        const int8_t *v8 = (const int8_t *)vblk + i0;
        int e = n - j0 < bs ? n - j0 : bs;
        if (j0 + bs < n) prefetch_bytes(kv_blk(M, layer, 1, table[blk + 1], kvh), bb);
        for (int j = 0; j < e; j++) {
            float pv[4];
#pragma GCC unroll 4
            for (int h = 0; h < nh; h++) pv[h] = q8 ? p[(size_t)h * ldp + j0 + j] * (float)vs[j] : p[(size_t)h * ldp + j0 + j];
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++) {
                vf x = q8 ? ld8(v8 + (size_t)j * d + v * VL) : ldh(vb + (size_t)j * d + v * VL);
#pragma GCC unroll 4
                for (int h = 0; h < nh; h++) o[h][v] = o[h][v] + splat(pv[h]) * x;
            }
        }
    }
#pragma GCC unroll 4
    for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) stf(out + (size_t)h * ldo + i0 + v * VL, o[h][v]);
}

/* sum of x[0..n) in 16 lanes (lane l: j = l, l + 16, ... in order; 16 / VL vectors), folded by a fixed tree */
static float lane_sum(const float *x, int n) {
    vf a[16 / VL];
    for (int u = 0; u < 16 / VL; u++) a[u] = (vf){0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int u = 0; u < 16 / VL; u++) a[u] = a[u] + ldf(x + j + u * VL);
    float l[16];
    for (int u = 0; u < 16 / VL; u++) stf(l + u * VL, a[u]);
    for (int r = 0; j < n; j++, r++) l[r] = l[r] + x[j];
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) l[i] = l[i] + l[i + w];
    return l[0];
}

static void kscores_n(int nh, int q8, const void *kb, const kv_t *ks, int bs, int e, const float *q, int d, float scale, float *sc,
                      int ldsc) {
#define KS_(NH) (q8 ? kscores(NH, 1, kb, ks, bs, e, q, d, scale, sc, ldsc) : kscores(NH, 0, kb, ks, bs, e, q, d, scale, sc, ldsc))
    switch (nh) {
    case 1: KS_(1); return;
    case 2: KS_(2); return;
    case 3: KS_(3); return;
    default: KS_(4); return;
    }
#undef KS_
}

static void vsum_n(int nh, int nv, int q8, const er_model *M, int layer, const int32_t *table, int kvh, int n, const float *p, int ldp,
                   int i0, float *out, int ldo) {
#define VS_(NH, NV)                                                               \
    (q8 ? vsum(NH, NV, 1, M, layer, table, kvh, n, p, ldp, i0, out, ldo) \
        : vsum(NH, NV, 0, M, layer, table, kvh, n, p, ldp, i0, out, ldo))
    if (nv == 4) {
        switch (nh) {
        case 1: VS_(1, 4); return;
        case 2: VS_(2, 4); return;
        case 3: VS_(3, 4); return;
        default: VS_(4, 4); return;
        }
    }
    switch (nh) {
    case 1: VS_(1, 1); return;
    case 2: VS_(2, 1); return;
    case 3: VS_(3, 1); return;
    default: VS_(4, 1); return;
    }
#undef VS_
}

/* How many heads share a K load (kscores) or a V load (vsum) at most: their 4 partial sums (or 4 V
   vectors' sums) each stay in registers, 16 of AVX-512's 32 zmm for 4 heads; AVX2 has 16 ymm, so 3
   (SmolLM2's group: 12). A head's numbers do not depend on the heads beside it. */
#if defined(ER_YMM)
#define ATT_HEADS 3
#else
#define ATT_HEADS 4
#endif

/* Causal attention of one token (position p, its row's block table) for query heads
   [h0, h0 + g), which share kv head h0 / rep: each K / V vector is loaded once for up to 4 heads.
   A head's numbers do not depend on g (the same operations per head, in the same order).
   scores: g x (p + 1) floats. */
static void attend(const er_model *M, int layer, const float *q, int p, const int32_t *table, int h0, int g, float *out,
                   float *scores) {
    int d = M->head_dim, rep = M->n_heads / M->n_kv, bs = M->block_size;
    int kvh = h0 / rep, n = p + 1, q8 = M->kv_int8, bb = (int)kv_blk_bytes(M);
    const int nblk = (n + bs - 1) / bs;
    for (int j0 = 0, blk = 0; j0 < n; j0 += bs, blk++) {
        const char *kb = kv_blk(M, layer, 0, table[blk], kvh);
        const kv_t *ks = kv8_scales(M, (const int8_t *)kb);
        if (blk + 1 < nblk) prefetch_bytes(kv_blk(M, layer, 0, table[blk + 1], kvh), bb);
        prefetch_bytes(kv_blk(M, layer, 1, table[blk], kvh), bb); /* this block's V, read after the softmax (see vsum) */
        int e = n - j0 < bs ? n - j0 : bs;
        for (int hh = 0; hh < g; hh += ATT_HEADS)
            kscores_n(g - hh < ATT_HEADS ? g - hh : ATT_HEADS, q8, kb, ks, bs, e, q + (size_t)(h0 + hh) * d, d, M->attn_scale, scores + (size_t)hh * n + j0, n);
    }
    float inv[MR * 4];
    for (int hh = 0; hh < g; hh++) {
        float *sc = scores + (size_t)hh * n, mx = -INFINITY;
        for (int j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx; /* a max is exact in any order */
        exp_sub(sc, sc, mx, n);
        inv[hh] = 1.f / lane_sum(sc, n);
    }
    int nv = d % (4 * VL) == 0 ? 4 : 1;
    for (int hh = 0; hh < g; hh += ATT_HEADS)
        for (int i0 = 0; i0 < d; i0 += nv * VL)
            vsum_n(g - hh < ATT_HEADS ? g - hh : ATT_HEADS, nv, q8, M, layer, table, kvh, n, scores + (size_t)hh * n, n, i0, out + (size_t)(h0 + hh) * d, d);
    for (int hh = 0; hh < g; hh++) {
        float *o = out + (size_t)(h0 + hh) * d;
        for (int i = 0; i < d; i++) o[i] *= inv[hh];
    }
}

/* The whole K and V of one decode token's row in layer l (every kv head, every block up to
   position p) asked into L2 ahead of its attention. Attention over the paged pool waits on memory,
   not arithmetic (8 rows at past 60-180: ~0.3 ms of vector work a step against 1.8-2.4 ms spent):
   a block-ahead prefetch keeps only ~64 lines in flight. Asking a whole row (96 KB for SmolLM2 at
   past 128, well inside L2) one row before it is computed lets the memory system fetch it in
   parallel while the thread computes the row before. PF_ROW_KV=0 turns it off (A/B builds). */
#ifndef PF_ROW_KV
#define PF_ROW_KV 1
#endif
#ifndef PF_ROWS_AHEAD
#define PF_ROWS_AHEAD 1 /* rows of its own a thread asks ahead */
#endif
static inline __attribute__((always_inline)) void prefetch_row_kv(const er_model *M, int l, const int32_t *table, int p, int g0, int g1) {
#if PF_ROW_KV
    int nblk = p / M->block_size + 1, n = (int)kv_blk_bytes(M);
    for (int g = g0; g < g1; g++)
        for (int b = 0; b < nblk; b++) {
            const char *k = kv_blk(M, l, 0, table[b], g), *v = kv_blk(M, l, 1, table[b], g);
            for (int i = 0; i < n; i += 64) {
                __builtin_prefetch(k + i, 0, 2);
                __builtin_prefetch(v + i, 0, 2);
            }
        }
#else
    (void)M, (void)l, (void)table, (void)p, (void)g0, (void)g1;
#endif
}

/* Steps of at most PRIV_ROWS tokens: every thread computes the RMSNorm and quantization of all
   rows into buffers of its own (a few us) instead of a phase of rows and a wait for its last row (2
   waits a layer fewer: waits that cost most when another process shares the cores). */
#ifndef PRIV_ROWS
#define PRIV_ROWS 16
#endif
static size_t priv_bytes(const er_model *M, int T) { /* one thread's: a norm row, xq, xs, xsum */
    int H = M->hidden;
    size_t b = (size_t)H * 4 + (size_t)T * (H / QB) * 8 + (size_t)T * H;
    return (b + 63) & ~(size_t)63;
}

/* Work bytes er_step needs for T tokens (the caller allocates them once per size). */
size_t er_work_bytes(const er_model *M, int T) {
    int q = M->n_heads * M->head_dim, kv = M->n_kv * M->head_dim;
    int kmax = M->inter > q ? M->inter : q;
    kmax = kmax > M->hidden ? kmax : M->hidden;
    size_t f = (size_t)T * M->hidden + (size_t)T * (q + 2 * kv) + (size_t)T * q + (size_t)T * 2 * M->inter
               + 2 * (size_t)T * (kmax / QB) + (size_t)(M->threads > 0 ? M->threads : 1) * M->max_ctx * (M->n_heads / M->n_kv) + (size_t)T;
    int nth = M->threads > 0 ? M->threads : 1;
    size_t down_in = (size_t)T * M->inter + 2 * 4 * (size_t)T * (M->inter / QB) + 64; /* down's quantized input */
    return f * 4 + (size_t)T * kmax + 256 + 64 + down_in + (T <= PRIV_ROWS ? nth * priv_bytes(M, T) : 0);
}

/* One token's K or V head (d values) to int8 at dst[i * stride]: scale = fp16(absmax / 127), q = round(x / scale)
   clamped to +-127 (plain scalar float: the same bits on every build). Returns the scale. */
static kv_t quantize_kv(const float *x, int d, int8_t *dst, int stride) {
    float amax = 0.f;
    for (int i = 0; i < d; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    kv_t s16 = (kv_t)(amax / 127.f);
    float s = (float)s16;
    for (int i = 0; i < d; i++) {
        float v = s > 0.f ? nearbyintf(x[i] / s) : 0.f;
        v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
        dst[(size_t)i * stride] = (int8_t)v;
    }
    return s16;
}

/* RoPE on one token's q and k heads (in place), then its K / V into the pool (slot < 0: not stored);
   rope_store_group: the same for kv head g and the query heads that share it (a head's numbers
   do not depend on which heads are done beside it: rope_store == every group's). */
static void rope_store_group(const er_model *M, int l, float *row, int pos, int slot, int g) {
    int d = M->head_dim, half = d / 2, nq = M->n_heads * d, nkv = M->n_kv * d, rep = M->n_heads / M->n_kv;
    const float *cs = M->cos + (size_t)pos * half, *sn = M->sin + (size_t)pos * half;
    for (int h = g * rep; h < (g + 1) * rep; h++) rope_head(row + (size_t)h * d, cs, sn, d);
    rope_head(row + nq + (size_t)g * d, cs, sn, d);
    if (slot < 0) return;
    int blk = slot / M->block_size, off = slot % M->block_size;
    if (M->kv_int8) {
        int8_t *kd = kv8_at(M, l, 0, blk, g), *vd = kv8_at(M, l, 1, blk, g);
        kv8_scales(M, kd)[off] = quantize_kv(row + nq + g * d, d, kd + off, M->block_size); /* K transposed */
        kv8_scales(M, vd)[off] = quantize_kv(row + nq + nkv + g * d, d, vd + (size_t)off * d, 1);
        return;
    }
    kv_t *kd = kv_at(M, l, 0, blk, g) + off, *vd = kv_at(M, l, 1, blk, g) + (size_t)off * d;
    for (int i = 0; i < d; i++) {
        kd[(size_t)i * M->block_size] = (kv_t)row[nq + g * d + i]; /* K transposed: [head_dim][block_size] */
        vd[i] = (kv_t)row[nq + nkv + g * d + i];
    }
}

static void rope_store(const er_model *M, int l, float *row, int pos, int slot) {
    for (int g = 0; g < M->n_kv; g++) rope_store_group(M, l, row, pos, slot, g);
}

/* -DER_PROFILE (development builds only): thread 0's wall time per phase of the step, summed over
   calls, read with er_profile(out, n); phases: see PH_* below (PH_BAR: waits for a phase's last items). */
enum { PH_NORM, PH_QKV, PH_ATTN, PH_O, PH_GU, PH_DOWN, PH_BAR, PH_HEAD, PH_N }; /* PH_GU: gate|up with SwiGLU */
#if defined(ER_PROFILE)
static double prof_acc[PH_N];
static long long prof_t;
#define PH_START() (tid == 0 ? (void)(prof_t = now_ns()) : (void)0)
#define PH(k)                                     \
    do {                                          \
        if (tid == 0) {                           \
            long long t_ = now_ns();              \
            prof_acc[k] += (double)(t_ - prof_t); \
            prof_t = t_;                          \
        }                                         \
    } while (0)
#define WAIT(p, n)          \
    do {                    \
        wait_phase((p), (n)); \
        PH(PH_BAR);         \
    } while (0)
int er_profile(double *out, int n) {
    for (int i = 0; i < n && i < PH_N; i++) out[i] = prof_acc[i] / 1e6, prof_acc[i] = 0;
    return PH_N;
}
#else
#define PH_START() ((void)0)
#define PH(k) ((void)0)
#define WAIT(p, n) wait_phase((p), (n))
int er_profile(double *out, int n) { (void)out; (void)n; return 0; }
#endif

struct step_job {
    const er_model *M;
    int T, mb, nl, grp, per_tok, fused, priv;
    int upr;  /* fused: attention units per row: its kv heads (each unit quantizes its own 32-blocks), or 1 (whole rows) */
    phase_t *ph; /* the step's phases, taken in the same order by every thread */
    uint8_t *pbuf; /* priv: thread tid's buffers at pbuf + tid * pstride */
    size_t pstride;
    float *x, *xn, *qkv, *att, *gu, *xs, *scores, *logits, *ds;
    int32_t *xsum, *rowmap, *row_of;
    int8_t *xq, *dq; /* dq / ds / dsum: down's input (gate_up_act writes it while others may still read xq) */
    int32_t *dsum;
    const int32_t *positions, *slots, *qstart, *tables;
};

/* phases a step takes at most: a layer's 9 (norm, qkv, rope, attention, quantization, o, norm, gate|up,
   down; a fused or priv step takes fewer) and the head's 2 */
static inline int step_phases(const er_model *M) { return 9 * M->n_layers + 2; }

static void step_body(void *arg, int tid, int nth) {
    struct step_job *J = arg;
    const er_model *M = J->M;
    int T = J->T, H = M->hidden, d = M->head_dim, nq = M->n_heads * d, nkv = M->n_kv * d, rep = M->n_heads / M->n_kv;
    int qkvw = nq + 2 * nkv;
    float *x = J->x, *xn = J->xn, *qkv = J->qkv, *att = J->att, *gu = J->gu, *xs = J->xs;
    int32_t *xsum = J->xsum;
    int8_t *xq = J->xq;
    const int32_t *positions = J->positions, *slots = J->slots;
    float *sc = J->scores + (size_t)tid * M->max_ctx * rep;
    phase_t *ph = J->ph;
    /* the normed, quantized rows the qkv and gate/up linears read: this thread's own copy of all
       rows (priv: computed once the thread has claimed work of the linear, so a thread that comes
       late to a finished phase reads nothing), or the shared buffers filled by a phase of rows */
    int8_t *nq8 = xq;
    float *ns = xs, *nrow = NULL;
    int32_t *nsum = xsum;
    if (J->priv) {
        uint8_t *pb = J->pbuf + (size_t)tid * J->pstride;
        nrow = (float *)pb;
        ns = nrow + H;
        nsum = (int32_t *)(ns + (size_t)T * (H / QB));
        nq8 = (int8_t *)(nsum + (size_t)T * (H / QB));
    }
#define NORM_PRIV(w)                                                                                              \
    for (int t = 0; t < T; t++) {                                                                                 \
        rms_norm_row(x + (size_t)t * H, (w), H, M->eps, nrow);                                                    \
        quantize_row(nrow, H, nq8 + (size_t)t * H, ns + (size_t)t * (H / QB), nsum + (size_t)t * (H / QB));        \
    }
#define NORM_SHARED(w)                                                                                                    \
    do {                                                                                                                  \
        phase_t *p_ = ph++;                                                                                               \
        for (int t; (t = claim(p_, 1)) < T; finish(p_, 1)) {                                                              \
            rms_norm_row(x + (size_t)t * H, (w), H, M->eps, xn + (size_t)t * H);                                          \
            quantize_row(xn + (size_t)t * H, H, xq + (size_t)t * H, xs + (size_t)t * (H / QB), xsum + (size_t)t * (H / QB)); \
        }                                                                                                                 \
        PH(PH_NORM);                                                                                                      \
        WAIT(p_, T);                                                                                                      \
    } while (0)
    const int upr = J->upr, gpu = M->n_kv / upr, U = T * upr; /* fused: units, kv heads a unit */
    PH_START();
    for (int l = 0; l < M->n_layers; l++) {
        const er_layer *Ly = &M->layers[l];
        if (J->fused) /* the attention units this thread most likely takes first, fetched while the qkv linear runs */
            for (int u = 2 * tid; u < 2 * tid + 2 && u < U; u++)
                prefetch_row_kv(M, l, J->tables + (size_t)J->row_of[u / upr] * J->mb, positions[u / upr], u % upr * gpu, u % upr * gpu + gpu);
        if (!J->priv) NORM_SHARED(Ly->ln1);
        phase_t *pq = ph++;
        int c0 = first_tiles(pq, &Ly->qkv, nth);
        if (J->priv && c0 < Ly->qkv.tiles) NORM_PRIV(Ly->ln1);
        PH(PH_NORM);
        gemm_q(&Ly->qkv, T, nq8, ns, nsum, qkv, qkvw, NULL, 0, pq, c0, nth);
        PH(PH_QKV);
        WAIT(pq, Ly->qkv.tiles);
        if (J->fused) { /* decode rows only, enough of them: a unit (a row's kv heads [g0, g0 + gpu)) does RoPE, their
                           K / V, their query heads and the quantization of their 32-blocks of the attention row */
            phase_t *pa = ph++;
            for (int u = claim(pa, 1); u < U;) {
                int un = claim(pa, 1); /* the next unit, claimed now so that its K / V is fetched while this one runs */
                if (un < U)
                    prefetch_row_kv(M, l, J->tables + (size_t)J->row_of[un / upr] * J->mb, positions[un / upr], un % upr * gpu,
                                    un % upr * gpu + gpu);
                int t = u / upr, g0 = u % upr * gpu, c = g0 * rep * d, w = gpu * rep * d;
                float *row = qkv + (size_t)t * qkvw;
                const int32_t *table = J->tables + (size_t)J->row_of[t] * J->mb;
                for (int g = g0; g < g0 + gpu; g++) {
                    rope_store_group(M, l, row, positions[t], slots[t], g);
                    attend(M, l, row, positions[t], table, g * rep, rep, att + (size_t)t * nq, sc);
                }
                quantize_row(att + (size_t)t * nq + c, w, xq + (size_t)t * nq + c, xs + (size_t)t * (nq / QB) + c / QB,
                             xsum + (size_t)t * (nq / QB) + c / QB);
                finish(pa, 1);
                u = un;
            }
            PH(PH_ATTN);
            WAIT(pa, U);
        } else {
            phase_t *pr = ph++, *pa = ph++, *pz = ph++;
            for (int t; (t = claim(pr, 1)) < T; finish(pr, 1)) rope_store(M, l, qkv + (size_t)t * qkvw, positions[t], slots[t]);
            PH(PH_ATTN);
            WAIT(pr, T);
            int n = T * J->per_tok;
            for (int i; (i = claim(pa, 1)) < n; finish(pa, 1)) { /* items: (token, group of heads sharing a kv head) */
                int t = i / J->per_tok;
                attend(M, l, qkv + (size_t)t * qkvw, positions[t], J->tables + (size_t)J->row_of[t] * J->mb, (i % J->per_tok) * J->grp,
                       J->grp, att + (size_t)t * nq, sc);
            }
            PH(PH_ATTN);
            WAIT(pa, n);
            quantize_rows(att, nq, T, nq, xq, xs, xsum, pz);
            PH(PH_ATTN);
            WAIT(pz, T);
        }
        phase_t *po = ph++;
        gemm_q(&Ly->o, T, xq, xs, xsum, x, H, NULL, 1, po, first_tiles(po, &Ly->o, nth), nth); /* h += o_proj(attention) */
        PH(PH_O);
        WAIT(po, Ly->o.tiles);
        if (!J->priv) NORM_SHARED(Ly->ln2);
        phase_t *pg = ph++;
        int u0 = first_units(pg, &Ly->gu, nth);
        if (J->priv && u0 < Ly->gu.tiles / 4) NORM_PRIV(Ly->ln2);
        PH(PH_NORM);
        gate_up_act(&Ly->gu, T, nq8, ns, nsum, gu, J->dq, J->ds, J->dsum, pg, u0, nth); /* down's input, silu(gate) * up, quantized */
        PH(PH_GU);
        WAIT(pg, Ly->gu.tiles / 4);
        phase_t *pd = ph++;
        gemm_q(&Ly->down, T, J->dq, J->ds, J->dsum, x, H, NULL, 1, pd, first_tiles(pd, &Ly->down, nth), nth); /* h += down(...) */
        PH(PH_DOWN);
        WAIT(pd, Ly->down.tiles);
    }
#undef NORM_PRIV
#undef NORM_SHARED
    /* final norm and head for the rows that want logits (their last token) */
    phase_t *pn = ph++, *phd = ph++;
    for (int i; (i = claim(pn, 1)) < J->nl; finish(pn, 1)) {
        int t = J->qstart[J->rowmap[i] + 1] - 1;
        rms_norm_row(x + (size_t)t * H, M->norm, H, M->eps, xn + (size_t)i * H);
        quantize_row(xn + (size_t)i * H, H, xq + (size_t)i * H, xs + (size_t)i * (H / QB), xsum + (size_t)i * (H / QB));
    }
    PH(PH_HEAD);
    WAIT(pn, J->nl);
    if (J->nl) gemm_q(&M->head, J->nl, xq, xs, xsum, J->logits, M->vocab, J->rowmap, 0, phd, first_tiles(phd, &M->head, nth), nth);
    PH(PH_HEAD);
}

/* One engine step. x: [T][hidden] embedded tokens (the residual stream, updated in place);
   positions / slots [T]; qstart [R + 1]; tables [R][mb]; logits_rows [R]; logits [R][vocab]:
   row r gets the logits of its last token when logits_rows[r]. Returns 0, or < 0 on bad input. */
int er_step(const er_model *M, int T, int R, float *x, const int32_t *positions, const int32_t *slots,
            const int32_t *qstart, const int32_t *tables, int mb, const int32_t *logits_rows, float *logits, void *work) {
    int H = M->hidden, d = M->head_dim, nq = M->n_heads * d, nkv = M->n_kv * d, I = M->inter;
    int qkvw = nq + 2 * nkv;
    int kmax = I > nq ? I : nq;
    kmax = kmax > H ? kmax : H;
    for (int t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] >= M->max_ctx) return -1;
    int nth = M->threads > 0 ? M->threads : 1;
    struct step_job J;
    J.M = M;
    J.T = T;
    J.mb = mb;
    J.x = x;
    J.xn = (float *)work;
    J.qkv = J.xn + (size_t)T * H;
    J.att = J.qkv + (size_t)T * qkvw;
    J.gu = J.att + (size_t)T * nq;
    J.xs = J.gu + (size_t)T * 2 * I;
    J.xsum = (int32_t *)(J.xs + (size_t)T * (kmax / QB));
    J.scores = (float *)(J.xsum + (size_t)T * (kmax / QB));
    J.rowmap = (int32_t *)(J.scores + (size_t)nth * M->max_ctx * (M->n_heads / M->n_kv));
    J.xq = (int8_t *)(J.rowmap + T);
    J.priv = T <= PRIV_ROWS && nth > 1;
    J.pstride = priv_bytes(M, T);
    J.ds = (float *)(((uintptr_t)(J.xq + (size_t)T * kmax) + 63) & ~(uintptr_t)63);
    J.dsum = (int32_t *)(J.ds + (size_t)T * (I / QB));
    J.dq = (int8_t *)(J.dsum + (size_t)T * (I / QB));
    J.pbuf = (uint8_t *)(((uintptr_t)(J.dq + (size_t)T * I) + 63) & ~(uintptr_t)63);
    J.positions = positions;
    J.slots = slots;
    J.qstart = qstart;
    J.tables = tables;
    J.logits = logits;
    J.row_of = (int32_t *)malloc(sizeof(int32_t) * (size_t)(T > 0 ? T : 1));
    size_t phb = sizeof(phase_t) * (size_t)step_phases(M);
    J.ph = aligned_alloc(64, phb);
    if (!J.row_of || !J.ph) {
        free(J.row_of);
        free(J.ph);
        return -2;
    }
    memset(J.ph, 0, phb);
    for (int r = 0; r < R; r++)
        for (int t = qstart[r]; t < qstart[r + 1]; t++) J.row_of[t] = r;
    /* attention items: whole kv-head groups, unless that leaves threads idle (one decode row) */
    int rep = M->n_heads / M->n_kv;
    J.grp = (T * M->n_kv >= 2 * nth && rep <= MR * 4) ? rep : 1;
    J.per_tok = M->n_heads / J.grp;
    J.fused = (T == R && T >= 2 * nth && rep <= MR * 4); /* one token per row: no row reads another token's new K / V */
#ifndef SPLIT_TAIL
#define SPLIT_TAIL 1 /* 0: attention units are whole rows (A/B builds, tests) */
#endif
    J.upr = (SPLIT_TAIL && M->n_kv > 1 && (rep * d) % QB == 0) ? M->n_kv : 1;
    J.nl = 0;
    for (int r = 0; r < R; r++)
        if (logits_rows[r]) J.rowmap[J.nl++] = r;
    run_parallel(step_body, &J, nth);
    free(J.row_of);
    free(J.ph);
    return 0;
}
