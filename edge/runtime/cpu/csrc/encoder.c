/* edge-rag's CPU sentence encoder: the int8 BERT graph of edge/build/encoder.py computed in one
   call, with its ops fused (edge/runtime/cpu/encoder.py drives it).

   er_encode() embeds a batch of texts given as token ids laid end to end (no padding: a text's
   rows are its own; the GEMMs run over every row of the batch, attention over each text alone) and
   writes one mean-pooled, L2-normalised vector per text. One call runs on the calling thread; the
   Python side runs one call per core at once (as the ONNX Runtime path runs one graph call per core).

   The numbers are the graph's own (edge.build.encoder.quantize_linears_per_row):
     row quantisation   xs = x * smooth (q/k/v and FFN up only);  r = max(max|xs|, qeps)
                        xq = clamp(rne((xs * (1 / r)) / qscale) + 128, 0, 255)          uint8
     int8 GEMM          idot = sum_k (xq_k - 128) * w_kn      (w int8, zero point 0: exact in int32)
                        y = ((float)idot * mult_n) * r  (+ bias_n)   mult_n = qscale * wscale_n
   so the integer products are the ones ONNX Runtime's MatMulIntegerToFloat computes; what differs
   is float rounding in the other ops (layer norm, softmax, erf), which moves a vector by ~1e-7.
   The same weights are read from the bundle's model.onnx, not copied.

   Weight layout (packed at load by encoder.py): [N / 64][K / 4][64 columns][4 inputs] int8, so a
   column block's 4 consecutive inputs are one int32 lane of vpdpbusd, 64 columns four zmm. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ENC_VNNI 1
#endif

#define NB 64 /* columns per packed block */
#define MAXF(a, b) ((a) > (b) ? (a) : (b)) /* not fmaxf: without -ffinite-math-only gcc calls libm for it */
#define QR 8  /* query rows per attention block */

#ifdef ENC_PROFILE /* development: -DENC_PROFILE adds time per phase, read by er_enc_profile */
#include <time.h>
static double g_prof[8];
static inline double prof_now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define PROF_START double prof_t0 = prof_now()
#define PROF(i) do { double t1 = prof_now(); g_prof[i] += t1 - prof_t0; prof_t0 = t1; } while (0)
int er_enc_profile(double *out) { for (int i = 0; i < 8; i++) { out[i] = g_prof[i]; g_prof[i] = 0; } return 8; }
#else
#define PROF_START
#define PROF(i)
int er_enc_profile(double *out) { (void)out; return 0; }
#endif

typedef struct {
    int32_t n, k;
    const int8_t *w;        /* packed, see above */
    const int32_t *corr;    /* [n] 128 * sum_k w_kn: the zero point's share of idot */
    const float *mult;      /* [n] qscale * wscale_n */
    const float *bias;      /* [n] */
    const float *smooth;    /* [k] or NULL: multiplies the input before its row quantisation */
} EncLin;

typedef struct {
    EncLin qkv, o, up, down;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
} EncLayer;

typedef struct {
    int32_t n_layers, hidden, n_heads, head_dim, inter, vocab, max_pos, portable;
    float ln_eps, emb_ln_eps, qscale, qeps, norm_eps;
    const float *word, *pos, *emb_ln_w, *emb_ln_b;
    const EncLayer *layers;
} Enc;

int er_enc_isa(void) {
#if defined(ENC_VNNI)
    return 3;
#else
    return 0;
#endif
}

/* Enc.portable (tests): this call runs the portable C on a VNNI build too; set per call, so concurrent calls
   of other models are unaffected */
static _Thread_local int g_scalar;

/* ---- vector math ------------------------------------------------------------------------- */
#if defined(ENC_VNNI)
static inline __m512 exp512(__m512 x) { /* e^x, x <= ~88; |rel err| ~1e-7 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 gelu512(__m512 x) { /* 0.5 x (1 + erf(x / sqrt 2)); erf by A&S 7.1.26 (|err| < 1.5e-7) */
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    __m512 a = _mm512_abs_ps(z);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 e = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(p, exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a))));
    e = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e),
                            _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#endif

