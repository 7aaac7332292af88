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

   Kernel paths, chosen when the file is compiled (-march=native, or EDGE_RAG_NATIVE_ISA):
     vnni    AVX-512 VNNI: zmm, vpdpbusd. Weights packed at load (encoder.py: pack_weight)
             [N / 64][K / 4][64 columns][4 inputs] int8: 4 consecutive inputs are one int32 lane, 64 columns four zmm.
     avx512  AVX-512BW without VNNI (Skylake-SP): zmm, vpmaddwd on int16, the avx2 path's weights.
     avx2    AVX2 + FMA (x86 without VNNI: Haswell .. Zen 3): ymm, vpmaddwd on int16 (exact: see its GEMM).
             Weights [N / 16][K / 2][16 columns][2 inputs] int16 (pack_weight16).
     avxvnni AVX-VNNI without AVX-512 (Intel Alder Lake and later client cores): ymm vpdpbusd on the vnni layout.
     neon    ARMv8.2 with dot products (Jetson Orin): sdot on the vnni path's int8 layout.
     portable C (tests, and what any other CPU would run: slower than onnxruntime, so not picked there).
   The float ops other than the GEMMs (row quantisation, layer norm, attention, GELU) are written once over VL
   lanes (vector math below) for zmm, ymm and NEON. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#if defined(AVXVNNI_EVEX) || (defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__))
/* ymm vpdpbusd, 8 float lanes (AVX-VNNI without AVX-512: Intel Alder Lake and later client cores, Sierra Forest).
   AVXVNNI_EVEX (EDGE_RAG_NATIVE_ISA=avxvnni on a CPU with AVX-512 VNNI, which has no VEX form): the same code
   with the EVEX-encoded ymm instruction, for tests and timing on such a CPU. */
#define ENC_YMM 1
#define ENC_AVXVNNI 1
#if defined(__AVXVNNI__)
#define ydpbusd _mm256_dpbusd_avx_epi32
#else
#define ydpbusd _mm256_dpbusd_epi32
#endif
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#define ENC_ZMM 1 /* 16 float lanes */
#if defined(__AVX512VNNI__)
#define ENC_VNNI 1 /* vpdpbusd */
#else
#define ENC_AVX512 1 /* vpmaddwd on zmm (AVX-512 without VNNI: Skylake-SP) */
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define ENC_YMM 1
#define ENC_AVX2 1 /* ymm: 8 float lanes, vpmaddwd (an AVX2-only x86: Haswell .. Zen 3) */
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define ENC_NEON 1 /* 4 float lanes, sdot (ARMv8.2 dot product: Jetson Orin's Cortex-A78AE) */
#endif
#if defined(ENC_ZMM) || defined(ENC_YMM) || defined(ENC_NEON)
#define ENC_VEC 1
#endif

#define NB 64 /* columns per packed block */
#define MAXF(a, b) ((a) > (b) ? (a) : (b)) /* not fmaxf: without -ffinite-math-only gcc calls libm for it */
#if defined(ENC_YMM)
#define QR 4 /* query rows per attention block: 2 QR score accumulators of 16 ymm registers */
#define AROWS(X) X(0) X(1) X(2) X(3)
#else
#define QR 8 /* of 32 zmm registers */
#define AROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#endif
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

int er_enc_isa(void) { /* edge.runtime.cpu.abi.ISA_NAMES' codes */
#if defined(ENC_VNNI)
    return 3;
#elif defined(ENC_AVX512)
    return 2;
#elif defined(ENC_AVX2)
    return 1;
#elif defined(ENC_AVXVNNI)
    return 5;
#elif defined(ENC_NEON)
    return 4;
#else
    return 0;
#endif
}

/* Enc.portable (tests): this call runs the portable C on a vector build too; set per call, so concurrent calls
   of other models are unaffected */
static _Thread_local int g_scalar;

/* ---- vector math: VL float lanes, written once for zmm and ymm ---------------------------------
   Each op is one instruction of either ISA, so a lane's numbers are the same on both (v_pow2: scalef on
   zmm, an exponent-field multiply on ymm, both exact to the same rounding); what differs between the
   builds is only how a row's partial sums are added up (16 or 8 lanes), ~1 ulp in a norm or a softmax. */
