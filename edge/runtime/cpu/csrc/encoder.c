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
#define LPAD(n) (((n) + 31) & ~31) /* keys a score row holds: attention takes 32 a step */

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

/* ---- row quantisation: x [m, k] float -> xq [m, k] uint8, r [m] ------------------------------
   gelu: quantise GELU(x) (FFN up's output), a row at a time through tmp, read again from L1. In the GEMM's
   epilogue GELU cost the same (~0.75 us a token and layer on a Zen 4, ~27 cycles a zmm: it is bound by its
   own ~30 vector ops), so the GEMM tiles stay plain. */
static void quant_rows(const float *x, int m, int k, const float *smooth, int gelu, float qscale, float qeps,
                       uint8_t *xq, float *r, float *tmp) {
    for (int i = 0; i < m; i++) {
        const float *xi = x + (size_t)i * k;
        const float *xs = xi;
        uint8_t *q = xq + (size_t)i * k;
        int j = 0;
#if defined(ENC_VNNI)
        if (!g_scalar) {
            __m512 mx = _mm512_setzero_ps();
            if (smooth || gelu) {
                for (; j + 16 <= k; j += 16) {
                    __m512 v = _mm512_loadu_ps(xi + j);
                    v = gelu ? gelu512(v) : _mm512_mul_ps(v, _mm512_loadu_ps(smooth + j));
                    _mm512_storeu_ps(tmp + j, v);
                    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
                }
                for (; j < k; j++) tmp[j] = gelu ? gelu1(xi[j]) : xi[j] * smooth[j];
                xs = tmp;
            } else {
                for (; j + 16 <= k; j += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xs + j)));
            }
            float amax = _mm512_reduce_max_ps(mx);
            for (; j < k; j++) amax = MAXF(amax, fabsf(xs[j]));
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
        if (smooth || gelu) {
            for (j = 0; j < k; j++) tmp[j] = gelu ? gelu1(xi[j]) : xi[j] * smooth[j];
            xs = tmp;
        }
        float amax = 0.0f;
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
/* One row's 64 outputs of a tile: y = ((float)(idot - corr) * mult) * r + bias. */
static inline __attribute__((always_inline)) void epi_row(__m512i a0, __m512i a1, __m512i a2, __m512i a3, const EncLin *L,
                                                         int n0, float r, float *y) {
    __m512i acc[4] = {a0, a1, a2, a3};
    __m512 ri = _mm512_set1_ps(r);
    for (int c = 0; c < 4; c++) {
        int n = n0 + 16 * c;
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[c], _mm512_loadu_si512(L->corr + n))), _mm512_loadu_ps(L->mult + n));
        _mm512_storeu_ps(y + 16 * c, _mm512_add_ps(_mm512_mul_ps(v, ri), _mm512_loadu_ps(L->bias + n)));
    }
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
#define ACC_EPI(i) epi_row(a##i##0, a##i##1, a##i##2, a##i##3, L, n0, r[i], y + (size_t)(i) * ldy + n0);
#define TILE(R)                                                                                                       \
    __attribute__((noinline)) static void tile##R(const uint8_t *x, int k, const int8_t *wb, const EncLin *L, int n0, \
                                                  const float *r, float *y, int ldy) {                                \
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

__attribute__((noinline)) static void gemm(const uint8_t *xq, const float *r, int m, const EncLin *L, float *y) {
    const int k = L->k, n = L->n;
#if defined(ENC_VNNI)
    if (!g_scalar) {
        for (int nb = 0; nb < n / NB; nb++) {
            const int8_t *wb = L->w + (size_t)nb * k * NB;
            int i = 0;
            for (; i + 6 <= m; i += 6) tile6(xq + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n);
            for (; i + 3 <= m; i += 3) tile3(xq + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n);
            for (; i < m; i++) tile1(xq + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n);
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
   `rows` compute the first row's numbers again and are not stored. Scores go 8 rows x 32 keys a step
   (16 accumulators: 10 loads feed 16 FMAs), named registers as in the GEMM tiles. */
#define AROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
_Static_assert(QR == 8, "AROWS names the QR rows of an attention block");
#define QK_ZERO(i) __m512 s##i##0 = _mm512_setzero_ps(), s##i##1 = s##i##0;
#define QK_FMA(i)                                                                    \
    {                                                                                \
        __m512 qb = _mm512_set1_ps(qr[i][d]);                                        \
        s##i##0 = _mm512_fmadd_ps(qb, k0, s##i##0);                                  \
        s##i##1 = _mm512_fmadd_ps(qb, k1, s##i##1);                                  \
    }
#define QK_STORE(i)                                                                  \
    _mm512_storeu_ps(p + (size_t)(i) * lp + jb, _mm512_mul_ps(s##i##0, vs));         \
    _mm512_storeu_ps(p + (size_t)(i) * lp + jb + 16, _mm512_mul_ps(s##i##1, vs));
#define PV_ZERO(i) __m512 a##i##0 = _mm512_setzero_ps(), a##i##1 = a##i##0;
#define PV_FMA(i)                                                                    \
    {                                                                                \
        __m512 pj = _mm512_set1_ps(p[(size_t)(i) * lp + j]);                         \
        a##i##0 = _mm512_fmadd_ps(pj, v0, a##i##0);                                  \
        a##i##1 = _mm512_fmadd_ps(pj, v1, a##i##1);                                  \
    }
#define PV_STORE(i)                                                                  \
    if (rows > (i)) {                                                                \
        __m512 vi = _mm512_set1_ps(inv[i]);                                          \
        float *o = out + (size_t)(i) * ldo;                                          \
        _mm512_storeu_ps(o, _mm512_mul_ps(a##i##0, vi));                             \
        _mm512_storeu_ps(o + 16, _mm512_mul_ps(a##i##1, vi));                        \
    }
static inline __mmask16 keys_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u); }

/* kt: [32][lp] keys transposed, zero past len; lp a multiple of 32 */
__attribute__((noinline)) static void attn_rows(const float *q, int ld, int rows, const float *kt, const float *vh, int len, int lp, float scale,
                                                float *p, float *out, int ldo) {
    const float *qr[QR];
    for (int i = 0; i < QR; i++) qr[i] = q + (size_t)(i < rows ? i : 0) * ld;
    const __m512 vs = _mm512_set1_ps(scale);
    for (int jb = 0; jb < lp; jb += 32) {
        AROWS(QK_ZERO)
        for (int d = 0; d < 32; d++) {
            __m512 k0 = _mm512_loadu_ps(kt + (size_t)d * lp + jb), k1 = _mm512_loadu_ps(kt + (size_t)d * lp + jb + 16);
            AROWS(QK_FMA)
        }
        AROWS(QK_STORE)
    }
    float inv[QR];
    const __mmask16 tail = keys_mask(len & 15);
    for (int r = 0; r < rows; r++) {
        float *pr = p + (size_t)r * lp;
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        int jb;
        for (jb = 0; jb + 16 <= len; jb += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(pr + jb));
        if (len & 15) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_loadu_ps(pr + jb));
        __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
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
    AROWS(PV_ZERO)
    for (int j = 0; j < len; j++) {
        __m512 v0 = _mm512_loadu_ps(vh + (size_t)j * ld), v1 = _mm512_loadu_ps(vh + (size_t)j * ld + 16);
        AROWS(PV_FMA)
    }
    AROWS(PV_STORE)
}
#endif

/* ---- attention of one text: qkv [L, 3h] (q | k | v, biases added) -> out [L, h] --------------
   kt: [head_dim][Lp] scratch (a head's keys transposed; its values are read in place), p: [QR][Lp] (Lp = LPAD(L)) */
__attribute__((noinline)) static void attention(const float *qkv, int len, int hd, int nh, float scale, float *out, float *kt, float *p) {
    const int h = hd * nh, ld = 3 * h;
    const int lp = LPAD(len);
    for (int head = 0; head < nh; head++) {
        const float *qh = qkv + head * hd, *kh = qkv + h + head * hd, *vh = qkv + 2 * h + head * hd;
        for (int j = 0; j < len; j++) /* rows in, columns out: each key row read once */
            for (int d = 0; d < hd; d++) kt[(size_t)d * lp + j] = kh[(size_t)j * ld + d];
        for (int d = 0; d < hd; d++)
            for (int j = len; j < lp; j++) kt[(size_t)d * lp + j] = 0.0f;
        for (int i0 = 0; i0 < len; i0 += QR) {
            int rows = len - i0 < QR ? len - i0 : QR;
#if defined(ENC_VNNI)
            if (!g_scalar && hd == 32) {
                attn_rows(qh + (size_t)i0 * ld, ld, rows, kt, vh, len, lp, scale, p, out + (size_t)i0 * h + head * hd, h);
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
                    for (int d = 0; d < hd; d++) o[d] += pr[j] * vh[(size_t)j * ld + d];
                for (int d = 0; d < hd; d++) o[d] /= sum;
            }
        }
    }
}

/* Bytes of scratch er_encode needs for `tokens` rows in all, the longest text `max_len`. */
size_t er_encode_work_bytes(const Enc *m, int tokens, int max_len) {
    size_t h = (size_t)m->hidden, f = (size_t)m->inter, t = (size_t)tokens, lp = (size_t)LPAD(max_len);
    size_t floats = t * h       /* x */
                    + t * 3 * h /* qkv */
                    + t * h     /* attn / o out */
                    + t * f     /* ffn */
                    + t         /* r */
                    + f         /* a row of quant_rows' input, smoothed or through GELU */
                    + (size_t)m->head_dim * lp + QR * lp;
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
    const int lp = LPAD(max_len);
    float *x = (float *)work;
    float *qkv = x + (size_t)tokens * h;
    float *att = qkv + (size_t)tokens * 3 * h;
    float *ffn = att + (size_t)tokens * h;
    float *r = ffn + (size_t)tokens * f;
    float *tmp = r + tokens;
    float *kt = tmp + f;
    float *p = kt + (size_t)m->head_dim * lp;
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
        quant_rows(x, tokens, h, L->qkv.smooth, 0, m->qscale, m->qeps, xq, r, tmp);
        PROF(0);
        gemm(xq, r, tokens, &L->qkv, qkv);
        PROF(1);
        for (int i = 0, row = 0; i < n; row += lens[i], i++)
            attention(qkv + (size_t)row * 3 * h, lens[i], m->head_dim, m->n_heads, scale, att + (size_t)row * h, kt, p);
        PROF(2);
        quant_rows(att, tokens, h, NULL, 0, m->qscale, m->qeps, xq, r, tmp);
        PROF(0);
        gemm(xq, r, tokens, &L->o, att);
        PROF(5);
        add_ln(x, att, tokens, h, L->ln1_w, L->ln1_b, m->ln_eps);
        PROF(3);
        quant_rows(x, tokens, h, L->up.smooth, 0, m->qscale, m->qeps, xq, r, tmp);
        PROF(0);
        gemm(xq, r, tokens, &L->up, ffn);
        PROF(6);
        quant_rows(ffn, tokens, f, NULL, 1, m->qscale, m->qeps, xq, r, tmp); /* GELU, then the down input's quantisation */
        PROF(4);
        gemm(xq, r, tokens, &L->down, att);
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