static inline float gelu1(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* ---- row quantisation: x [m, k] float -> xq [m, k] uint8, r [m] ------------------------------ */
static void quant_rows(const float *x, int m, int k, const float *smooth, float qscale, float qeps,
                       uint8_t *xq, float *r, float *tmp, const float *known_max) {
    for (int i = 0; i < m; i++) {
        const float *xi = x + (size_t)i * k;
        const float *xs = xi;
        if (smooth) {
            for (int j = 0; j < k; j++) tmp[j] = xi[j] * smooth[j];
            xs = tmp;
        }
        uint8_t *q = xq + (size_t)i * k;
        int j = 0;
#if defined(ENC_VNNI)
        if (!g_scalar) {
            float amax;
            if (known_max) {
                amax = known_max[i]; /* the GEMM that wrote x took it (no smoothing between) */
            } else {
                __m512 mx = _mm512_setzero_ps();
                for (; j + 16 <= k; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xs + j)));
                amax = _mm512_reduce_max_ps(mx);
                for (; j < k; j++) amax = MAXF(amax, fabsf(xs[j]));
            }
            float ri = MAXF(amax, qeps), inv = 1.0f / ri;
            r[i] = ri;
            __m512 vinv = _mm512_set1_ps(inv), vs = _mm512_set1_ps(qscale);
            __m512i zp = _mm512_set1_epi32(128), lo = _mm512_setzero_si512(), hi = _mm512_set1_epi32(255);
            for (j = 0; j + 16 <= k; j += 16) {
                __m512 v = _mm512_div_ps(_mm512_mul_ps(_mm512_loadu_ps(xs + j), vinv), vs);
                __m512i c = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
                c = _mm512_min_epi32(_mm512_max_epi32(c, lo), hi);
                _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtepi32_epi8(c));
            }
            for (; j < k; j++) {
                float v = (xs[j] * inv) / qscale;
                int c = (int)nearbyintf(v) + 128;
                q[j] = (uint8_t)(c < 0 ? 0 : c > 255 ? 255 : c);
            }
            continue;
        }
#endif
        float amax = known_max ? known_max[i] : 0.0f;
        if (!known_max)
            for (j = 0; j < k; j++) amax = MAXF(amax, fabsf(xs[j]));
        float ri = MAXF(amax, qeps), inv = 1.0f / ri;
        r[i] = ri;
        for (j = 0; j < k; j++) {
            float v = (xs[j] * inv) / qscale;
            int c = (int)nearbyintf(v) + 128;
            q[j] = (uint8_t)(c < 0 ? 0 : c > 255 ? 255 : c);
        }
    }
}

/* ---- int8 GEMM: y [m, n] = ((float)idot * mult) * r + bias ------------------------------------ */
#if defined(ENC_VNNI)
/* One row's 64 outputs of a tile: y = ((float)(idot - corr) * mult) * r + bias, then GELU where the
   linear is FFN up (act), and the row's running max |y| where the next op quantises y (rmax). */
static inline __attribute__((always_inline)) void epi_row(__m512i a0, __m512i a1, __m512i a2, __m512i a3, const EncLin *L,
                                                         int n0, float r, float *y, int act, float *rmax) {
    __m512i acc[4] = {a0, a1, a2, a3};
    __m512 ri = _mm512_set1_ps(r), mx = _mm512_setzero_ps();
    for (int c = 0; c < 4; c++) {
        int n = n0 + 16 * c;
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[c], _mm512_loadu_si512(L->corr + n))), _mm512_loadu_ps(L->mult + n));
        v = _mm512_add_ps(_mm512_mul_ps(v, ri), _mm512_loadu_ps(L->bias + n));
        if (act) v = gelu512(v);
        if (rmax) mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        _mm512_storeu_ps(y + 16 * c, v);
    }
    if (rmax) *rmax = MAXF(*rmax, _mm512_reduce_max_ps(mx));
}