#if defined(ENC_ZMM)
#define VL 16
typedef __m512 vf;
#define v_ld _mm512_loadu_ps
#define v_st _mm512_storeu_ps
#define v_set _mm512_set1_ps
#define v_zero _mm512_setzero_ps
#define v_add _mm512_add_ps
#define v_sub _mm512_sub_ps
#define v_mul _mm512_mul_ps
#define v_div _mm512_div_ps
#define v_max _mm512_max_ps
#define v_fma _mm512_fmadd_ps   /* a * b + c */
#define v_fnma _mm512_fnmadd_ps /* c - a * b */
#define v_abs _mm512_abs_ps
#define v_hmax _mm512_reduce_max_ps
#define v_hsum _mm512_reduce_add_ps
static inline vf v_rne(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT); }
static inline vf v_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); } /* p 2^n, n integral in [-126, 127] */
static inline vf v_copysign(vf e, vf z) {                                /* |e| >= 0 with z's sign bit */
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e), _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u))));
}
static inline __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u); }
static inline vf v_ld_fill(const float *p, int n, float fill) { return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes(n), p); } /* lanes >= n: fill */
static inline vf v_head(vf x, int n) { return _mm512_maskz_mov_ps(lanes(n), x); } /* lanes >= n: 0 */
static inline void v_st_codes(uint8_t *q, vf v) { /* clamp(rne(v) + 128, 0, 255), VL bytes */
    __m512i c = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), _mm512_set1_epi32(128));
    c = _mm512_min_epi32(_mm512_max_epi32(c, _mm512_setzero_si512()), _mm512_set1_epi32(255));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(c));
}
#elif defined(ENC_YMM)
#define VL 8
typedef __m256 vf;
#define v_ld _mm256_loadu_ps
#define v_st _mm256_storeu_ps
#define v_set _mm256_set1_ps
#define v_zero _mm256_setzero_ps
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_div _mm256_div_ps
#define v_max _mm256_max_ps
#define v_fma _mm256_fmadd_ps
#define v_fnma _mm256_fnmadd_ps
static inline vf v_abs(vf x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
static inline float v_hmax(vf x) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}
static inline float v_hsum(vf x) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}
static inline vf v_rne(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf p, vf n) { /* 2^n put together in the exponent field (normal for n >= -126): exact */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vf v_copysign(vf e, vf z) { return _mm256_or_ps(e, _mm256_and_ps(z, _mm256_set1_ps(-0.0f))); }
static inline __m256i lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
static inline vf v_ld_fill(const float *p, int n, float fill) {
    __m256i m = lanes(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static inline vf v_head(vf x, int n) { return _mm256_and_ps(x, _mm256_castsi256_ps(lanes(n))); }
static inline void v_st_codes(uint8_t *q, vf v) {
    __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(v), _mm256_set1_epi32(128)); /* MXCSR: to nearest even */
    c = _mm256_min_epi32(_mm256_max_epi32(c, _mm256_setzero_si256()), _mm256_set1_epi32(255));
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)); /* 8 x u16, in order */
    _mm_storel_epi64((__m128i *)q, _mm_packus_epi16(w, w));
}
#elif defined(ENC_NEON)
#define VL 4
typedef float32x4_t vf;
static inline vf v_ld(const float *p) { return vld1q_f32(p); }
static inline void v_st(float *p, vf v) { vst1q_f32(p, v); }
static inline vf v_set(float a) { return vdupq_n_f32(a); }
static inline vf v_zero(void) { return vdupq_n_f32(0.0f); }
static inline vf v_add(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf v_sub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf v_mul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf v_div(vf a, vf b) { return vdivq_f32(a, b); }
static inline vf v_max(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf v_fnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
static inline vf v_abs(vf x) { return vabsq_f32(x); }
static inline float v_hmax(vf x) { return vmaxvq_f32(x); }
static inline float v_hsum(vf x) { return vaddvq_f32(x); }
static inline vf v_rne(vf x) { return vrndnq_f32(x); }
static inline vf v_pow2(vf p, vf n) {
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
static inline vf v_copysign(vf e, vf z) {
    return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(e), vandq_u32(vreinterpretq_u32_f32(z), vdupq_n_u32(0x80000000u))));
}
static inline uint32x4_t lanes(int n) {
    static const uint32_t iota[4] = {0, 1, 2, 3};
    return vcltq_u32(vld1q_u32(iota), vdupq_n_u32((uint32_t)(n < 0 ? 0 : n)));
}
/* reads all VL floats: only used on score rows, padded to LPAD */
static inline vf v_ld_fill(const float *p, int n, float fill) { return vbslq_f32(lanes(n), vld1q_f32(p), vdupq_n_f32(fill)); }
static inline vf v_head(vf x, int n) { return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(x), lanes(n))); }
static inline void v_st_codes(uint8_t *q, vf v) {
    int32x4_t c = vaddq_s32(vcvtnq_s32_f32(v), vdupq_n_s32(128)); /* to nearest even */
    c = vminq_s32(vmaxq_s32(c, vdupq_n_s32(0)), vdupq_n_s32(255));
    uint16x4_t h = vmovn_u32(vreinterpretq_u32_s32(c));
    uint8x8_t b = vmovn_u16(vcombine_u16(h, h));
    vst1_lane_u32((uint32_t *)(void *)q, vreinterpret_u32_u8(b), 0);
}
#endif

#if defined(ENC_VEC)
static inline vf v_exp(vf x) { /* e^x, x <= ~88; |rel err| ~1e-7 */
    x = v_max(x, v_set(-87.3f));
    vf n = v_rne(v_mul(x, v_set(1.44269504088896341f)));
    vf r = v_fnma(n, v_set(0.693145751953125f), x);
    r = v_fnma(n, v_set(1.428606765330187045e-6f), r);
    vf p = v_set(1.9875691500e-4f);
    p = v_fma(p, r, v_set(1.3981999507e-3f));
    p = v_fma(p, r, v_set(8.3334519073e-3f));
    p = v_fma(p, r, v_set(4.1665795894e-2f));
    p = v_fma(p, r, v_set(1.6666665459e-1f));
    p = v_fma(p, r, v_set(5.0000001201e-1f));
    p = v_fma(v_mul(p, r), r, r);
    p = v_add(p, v_set(1.0f));
    return v_pow2(p, n);
}

static inline vf v_gelu(vf x) { /* 0.5 x (1 + erf(x / sqrt 2)); erf by A&S 7.1.26 (|err| < 1.5e-7) */
    vf z = v_mul(x, v_set(0.70710678118654752f));
    vf a = v_abs(z);
    vf t = v_div(v_set(1.0f), v_fma(a, v_set(0.3275911f), v_set(1.0f)));
    vf p = v_set(1.061405429f);
    p = v_fma(p, t, v_set(-1.453152027f));
    p = v_fma(p, t, v_set(1.421413741f));
    p = v_fma(p, t, v_set(-0.284496736f));
    p = v_fma(p, t, v_set(0.254829592f));
    p = v_mul(p, t);
    vf e = v_sub(v_set(1.0f), v_mul(p, v_exp(v_mul(v_sub(v_zero(), a), a))));
    return v_mul(v_mul(v_set(0.5f), x), v_add(v_set(1.0f), v_copysign(e, z)));
}
#endif