/* R rows x 64 columns (noinline: inlined into er_encode they spilled), accumulators in named registers
   a<row><col>; the empty asm after each row's four products keeps GCC 12 from hoisting the rows' broadcasts and
   spilling the accumulators (an array of them was spilled too). TILE(R, ROWS) writes tile<R>; ROWS<R>(X) applies
   X to each row index. */
#define ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define ROWS3(X) X(0) X(1) X(2)
#define ROWS1(X) X(0)
#define ACC_ZERO(i) __m512i a##i##0 = _mm512_setzero_si512(), a##i##1 = a##i##0, a##i##2 = a##i##0, a##i##3 = a##i##0;
#define ACC_DOT(i)                                                                                           \
    {                                                                                                        \
        int32_t v;                                                                                           \
        memcpy(&v, x + (size_t)(i) * k + kk, 4);                                                             \
        __m512i b = _mm512_set1_epi32(v);                                                                    \
        a##i##0 = _mm512_dpbusd_epi32(a##i##0, b, w0);                                                       \
        a##i##1 = _mm512_dpbusd_epi32(a##i##1, b, w1);                                                       \
        a##i##2 = _mm512_dpbusd_epi32(a##i##2, b, w2);                                                       \
        a##i##3 = _mm512_dpbusd_epi32(a##i##3, b, w3);                                                       \
        __asm__("" : "+v"(a##i##0), "+v"(a##i##1), "+v"(a##i##2), "+v"(a##i##3));                            \
    }
#define ACC_EPI(i) epi_row(a##i##0, a##i##1, a##i##2, a##i##3, L, n0, r[i], y + (size_t)(i) * ldy + n0, act, rmax ? rmax + (i) : NULL);
#define TILE(R)                                                                                                       \
    __attribute__((noinline)) static void tile##R(const uint8_t *x, int k, const int8_t *wb, const EncLin *L, int n0, \
                                                  const float *r, float *y, int ldy, int act, float *rmax) {          \
        ROWS##R(ACC_ZERO)                                                                                             \
        for (int kk = 0; kk < k; kk += 4) {                                                                           \
            const int8_t *wk = wb + (size_t)kk * NB;                                                                  \
            __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64);                                    \
            __m512i w2 = _mm512_loadu_si512(wk + 128), w3 = _mm512_loadu_si512(wk + 192);                             \
            ROWS##R(ACC_DOT)                                                                                          \
        }                                                                                                             \
        ROWS##R(ACC_EPI)                                                                                              \
    }
TILE(6)
TILE(3)
TILE(1)
#endif

/* act: GELU on the outputs; rmax [m] (or NULL): set to each output row's max |y| */
__attribute__((noinline)) static void gemm(const uint8_t *xq, const float *r, int m, const EncLin *L, float *y, int act, float *rmax) {
    if (rmax)
        for (int i = 0; i < m; i++) rmax[i] = 0.0f;
    const int k = L->k, n = L->n;
#if defined(ENC_VNNI)
    if (!g_scalar) {
        for (int nb = 0; nb < n / NB; nb++) {
            const int8_t *wb = L->w + (size_t)nb * k * NB;
            int i = 0;
            for (; i + 6 <= m; i += 6) tile6(xq + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n, act, rmax ? rmax + i : NULL);
            for (; i + 3 <= m; i += 3) tile3(xq + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n, act, rmax ? rmax + i : NULL);
            for (; i < m; i++) tile1(xq + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n, act, rmax ? rmax + i : NULL);
        }
        return;
    }
#endif
    int32_t *acc = malloc(sizeof(int32_t) * NB);
    for (int nb = 0; nb < n / NB; nb++) {
        const int8_t *wb = L->w + (size_t)nb * k * NB;
        for (int i = 0; i < m; i++) {
            const uint8_t *x = xq + (size_t)i * k;
            memset(acc, 0, sizeof(int32_t) * NB);
            for (int kk = 0; kk < k; kk += 4) {
                const int8_t *wk = wb + (size_t)kk * NB;
                for (int c = 0; c < NB; c++)
                    for (int t = 0; t < 4; t++) acc[c] += (int32_t)x[kk + t] * (int32_t)wk[c * 4 + t];
            }
            for (int c = 0; c < NB; c++) {
                int col = nb * NB + c;
                float v = (float)(acc[c] - L->corr[col]) * L->mult[col];
                v = v * r[i] + L->bias[col];
                if (act) v = gelu1(v);
                if (rmax) rmax[i] = MAXF(rmax[i], fabsf(v));
                y[(size_t)i * n + col] = v;
            }
        }
    }
    free(acc);
}