static inline float gelu1(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* ---- row quantisation: x [m, k] float -> xq [m, k] uint8, r [m] ------------------------------
   gelu: quantise GELU(x) (FFN up's output), a row at a time through tmp, read again from L1. In the GEMM's
   epilogue GELU cost the same (~0.75 us a token and layer on a Zen 4, ~27 cycles a zmm: it is bound by its
   own ~30 vector ops), so the GEMM tiles stay plain. The codes are 1..255 (|x| / r <= 1, scale 1/127): the
   codes minus 128 fit int8 (the neon path). */
static void quant_rows(const float *x, int m, int k, const float *smooth, int gelu, float qscale, float qeps,
                       uint8_t *xq, float *r, float *tmp) {
    for (int i = 0; i < m; i++) {
        const float *xi = x + (size_t)i * k;
        const float *xs = xi;
        uint8_t *q = xq + (size_t)i * k;
        int j = 0;
#if defined(ENC_VEC)
        if (!g_scalar) {
            vf mx = v_zero();
            if (smooth || gelu) {
                for (; j + VL <= k; j += VL) {
                    vf v = v_ld(xi + j);
                    v = gelu ? v_gelu(v) : v_mul(v, v_ld(smooth + j));
                    v_st(tmp + j, v);
                    mx = v_max(mx, v_abs(v));
                }
                for (; j < k; j++) tmp[j] = gelu ? gelu1(xi[j]) : xi[j] * smooth[j];
                xs = tmp;
            } else {
                for (; j + VL <= k; j += VL) mx = v_max(mx, v_abs(v_ld(xs + j)));
            }
            float amax = v_hmax(mx);
            for (; j < k; j++) amax = MAXF(amax, fabsf(xs[j]));
            float ri = MAXF(amax, qeps), inv = 1.0f / ri;
            r[i] = ri;
            vf vinv = v_set(inv), vs = v_set(qscale);
            for (j = 0; j + VL <= k; j += VL) v_st_codes(q + j, v_div(v_mul(v_ld(xs + j), vinv), vs));
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

/* ---- int8 GEMM: y [m, n] = ((float)idot * mult) * r + bias ------------------------------------
   The tiles (noinline: inlined into er_encode they spilled) keep their accumulators in named registers
   a<row><col>; the empty asm after each row's products keeps GCC 12 from hoisting the rows' broadcasts and
   spilling the accumulators (an array of them was spilled too). TILE(R) writes tile<R>; ROWS<R>(X) applies
   X to each row index. */
#define ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define ROWS3(X) X(0) X(1) X(2)
#define ROWS1(X) X(0)
#if defined(ENC_ZMM)
/* One row's 64 outputs of a tile: y = ((float)(idot - corr) * mult) * r + bias (corr: 0 where the tile's codes are
   xq - 128 already, the int16 path). */
static inline __attribute__((always_inline)) void epi_row(__m512i a0, __m512i a1, __m512i a2, __m512i a3, const EncLin *L,
                                                         int n0, float r, float *y, const int corr) {
    __m512i acc[4] = {a0, a1, a2, a3};
    __m512 ri = _mm512_set1_ps(r);
    for (int c = 0; c < 4; c++) {
        int n = n0 + 16 * c;
        __m512i d = corr ? _mm512_sub_epi32(acc[c], _mm512_loadu_si512(L->corr + n)) : acc[c];
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(L->mult + n));
        _mm512_storeu_ps(y + 16 * c, _mm512_add_ps(_mm512_mul_ps(v, ri), _mm512_loadu_ps(L->bias + n)));
    }
}
#define ACC_ZERO(i) __m512i a##i##0 = _mm512_setzero_si512(), a##i##1 = a##i##0, a##i##2 = a##i##0, a##i##3 = a##i##0;
#if defined(ENC_VNNI)
/* R rows x 64 columns: a row's four zmm of 16 int32 sums take a k-step's 4 inputs a lane (vpdpbusd) */
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
#define ACC_EPI(i) epi_row(a##i##0, a##i##1, a##i##2, a##i##3, L, n0, r[i], y + (size_t)(i) * ldy + n0, 1);
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
#else
/* R rows x 64 columns, int16 x int16 as on avx2 (below), on zmm: a k-pair of 16 columns is one zmm of the
   int16 layout, so a tile reads its block's four 16-column slices (k * 16 int16 apart). zmm vpmaddwd does 112 G MAC/s
   on a Zen 4 against ymm's 84; on Skylake-SP (two 512-bit ports) twice ymm's. */
#define ACC_DOT(i)                                                                                           \
    {                                                                                                        \
        int32_t v;                                                                                           \
        memcpy(&v, x + (size_t)(i) * k + kk, 4);                                                             \
        __m512i b = _mm512_set1_epi32(v);                                                                    \
        a##i##0 = _mm512_add_epi32(a##i##0, _mm512_madd_epi16(b, w0));                                      \
        a##i##1 = _mm512_add_epi32(a##i##1, _mm512_madd_epi16(b, w1));                                      \
        a##i##2 = _mm512_add_epi32(a##i##2, _mm512_madd_epi16(b, w2));                                      \
        a##i##3 = _mm512_add_epi32(a##i##3, _mm512_madd_epi16(b, w3));                                      \
        __asm__("" : "+v"(a##i##0), "+v"(a##i##1), "+v"(a##i##2), "+v"(a##i##3));                            \
    }
#define ACC_EPI(i) epi_row(a##i##0, a##i##1, a##i##2, a##i##3, L, n0, r[i], y + (size_t)(i) * ldy + n0, 0);
#define TILE(R)                                                                                                       \
    __attribute__((noinline)) static void tile##R(const int16_t *x, int k, const int16_t *wb, const EncLin *L, int n0, \
                                                  const float *r, float *y, int ldy) {                                \
        const size_t s = (size_t)16 * k; /* one 16-column slice */                                                    \
        ROWS##R(ACC_ZERO)                                                                                             \
        for (int kk = 0; kk < k; kk += 2) {                                                                           \
            const int16_t *wk = wb + (size_t)kk * 16;                                                                 \
            __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + s);                                     \
            __m512i w2 = _mm512_loadu_si512(wk + 2 * s), w3 = _mm512_loadu_si512(wk + 3 * s);                         \
            ROWS##R(ACC_DOT)                                                                                          \
        }                                                                                                             \
        ROWS##R(ACC_EPI)                                                                                              \
    }
#endif
TILE(6)
TILE(3)
TILE(1)
#elif defined(ENC_YMM)
/* One row's 16 outputs: y = ((float)dot * mult) * r + bias, dot = idot - corr (corr 0: the avx2 tiles compute
   sum (xq - 128) w as such) */
static inline __attribute__((always_inline)) void epi_row(__m256i a0, __m256i a1, const EncLin *L, int n0, float r, float *y,
                                                         const int corr) {
    __m256 ri = _mm256_set1_ps(r);
    if (corr) {
        a0 = _mm256_sub_epi32(a0, _mm256_loadu_si256((const __m256i *)(L->corr + n0)));
        a1 = _mm256_sub_epi32(a1, _mm256_loadu_si256((const __m256i *)(L->corr + n0 + 8)));
    }
    __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(a0), _mm256_loadu_ps(L->mult + n0));
    __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(a1), _mm256_loadu_ps(L->mult + n0 + 8));
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(v0, ri), _mm256_loadu_ps(L->bias + n0)));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_mul_ps(v1, ri), _mm256_loadu_ps(L->bias + n0 + 8)));
}

/* R rows x 16 columns, int16 x int16 (vpmaddwd: two products a lane, summed into int32, exact). Without VNNI,
   u8 x s8 products go through vpmaddubsw, whose int16 pair sums saturate; the sign trick that avoids it costs
   three more ops a product (measured 3.5x VNNI's time on a Zen 4, against 2x here). So on AVX2 the weights are
   packed as int16 (edge.runtime.cpu.encoder.pack_weight16: [N / 16][K / 2][16 columns][2 inputs]) and a row's
   codes widened to xq - 128 (int16, gemm below): the same integer dot as vpdpbusd's less its zero point's share,
   so the same floats come out. 16 ymm registers: 2 R accumulators, 2 weights, a broadcast. */
#if defined(ENC_AVXVNNI)
/* avxvnni: R rows x 16 columns of a packed block (the vnni layout, as neon reads it: a k-step's 4 inputs of the
   block's 64 columns, this tile's 16 of them two ymm), vpdpbusd on the uint8 codes as on zmm: u8 x s8 products summed
   exactly in int32, the zero point's share taken off in epi_row. */
typedef uint8_t ycode_t; /* the codes a tile reads */
typedef int8_t yw_t;     /* its packed weights */
#define YK 4             /* inputs a k-step */
#define YW_PER_K NB      /* weight elements an input of a block */
#define YCORR 1
#define YDOT(a, b, w) ydpbusd(a, b, w)
#else
typedef int16_t ycode_t;
typedef int16_t yw_t;
#define YK 2
#define YW_PER_K 16
#define YCORR 0
#define YDOT(a, b, w) _mm256_add_epi32(a, _mm256_madd_epi16(b, w))
#endif
/* Both: a k-step's weights for the tile's 16 columns are two consecutive ymm; 16 ymm registers hold 2 R accumulators,
   2 weights and a broadcast. */