/* ---- layer norm of (a + b) over rows of h, in place into a ----------------------------------- */
static void add_ln(float *a, const float *b, int m, int h, const float *w, const float *bias, float eps) {
    for (int i = 0; i < m; i++) {
        float *x = a + (size_t)i * h;
        const float *y = b ? b + (size_t)i * h : NULL;
        float sum = 0.0f;
        int j = 0;
#if defined(ENC_VNNI)
        if (!g_scalar && h % 16 == 0) {
            __m512 s = _mm512_setzero_ps();
            for (j = 0; j < h; j += 16) {
                __m512 v = _mm512_loadu_ps(x + j);
                if (y) v = _mm512_add_ps(v, _mm512_loadu_ps(y + j));
                _mm512_storeu_ps(x + j, v);
                s = _mm512_add_ps(s, v);
            }
            float mean = _mm512_reduce_add_ps(s) / (float)h;
            __m512 vm = _mm512_set1_ps(mean), q = _mm512_setzero_ps();
            for (j = 0; j < h; j += 16) {
                __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + j), vm);
                q = _mm512_fmadd_ps(d, d, q);
            }
            float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(q) / (float)h + eps);
            __m512 vi = _mm512_set1_ps(inv);
            for (j = 0; j < h; j += 16) {
                __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm), vi);
                _mm512_storeu_ps(x + j, _mm512_fmadd_ps(d, _mm512_loadu_ps(w + j), _mm512_loadu_ps(bias + j)));
            }
            continue;
        }
#endif
        for (j = 0; j < h; j++) {
            if (y) x[j] += y[j];
            sum += x[j];
        }
        float mean = sum / (float)h, q = 0.0f;
        for (j = 0; j < h; j++) q += (x[j] - mean) * (x[j] - mean);
        float inv = 1.0f / sqrtf(q / (float)h + eps);
        for (j = 0; j < h; j++) x[j] = (x[j] - mean) * inv * w[j] + bias[j];
    }
}

#if defined(ENC_VNNI)
/* QR query rows of one head (head_dim 32) against all keys: scores, softmax, weighted values. Rows past
   `rows` compute the first row's numbers again and are not stored. Named registers as in the GEMM tiles. */