#define YACC_ZERO(i) __m256i a##i##0 = _mm256_setzero_si256(), a##i##1 = a##i##0;
#define YACC_DOT(i)                                                                                          \
    {                                                                                                        \
        int32_t v;                                                                                           \
        memcpy(&v, x + (size_t)(i) * k + kk, 4);                                                             \
        __m256i b = _mm256_set1_epi32(v);                                                                    \
        a##i##0 = YDOT(a##i##0, b, w0);                                                                      \
        a##i##1 = YDOT(a##i##1, b, w1);                                                                      \
        __asm__("" : "+x"(a##i##0), "+x"(a##i##1));                                                          \
    }
#define YACC_EPI(i) epi_row(a##i##0, a##i##1, L, n0, r[i], y + (size_t)(i) * ldy + n0, YCORR);
#define TILE(R)                                                                                                       \
    __attribute__((noinline)) static void tile##R(const ycode_t *x, int k, const yw_t *wb, const EncLin *L, int n0,   \
                                                  const float *r, float *y, int ldy) {                                \
        ROWS##R(YACC_ZERO)                                                                                            \
        for (int kk = 0; kk < k; kk += YK) {                                                                          \
            const __m256i *wk = (const __m256i *)(wb + (size_t)kk * YW_PER_K);                                        \
            __m256i w0 = _mm256_loadu_si256(wk), w1 = _mm256_loadu_si256(wk + 1);                                     \
            ROWS##R(YACC_DOT)                                                                                         \
        }                                                                                                             \
        ROWS##R(YACC_EPI)                                                                                             \
    }
TILE(6)
TILE(3)
TILE(1)
#elif defined(ENC_NEON)
static inline __attribute__((always_inline)) void epi_row(int32x4_t a0, int32x4_t a1, int32x4_t a2, int32x4_t a3, const EncLin *L,
                                                         int n0, float r, float *y) {
    int32x4_t acc[4] = {a0, a1, a2, a3};
    float32x4_t ri = vdupq_n_f32(r);
    for (int c = 0; c < 4; c++) {
        float32x4_t v = vmulq_f32(vcvtq_f32_s32(acc[c]), vld1q_f32(L->mult + n0 + 4 * c));
        vst1q_f32(y + 4 * c, vaddq_f32(vmulq_f32(v, ri), vld1q_f32(L->bias + n0 + 4 * c)));
    }
}

/* R rows x 16 columns of a packed block (the vnni layout: a k-step's 16 bytes are 4 columns x 4 inputs, one sdot
   lane a column), the codes taken as xq - 128 (int8, gemm below): sdot's int8 x int8 products sum exactly in int32,
   the dot less the zero point's share as on avx2. 32 registers: 4 R accumulators, 4 weights, a broadcast. */
#define NACC_ZERO(i) int32x4_t a##i##0 = vdupq_n_s32(0), a##i##1 = a##i##0, a##i##2 = a##i##0, a##i##3 = a##i##0;
#define NACC_DOT(i)                                                                                          \
    {                                                                                                        \
        int32_t v;                                                                                           \
        memcpy(&v, x + (size_t)(i) * k + kk, 4);                                                             \
        int8x16_t b = vreinterpretq_s8_s32(vdupq_n_s32(v));                                                  \
        a##i##0 = vdotq_s32(a##i##0, w0, b);                                                                 \
        a##i##1 = vdotq_s32(a##i##1, w1, b);                                                                 \
        a##i##2 = vdotq_s32(a##i##2, w2, b);                                                                 \
        a##i##3 = vdotq_s32(a##i##3, w3, b);                                                                 \
        __asm__("" : "+w"(a##i##0), "+w"(a##i##1), "+w"(a##i##2), "+w"(a##i##3));                            \
    }
#define NACC_EPI(i) epi_row(a##i##0, a##i##1, a##i##2, a##i##3, L, n0, r[i], y + (size_t)(i) * ldy + n0);
#define TILE(R)                                                                                                       \
    __attribute__((noinline)) static void tile##R(const int8_t *x, int k, const int8_t *wb, const EncLin *L, int n0,  \
                                                  const float *r, float *y, int ldy) {                                \
        ROWS##R(NACC_ZERO)                                                                                            \
        for (int kk = 0; kk < k; kk += 4) {                                                                           \
            const int8_t *wk = wb + (size_t)kk * NB;                                                                  \
            int8x16_t w0 = vld1q_s8(wk), w1 = vld1q_s8(wk + 16), w2 = vld1q_s8(wk + 32), w3 = vld1q_s8(wk + 48);      \
            ROWS##R(NACC_DOT)                                                                                         \
        }                                                                                                             \
        ROWS##R(NACC_EPI)                                                                                             \
    }
TILE(6)
TILE(3)
TILE(1)
#endif

/* rows i.. of a tile, its NB columns from nb * NB as 16-column tiles c (the avx2, avxvnni and neon paths) */
#define SUBTILES(R, X, WB) \
    for (int c = 0; c < NB; c += 16) tile##R((X) + (size_t)i * k, k, (WB), L, nb * NB + c, r + i, y + (size_t)i * n, n);

/* xw: [m, k] scratch of the codes as the GEMM takes them (XW_BYTES each: avx512 and avx2 int16, neon int8, xq - 128) */
__attribute__((noinline)) static void gemm(const uint8_t *xq, const float *r, int m, const EncLin *L, float *y, void *xw) {
    const int k = L->k, n = L->n;
#if defined(ENC_VNNI)
    (void)xw;
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
#elif defined(ENC_AVX512) || defined(ENC_AVX2)
    if (!g_scalar) {
        int16_t *x16 = (int16_t *)xw;
        const __m256i zp = _mm256_set1_epi16(128);
        size_t j = 0, all = (size_t)m * k;
        for (; j + 16 <= all; j += 16)
            _mm256_storeu_si256((__m256i *)(x16 + j), _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(xq + j))), zp));
        for (; j < all; j++) x16[j] = (int16_t)(xq[j] - 128);
        /* NB columns at a time (their int16 weights, 48-192 KB, stay in L2), a row tile's four 16-column tiles in
           turn (its rows, 6 x 2 k bytes, stay in L1): x16, twice xq's bytes, is read n / NB times, not n / 16 */
        const int16_t *w16 = (const int16_t *)L->w; /* pack_weight16's layout on this path */
        for (int nb = 0; nb < n / NB; nb++) {
            int i = 0;
#if defined(ENC_AVX512) /* a tile is the block's 64 columns */
            const int16_t *wb = w16 + (size_t)nb * NB * k;
            for (; i + 6 <= m; i += 6) tile6(x16 + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n);
            for (; i + 3 <= m; i += 3) tile3(x16 + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n);
            for (; i < m; i++) tile1(x16 + (size_t)i * k, k, wb, L, nb * NB, r + i, y + (size_t)i * n, n);
#else
            for (; i + 6 <= m; i += 6) SUBTILES(6, x16, w16 + (size_t)(nb * NB + c) * k)
            for (; i + 3 <= m; i += 3) SUBTILES(3, x16, w16 + (size_t)(nb * NB + c) * k)
            for (; i < m; i++) SUBTILES(1, x16, w16 + (size_t)(nb * NB + c) * k)
#endif
        }
        return;
    }
#elif defined(ENC_AVXVNNI)
    (void)xw;
    if (!g_scalar) { /* as avx2's loop order, on the uint8 codes and the vnni layout (neon's offsets) */
        for (int nb = 0; nb < n / NB; nb++) {
            int i = 0;
            for (; i + 6 <= m; i += 6) SUBTILES(6, xq, L->w + (size_t)nb * NB * k + 4 * c)
            for (; i + 3 <= m; i += 3) SUBTILES(3, xq, L->w + (size_t)nb * NB * k + 4 * c)
            for (; i < m; i++) SUBTILES(1, xq, L->w + (size_t)nb * NB * k + 4 * c)
        }
        return;
    }
#elif defined(ENC_NEON)
    if (!g_scalar) {
        int8_t *xs = (int8_t *)xw;
        size_t j = 0, all = (size_t)m * k;
        for (; j + 16 <= all; j += 16) vst1q_s8(xs + j, vreinterpretq_s8_u8(veorq_u8(vld1q_u8(xq + j), vdupq_n_u8(0x80))));
        for (; j < all; j++) xs[j] = (int8_t)(xq[j] - 128);
        for (int nb = 0; nb < n / NB; nb++) { /* as avx2's; the packed block's 16 columns c are 4 c bytes in */
            int i = 0;
            for (; i + 6 <= m; i += 6) SUBTILES(6, xs, L->w + (size_t)nb * NB * k + 4 * c)
            for (; i + 3 <= m; i += 3) SUBTILES(3, xs, L->w + (size_t)nb * NB * k + 4 * c)
            for (; i < m; i++) SUBTILES(1, xs, L->w + (size_t)nb * NB * k + 4 * c)
        }
        return;
    }