__attribute__((noinline)) static void attn_rows(const float *q, int ld, int rows, const float *kt, const float *vv, int len, int lp, float scale,
                      float *p, float *out, int ldo) {
    const float *q0 = rows > 0 ? q + (size_t)0 * ld : q, *q1 = rows > 1 ? q + (size_t)1 * ld : q, *q2 = rows > 2 ? q + (size_t)2 * ld : q, *q3 = rows > 3 ? q + (size_t)3 * ld : q, *q4 = rows > 4 ? q + (size_t)4 * ld : q, *q5 = rows > 5 ? q + (size_t)5 * ld : q, *q6 = rows > 6 ? q + (size_t)6 * ld : q, *q7 = rows > 7 ? q + (size_t)7 * ld : q;
    const __m512 vs = _mm512_set1_ps(scale);
    const __mmask16 tail = (__mmask16)((1u << (len & 15)) - 1u);
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = _mm512_set1_ps(-INFINITY), m2 = _mm512_set1_ps(-INFINITY), m3 = _mm512_set1_ps(-INFINITY), m4 = _mm512_set1_ps(-INFINITY), m5 = _mm512_set1_ps(-INFINITY), m6 = _mm512_set1_ps(-INFINITY), m7 = _mm512_set1_ps(-INFINITY); /* each row's running max score */
    for (int jb = 0; jb < lp; jb += 16) {
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps(), s4 = _mm512_setzero_ps(), s5 = _mm512_setzero_ps(), s6 = _mm512_setzero_ps(), s7 = _mm512_setzero_ps();
        for (int d = 0; d < 32; d++) {
            __m512 kv = _mm512_loadu_ps(kt + (size_t)d * lp + jb);
            s0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), kv, s0); s1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d]), kv, s1); s2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[d]), kv, s2); s3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[d]), kv, s3); s4 = _mm512_fmadd_ps(_mm512_set1_ps(q4[d]), kv, s4); s5 = _mm512_fmadd_ps(_mm512_set1_ps(q5[d]), kv, s5); s6 = _mm512_fmadd_ps(_mm512_set1_ps(q6[d]), kv, s6); s7 = _mm512_fmadd_ps(_mm512_set1_ps(q7[d]), kv, s7);
            __asm__("" : "+v"(s0), "+v"(s1), "+v"(s2), "+v"(s3), "+v"(s4), "+v"(s5), "+v"(s6), "+v"(s7));
        }
        s0 = _mm512_mul_ps(s0, vs); _mm512_storeu_ps(p + 0 * (size_t)lp + jb, s0); s1 = _mm512_mul_ps(s1, vs); _mm512_storeu_ps(p + 1 * (size_t)lp + jb, s1); s2 = _mm512_mul_ps(s2, vs); _mm512_storeu_ps(p + 2 * (size_t)lp + jb, s2); s3 = _mm512_mul_ps(s3, vs); _mm512_storeu_ps(p + 3 * (size_t)lp + jb, s3); s4 = _mm512_mul_ps(s4, vs); _mm512_storeu_ps(p + 4 * (size_t)lp + jb, s4); s5 = _mm512_mul_ps(s5, vs); _mm512_storeu_ps(p + 5 * (size_t)lp + jb, s5); s6 = _mm512_mul_ps(s6, vs); _mm512_storeu_ps(p + 6 * (size_t)lp + jb, s6); s7 = _mm512_mul_ps(s7, vs); _mm512_storeu_ps(p + 7 * (size_t)lp + jb, s7);
        if (jb + 16 <= len) { m0 = _mm512_max_ps(m0, s0); m1 = _mm512_max_ps(m1, s1); m2 = _mm512_max_ps(m2, s2); m3 = _mm512_max_ps(m3, s3); m4 = _mm512_max_ps(m4, s4); m5 = _mm512_max_ps(m5, s5); m6 = _mm512_max_ps(m6, s6); m7 = _mm512_max_ps(m7, s7); }
        else { m0 = _mm512_mask_max_ps(m0, tail, m0, s0); m1 = _mm512_mask_max_ps(m1, tail, m1, s1); m2 = _mm512_mask_max_ps(m2, tail, m2, s2); m3 = _mm512_mask_max_ps(m3, tail, m3, s3); m4 = _mm512_mask_max_ps(m4, tail, m4, s4); m5 = _mm512_mask_max_ps(m5, tail, m5, s5); m6 = _mm512_mask_max_ps(m6, tail, m6, s6); m7 = _mm512_mask_max_ps(m7, tail, m7, s7); }
    }
    float inv[QR], rmax[QR] = {_mm512_reduce_max_ps(m0), _mm512_reduce_max_ps(m1), _mm512_reduce_max_ps(m2), _mm512_reduce_max_ps(m3), _mm512_reduce_max_ps(m4), _mm512_reduce_max_ps(m5), _mm512_reduce_max_ps(m6), _mm512_reduce_max_ps(m7)};
    for (int r = 0; r < rows; r++) {
        float *pr = p + (size_t)r * lp;
        __m512 vm = _mm512_set1_ps(rmax[r]), sum = _mm512_setzero_ps();
        int jb;
        for (jb = 0; jb + 16 <= len; jb += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(pr + jb), vm));
            _mm512_storeu_ps(pr + jb, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (len & 15) {
            __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_loadu_ps(pr + jb), vm)));
            _mm512_storeu_ps(pr + jb, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    __m512 a00 = _mm512_setzero_ps(), a01 = _mm512_setzero_ps(), a10 = _mm512_setzero_ps(), a11 = _mm512_setzero_ps(), a20 = _mm512_setzero_ps(), a21 = _mm512_setzero_ps(), a30 = _mm512_setzero_ps(), a31 = _mm512_setzero_ps(), a40 = _mm512_setzero_ps(), a41 = _mm512_setzero_ps(), a50 = _mm512_setzero_ps(), a51 = _mm512_setzero_ps(), a60 = _mm512_setzero_ps(), a61 = _mm512_setzero_ps(), a70 = _mm512_setzero_ps(), a71 = _mm512_setzero_ps();
    for (int j = 0; j < len; j++) {
        __m512 v0 = _mm512_loadu_ps(vv + (size_t)j * 32), v1 = _mm512_loadu_ps(vv + (size_t)j * 32 + 16), pj;
        pj = _mm512_set1_ps(p[0 * (size_t)lp + j]); a00 = _mm512_fmadd_ps(pj, v0, a00); a01 = _mm512_fmadd_ps(pj, v1, a01);
        pj = _mm512_set1_ps(p[1 * (size_t)lp + j]); a10 = _mm512_fmadd_ps(pj, v0, a10); a11 = _mm512_fmadd_ps(pj, v1, a11);
        pj = _mm512_set1_ps(p[2 * (size_t)lp + j]); a20 = _mm512_fmadd_ps(pj, v0, a20); a21 = _mm512_fmadd_ps(pj, v1, a21);
        pj = _mm512_set1_ps(p[3 * (size_t)lp + j]); a30 = _mm512_fmadd_ps(pj, v0, a30); a31 = _mm512_fmadd_ps(pj, v1, a31);
        pj = _mm512_set1_ps(p[4 * (size_t)lp + j]); a40 = _mm512_fmadd_ps(pj, v0, a40); a41 = _mm512_fmadd_ps(pj, v1, a41);
        pj = _mm512_set1_ps(p[5 * (size_t)lp + j]); a50 = _mm512_fmadd_ps(pj, v0, a50); a51 = _mm512_fmadd_ps(pj, v1, a51);
        pj = _mm512_set1_ps(p[6 * (size_t)lp + j]); a60 = _mm512_fmadd_ps(pj, v0, a60); a61 = _mm512_fmadd_ps(pj, v1, a61);
        pj = _mm512_set1_ps(p[7 * (size_t)lp + j]); a70 = _mm512_fmadd_ps(pj, v0, a70); a71 = _mm512_fmadd_ps(pj, v1, a71);
        __asm__("" : "+v"(a00), "+v"(a10), "+v"(a20), "+v"(a30));
        __asm__("" : "+v"(a40), "+v"(a50), "+v"(a60), "+v"(a70));
        __asm__("" : "+v"(a01), "+v"(a11), "+v"(a21), "+v"(a31));
        __asm__("" : "+v"(a41), "+v"(a51), "+v"(a61), "+v"(a71));
    }
    if (rows > 0) { __m512 vi = _mm512_set1_ps(inv[0]); float *o = out + (size_t)0 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a00, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a01, vi)); }
    if (rows > 1) { __m512 vi = _mm512_set1_ps(inv[1]); float *o = out + (size_t)1 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a10, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a11, vi)); }
    if (rows > 2) { __m512 vi = _mm512_set1_ps(inv[2]); float *o = out + (size_t)2 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a20, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a21, vi)); }
    if (rows > 3) { __m512 vi = _mm512_set1_ps(inv[3]); float *o = out + (size_t)3 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a30, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a31, vi)); }
    if (rows > 4) { __m512 vi = _mm512_set1_ps(inv[4]); float *o = out + (size_t)4 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a40, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a41, vi)); }
    if (rows > 5) { __m512 vi = _mm512_set1_ps(inv[5]); float *o = out + (size_t)5 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a50, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a51, vi)); }
    if (rows > 6) { __m512 vi = _mm512_set1_ps(inv[6]); float *o = out + (size_t)6 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a60, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a61, vi)); }
    if (rows > 7) { __m512 vi = _mm512_set1_ps(inv[7]); float *o = out + (size_t)7 * ldo; _mm512_storeu_ps(o, _mm512_mul_ps(a70, vi)); _mm512_storeu_ps(o + 16, _mm512_mul_ps(a71, vi)); }
}
#endif

/* ---- attention of one text: qkv [L, 3h] (q | k | v, biases added) -> out [L, h] --------------
   kt: [head_dim][Lp] scratch, v: [L][head_dim], p: [QR][Lp] (Lp = L rounded up to 16) */
__attribute__((noinline)) static void attention(const float *qkv, int len, int hd, int nh, float scale, float *out, float *kt, float *vv, float *p) {
    const int h = hd * nh, ld = 3 * h;
    const int lp = (len + 15) & ~15;
    for (int head = 0; head < nh; head++) {
        const float *qh = qkv + head * hd, *kh = qkv + h + head * hd, *vh = qkv + 2 * h + head * hd;
        for (int d = 0; d < hd; d++) {
            for (int j = 0; j < len; j++) kt[(size_t)d * lp + j] = kh[(size_t)j * ld + d];
            for (int j = len; j < lp; j++) kt[(size_t)d * lp + j] = 0.0f;
        }
        for (int j = 0; j < len; j++) memcpy(vv + (size_t)j * hd, vh + (size_t)j * ld, sizeof(float) * hd);
        for (int i0 = 0; i0 < len; i0 += QR) {
            int rows = len - i0 < QR ? len - i0 : QR;
#if defined(ENC_VNNI)
            if (!g_scalar && hd == 32) {
                attn_rows(qh + (size_t)i0 * ld, ld, rows, kt, vv, len, lp, scale, p, out + (size_t)i0 * h + head * hd, h);
                continue;
            }
#endif
            for (int rr = 0; rr < rows; rr++) {
                const float *q = qh + (size_t)(i0 + rr) * ld;
                float *pr = p + (size_t)rr * lp, mx = -INFINITY, sum = 0.0f;
                for (int j = 0; j < len; j++) {
                    float s = 0.0f;
                    for (int d = 0; d < hd; d++) s += q[d] * kt[(size_t)d * lp + j];
                    pr[j] = s * scale;
                    mx = MAXF(mx, pr[j]);
                }
                for (int j = 0; j < len; j++) {
                    pr[j] = expf(pr[j] - mx);
                    sum += pr[j];
                }
                float *o = out + (size_t)(i0 + rr) * h + head * hd;
                for (int d = 0; d < hd; d++) o[d] = 0.0f;
                for (int j = 0; j < len; j++)
                    for (int d = 0; d < hd; d++) o[d] += pr[j] * vv[(size_t)j * hd + d];
                for (int d = 0; d < hd; d++) o[d] /= sum;
            }
        }
    }
}