#else
    (void)xw;
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
#if defined(ENC_VEC)
        if (!g_scalar && h % VL == 0) {
            vf s = v_zero();
            for (j = 0; j < h; j += VL) {
                vf v = v_ld(x + j);
                if (y) v = v_add(v, v_ld(y + j));
                v_st(x + j, v);
                s = v_add(s, v);
            }
            float mean = v_hsum(s) / (float)h;
            vf vm = v_set(mean), q = v_zero();
            for (j = 0; j < h; j += VL) {
                vf d = v_sub(v_ld(x + j), vm);
                q = v_fma(d, d, q);
            }
            float inv = 1.0f / sqrtf(v_hsum(q) / (float)h + eps);
            vf vi = v_set(inv);
            for (j = 0; j < h; j += VL) {
                vf d = v_mul(v_sub(v_ld(x + j), vm), vi);
                v_st(x + j, v_fma(d, v_ld(w + j), v_ld(bias + j)));
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

#if defined(ENC_VEC)
/* QR query rows of one head (head_dim 32) against all keys: scores, softmax, weighted values. Rows past
   `rows` compute the first row's numbers again and are not stored. Scores go QR rows x 2 VL keys a step
   (2 QR accumulators: 16 of 32 zmm, 8 of 16 ymm), the weighted values QR rows x 2 VL dimensions (one pass
   on zmm, two on ymm), named registers as in the GEMM tiles. A score and a weighted value are the same
   chain of FMAs on either ISA. */
#define QK_ZERO(i) vf s##i##0 = v_zero(), s##i##1 = s##i##0;
#define QK_FMA(i)                                                                    \
    {                                                                                \
        vf qb = v_set(qr[i][d]);                                                     \
        s##i##0 = v_fma(qb, k0, s##i##0);                                            \
        s##i##1 = v_fma(qb, k1, s##i##1);                                            \
    }
#define QK_STORE(i)                                                                  \
    v_st(p + (size_t)(i) * lp + jb, v_mul(s##i##0, vs));                             \
    v_st(p + (size_t)(i) * lp + jb + VL, v_mul(s##i##1, vs));
#define PV_ZERO(i) vf a##i##0 = v_zero(), a##i##1 = a##i##0;
#define PV_FMA(i)                                                                    \
    {                                                                                \
        vf pj = v_set(p[(size_t)(i) * lp + j]);                                      \
        a##i##0 = v_fma(pj, v0, a##i##0);                                            \
        a##i##1 = v_fma(pj, v1, a##i##1);                                            \
    }
#define PV_STORE(i)                                                                  \
    if (rows > (i)) {                                                                \
        vf vi = v_set(inv[i]);                                                       \
        float *o = out + (size_t)(i) * ldo + dc;                                     \
        v_st(o, v_mul(a##i##0, vi));                                                 \
        v_st(o + VL, v_mul(a##i##1, vi));                                            \
    }

/* kt: [32][lp] keys transposed, zero past len; lp a multiple of 32 (LPAD) */
__attribute__((noinline)) static void attn_rows(const float *q, int ld, int rows, const float *kt, const float *vh, int len, int lp, float scale,
                                                float *p, float *out, int ldo) {
    const float *qr[QR];
    for (int i = 0; i < QR; i++) qr[i] = q + (size_t)(i < rows ? i : 0) * ld;
    const vf vs = v_set(scale);
    for (int jb = 0; jb < lp; jb += 2 * VL) {
        AROWS(QK_ZERO)
        for (int d = 0; d < 32; d++) {
            vf k0 = v_ld(kt + (size_t)d * lp + jb), k1 = v_ld(kt + (size_t)d * lp + jb + VL);
            AROWS(QK_FMA)
        }
        AROWS(QK_STORE)
    }
    float inv[QR];
    const int tail = len % VL;
    for (int r = 0; r < rows; r++) {
        float *pr = p + (size_t)r * lp;
        vf mx = v_set(-INFINITY), sum = v_zero();
        int jb;
        for (jb = 0; jb + VL <= len; jb += VL) mx = v_max(mx, v_ld(pr + jb));
        if (tail) mx = v_max(mx, v_ld_fill(pr + jb, tail, -INFINITY));
        vf vm = v_set(v_hmax(mx));
        for (jb = 0; jb + VL <= len; jb += VL) {
            vf e = v_exp(v_sub(v_ld(pr + jb), vm));
            v_st(pr + jb, e);
            sum = v_add(sum, e);
        }
        if (tail) {
            vf e = v_head(v_exp(v_sub(v_ld(pr + jb), vm)), tail);
            v_st(pr + jb, e);
            sum = v_add(sum, e);
        }
        inv[r] = 1.0f / v_hsum(sum);
    }
    for (int dc = 0; dc < 32; dc += 2 * VL) {
        AROWS(PV_ZERO)
        for (int j = 0; j < len; j++) {
            vf v0 = v_ld(vh + (size_t)j * ld + dc), v1 = v_ld(vh + (size_t)j * ld + dc + VL);
            AROWS(PV_FMA)
        }
        AROWS(PV_STORE)
    }
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
#if defined(ENC_VEC)
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

#if defined(ENC_AVX2) || defined(ENC_AVX512)
#define XW_BYTES 2 /* the GEMM's codes: int16 */
#elif defined(ENC_NEON)
#define XW_BYTES 1 /* int8 */
#else
#define XW_BYTES 0
#endif

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
    return floats * sizeof(float) + t * f /* xq */ + t * f * XW_BYTES + 256;
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
    char *xw = (char *)(p + QR * (size_t)lp);
    uint8_t *xq = (uint8_t *)(xw + (size_t)tokens * f * XW_BYTES);

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
        gemm(xq, r, tokens, &L->qkv, qkv, xw);
        PROF(1);
        for (int i = 0, row = 0; i < n; row += lens[i], i++)
            attention(qkv + (size_t)row * 3 * h, lens[i], m->head_dim, m->n_heads, scale, att + (size_t)row * h, kt, p);
        PROF(2);
        quant_rows(att, tokens, h, NULL, 0, m->qscale, m->qeps, xq, r, tmp);
        PROF(0);
        gemm(xq, r, tokens, &L->o, att, xw);
        PROF(5);
        add_ln(x, att, tokens, h, L->ln1_w, L->ln1_b, m->ln_eps);
        PROF(3);
        quant_rows(x, tokens, h, L->up.smooth, 0, m->qscale, m->qeps, xq, r, tmp);
        PROF(0);
        gemm(xq, r, tokens, &L->up, ffn, xw);
        PROF(6);
        quant_rows(ffn, tokens, f, NULL, 1, m->qscale, m->qeps, xq, r, tmp); /* GELU, then the down input's quantisation */
        PROF(4);
        gemm(xq, r, tokens, &L->down, att, xw);
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