/* Bytes of scratch er_encode needs for `tokens` rows in all, the longest text `max_len`. */
size_t er_encode_work_bytes(const Enc *m, int tokens, int max_len) {
    size_t h = (size_t)m->hidden, f = (size_t)m->inter, t = (size_t)tokens, lp = (size_t)((max_len + 15) & ~15);
    size_t floats = t * h       /* x */
                    + t * 3 * h /* qkv */
                    + t * h     /* attn / o out */
                    + t * f     /* ffn */
                    + 2 * t     /* r, the FFN rows' max */
                    + f         /* smooth tmp */
                    + (size_t)m->head_dim * lp + lp * (size_t)m->head_dim + QR * lp;
    return floats * sizeof(float) + t * f /* xq */ + 256;
}

/* texts: n; lens [n]; ids: sum(lens) token ids; out [n, hidden]; work: er_encode_work_bytes bytes.
   Returns 0, or -1 for an id or a position out of the model's range. */
int er_encode(const Enc *m, int n, const int32_t *lens, const int32_t *ids, float *out, void *work) {
    const int h = m->hidden, f = m->inter;
    int tokens = 0, max_len = 0;
    g_scalar = m->portable;
    for (int i = 0; i < n; i++) {
        if (lens[i] < 1 || lens[i] > m->max_pos) return -1;
        tokens += lens[i];
        if (lens[i] > max_len) max_len = lens[i];
    }
    const int lp = (max_len + 15) & ~15;
    float *x = (float *)work;
    float *qkv = x + (size_t)tokens * h;
    float *att = qkv + (size_t)tokens * 3 * h;
    float *ffn = att + (size_t)tokens * h;
    float *r = ffn + (size_t)tokens * f;
    float *fmax_rows = r + tokens;
    float *tmp = fmax_rows + tokens;
    float *kt = tmp + f;
    float *vv = kt + (size_t)m->head_dim * lp;
    float *p = vv + (size_t)lp * m->head_dim;
    uint8_t *xq = (uint8_t *)(p + QR * (size_t)lp);

    /* embeddings + layer norm */
    for (int i = 0, row = 0; i < n; i++)
        for (int j = 0; j < lens[i]; j++, row++) {
            int id = ids[row];
            if (id < 0 || id >= m->vocab) return -1;
            const float *we = m->word + (size_t)id * h, *pe = m->pos + (size_t)j * h;
            float *xr = x + (size_t)row * h;
            for (int c = 0; c < h; c++) xr[c] = we[c] + pe[c];
        }
    add_ln(x, NULL, tokens, h, m->emb_ln_w, m->emb_ln_b, m->emb_ln_eps);

    const float scale = 1.0f / sqrtf((float)m->head_dim);
    PROF_START;
    for (int l = 0; l < m->n_layers; l++) {
        const EncLayer *L = &m->layers[l];
        quant_rows(x, tokens, h, L->qkv.smooth, m->qscale, m->qeps, xq, r, tmp, NULL);
        PROF(0);
        gemm(xq, r, tokens, &L->qkv, qkv, 0, NULL);
        PROF(1);
        for (int i = 0, row = 0; i < n; row += lens[i], i++)
            attention(qkv + (size_t)row * 3 * h, lens[i], m->head_dim, m->n_heads, scale, att + (size_t)row * h, kt, vv, p);
        PROF(2);
        quant_rows(att, tokens, h, NULL, m->qscale, m->qeps, xq, r, tmp, NULL);
        PROF(0);
        gemm(xq, r, tokens, &L->o, att, 0, NULL);
        PROF(5);
        add_ln(x, att, tokens, h, L->ln1_w, L->ln1_b, m->ln_eps);
        PROF(3);
        quant_rows(x, tokens, h, L->up.smooth, m->qscale, m->qeps, xq, r, tmp, NULL);
        PROF(0);
        gemm(xq, r, tokens, &L->up, ffn, 1, fmax_rows); /* GELU and the down input's row max fused in */
        PROF(6);
        quant_rows(ffn, tokens, f, NULL, m->qscale, m->qeps, xq, r, tmp, fmax_rows);
        PROF(0);
        gemm(xq, r, tokens, &L->down, att, 0, NULL);
        PROF(7);
        add_ln(x, att, tokens, h, L->ln2_w, L->ln2_b, m->ln_eps);
        PROF(3);
    }

    /* mean pooling, L2 normalisation */
    for (int i = 0, row = 0; i < n; row += lens[i], i++) {
        float *o = out + (size_t)i * h;
        for (int c = 0; c < h; c++) o[c] = 0.0f;
        for (int j = 0; j < lens[i]; j++)
            for (int c = 0; c < h; c++) o[c] += x[(size_t)(row + j) * h + c];
        float ss = 0.0f;
        for (int c = 0; c < h; c++) {
            o[c] /= (float)lens[i];
            ss += o[c] * o[c];
        }
        float nrm = sqrtf(ss);
        if (nrm < m->norm_eps) nrm = m->norm_eps;
        for (int c = 0; c < h; c++) o[c] /= nrm;
    }
    return 0;
}
