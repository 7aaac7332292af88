"""CUDA C sources of the CUDA backend's kernels (compiled with NVRTC by edge.runtime.cuda.kernels).

Plain CUDA C++ for sm_80 and newer (Ampere, Orin's sm_87, Hopper): half2 arithmetic, 16-byte
loads, warp shuffles. No Hopper-only instruction (wgmma, TMA) on this path.

Layouts (row-major, HF orientation: a linear weight is W [N, K], y = x @ W.T):
  int4  qweight uint32 [N, K/8] *repacked on load* (see repack_int4) + scales half [N, K/g]
  int8  qweight int8   [N, K]   + scales half [N]
  fp16  weight  half   [N, K]
  activations half [M, K]; residual stream float [M, H]
  KV cache half [num_slots, Hkv, D], slot = block * block_size + offset
"""

SOURCE = r"""
#include <cuda_fp16.h>

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
typedef unsigned int u32;
typedef unsigned char u8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction (sum or max) through `red` (>= 32 floats of shared memory).
__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = (lane < nw) ? red[lane] : (is_max ? -INFINITY : 0.f);
    r = is_max ? warp_max(r) : warp_sum(r);
    return r;
}

__device__ __forceinline__ half2 u32_as_h2(u32 v) { return *reinterpret_cast<half2*>(&v); }

// ---------------------------------------------------------------------------------------
// Weight dequantization to half2 (exact): the "magic number" trick. A nibble n OR'ed into
// the mantissa of 1024.0 (0x6400) gives the half 1024 + n; subtracting 1032 gives n - 8.
// Repacked int4 word: elements (e0,e1) at bits (0,16), (e2,e3) at (4,20), (e4,e5) at (8,24),
// (e6,e7) at (12,28), so each mask-and-or yields two consecutive elements as one half2.
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void deq_int4_word(u32 q, half2* w) {
    const u32 MAGIC = 0x64006400u;
    const half2 B = u32_as_h2(0x64086408u);  // 1032
    w[0] = __hsub2(u32_as_h2((q & 0x000F000Fu) | MAGIC), B);
    w[1] = __hsub2(u32_as_h2(((q >> 4) & 0x000F000Fu) | MAGIC), B);
    w[2] = __hsub2(u32_as_h2(((q >> 8) & 0x000F000Fu) | MAGIC), B);
    w[3] = __hsub2(u32_as_h2(((q >> 12) & 0x000F000Fu) | MAGIC), B);
}

// int8 word (4 signed bytes b0..b3) -> (b0,b1), (b2,b3) as half2: bias to unsigned, put each
// byte under 0x64 (1024 + u), subtract 1152.
__device__ __forceinline__ void deq_int8_word(u32 q, half2* w) {
    const half2 B = u32_as_h2(0x64806480u);  // 1152
    q ^= 0x80808080u;
    w[0] = __hsub2(u32_as_h2(__byte_perm(q, 0x64646464u, 0x4140)), B);
    w[1] = __hsub2(u32_as_h2(__byte_perm(q, 0x64646464u, 0x4342)), B);
}

__device__ __forceinline__ float h2sum(half2 a) {
    float2 f = __half22float2(a);
    return f.x + f.y;
}

// Repack one int4 word from the bundle layout (element i at bits 4i) to the GPU layout above.
extern "C" __global__ void repack_int4(const u32* __restrict__ src, u32* __restrict__ dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 w = src[i], o = 0;
    const int pos[8] = {0, 16, 4, 20, 8, 24, 12, 28};
#pragma unroll
    for (int e = 0; e < 8; ++e) o |= ((w >> (4 * e)) & 0xFu) << pos[e];
    dst[i] = o;
}

// Dequantize to a half [N, K] matrix (prefill path: dequant then cuBLAS).
extern "C" __global__ void dequant_int4(const u32* __restrict__ W, const half* __restrict__ S,
                                        half* __restrict__ out, int N, int K, int gshift) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // word index
    long long words = (long long)N * (K >> 3);
    if (i >= words) return;
    int n = (int)(i / (K >> 3));
    int k0 = (int)(i % (K >> 3)) << 3;
    half2 s = __half2half2(S[(long long)n * (K >> gshift) + (k0 >> gshift)]);
    half2 w[4];
    deq_int4_word(W[i], w);
    uint4 o;
    u32* op = reinterpret_cast<u32*>(&o);
#pragma unroll
    for (int j = 0; j < 4; ++j) { half2 v = __hmul2(w[j], s); op[j] = *reinterpret_cast<u32*>(&v); }
    *reinterpret_cast<uint4*>(out + (long long)n * K + k0) = o;
}

extern "C" __global__ void dequant_int8(const u32* __restrict__ W, const half* __restrict__ S,
                                        half* __restrict__ out, int N, int K) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // word index (4 values)
    long long words = (long long)N * (K >> 2);
    if (i >= words) return;
    int n = (int)(i / (K >> 2));
    half2 s = __half2half2(S[n]);
    half2 w[2];
    deq_int8_word(W[i], w);
    uint2 o;
    half2 a = __hmul2(w[0], s), b = __hmul2(w[1], s);
    o.x = *reinterpret_cast<u32*>(&a);
    o.y = *reinterpret_cast<u32*>(&b);
    *reinterpret_cast<uint2*>(out + i * 4) = o;
}

// ---------------------------------------------------------------------------------------
// GEMV / small-batch GEMM with the dequantization fused: Y[m, n] = sum_k X[m, k] W[n, k].
// One warp per output row n; lanes stride over 16-byte weight chunks (coalesced 512 B per
// warp step); MT rows of X per launch-y (weights read once per MT rows). Products are summed
// in half2 within a chunk (<= 16 terms), then in float across chunks and lanes.
// Y is half [M, ldy] or float when out_f32 (logits); bias (half [N]) may be null.
// ---------------------------------------------------------------------------------------
#define GEMV_EPILOGUE                                                                        \
    _Pragma("unroll") for (int m = 0; m < MT; ++m) {                                         \
        float v = warp_sum(acc[m]);                                                          \
        int mm = m0 + m;                                                                     \
        if (lane == 0 && mm < M) {                                                           \
            v *= post_scale;                                                                 \
            if (bias) v += __half2float(bias[n]);                                            \
            if (out_f32) reinterpret_cast<float*>(Y)[(long long)mm * ldy + n] = v;           \
            else reinterpret_cast<half*>(Y)[(long long)mm * ldy + n] = __float2half(v);      \
        }                                                                                    \
    }

// Weights stream through once: load them without allocating in L1 so that X (read by every
// warp) stays resident there instead of being evicted to L2 by gigabytes of weights.
// Not `volatile`: the compiler must stay free to hoist the unrolled iterations' loads so that
// several 16-byte loads per thread are in flight.
__device__ __forceinline__ uint4 ldg_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// R output rows per warp: each X chunk loaded from L1 serves R rows (R x less X traffic, which
// dominates at MT = 8, 16). Rows past N are clamped for loading and never written.
#define GEMV_EPILOGUE_R                                                                      \
    _Pragma("unroll") for (int r = 0; r < R; ++r) {                                          \
        _Pragma("unroll") for (int m = 0; m < MT; ++m) {                                     \
            float v = warp_sum(acc[r][m]);                                                   \
            const int mm = m0 + m, n = n0 + r;                                               \
            if (lane == 0 && mm < M && n < N) {                                              \
                v *= post[r];                                                                \
                if (bias) v += __half2float(bias[n]);                                        \
                if (out_f32) reinterpret_cast<float*>(Y)[(long long)mm * ldy + n] = v;       \
                else reinterpret_cast<half*>(Y)[(long long)mm * ldy + n] = __float2half(v);  \
            }                                                                                \
        }                                                                                    \
    }

template <int MT, int R>
__device__ __forceinline__ void gemv_int4(const uint4* __restrict__ W, const half* __restrict__ S,
                                          const half* __restrict__ X, const half* __restrict__ bias,
                                          void* __restrict__ Y, int M, int N, int K, int gshift,
                                          int ldy, int out_f32) {
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    const int m0 = blockIdx.y * MT;
    if (n0 >= N) return;
    const int chunks = K >> 5;  // 32 elements per 16-byte chunk
    const int groups = K >> gshift;
    float acc[R][MT], post[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        post[r] = 1.f;
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
    }
#pragma unroll (MT * R <= 1 ? 4 : (MT * R <= 4 ? 2 : 1))
    for (int c = lane; c < chunks; c += 32) {
        half2 w[R][16];
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const long long nr = min(n0 + r, N - 1);
            uint4 q = ldg_stream(W + nr * chunks + c);
            s[r] = __half2float(S[nr * groups + ((c << 5) >> gshift)]);
            deq_int4_word(q.x, w[r]);
            deq_int4_word(q.y, w[r] + 4);
            deq_int4_word(q.z, w[r] + 8);
            deq_int4_word(q.w, w[r] + 12);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m0 + m < M) {
                const uint4* xp = reinterpret_cast<const uint4*>(X + (long long)(m0 + m) * K + (c << 5));
                uint4 xv[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) xv[j] = __ldg(xp + j);
                const half2* xh = reinterpret_cast<const half2*>(xv);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    half2 a0 = __float2half2_rn(0.f), a1 = a0;
#pragma unroll
                    for (int j = 0; j < 16; j += 2) {
                        a0 = __hfma2(w[r][j], xh[j], a0);
                        a1 = __hfma2(w[r][j + 1], xh[j + 1], a1);
                    }
                    acc[r][m] += (h2sum(a0) + h2sum(a1)) * s[r];
                }
            }
        }
    }
    GEMV_EPILOGUE_R
}

template <int MT, int R>
__device__ __forceinline__ void gemv_int8(const uint4* __restrict__ W, const half* __restrict__ S,
                                          const half* __restrict__ X, const half* __restrict__ bias,
                                          void* __restrict__ Y, int M, int N, int K, int ldy, int out_f32) {
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    const int m0 = blockIdx.y * MT;
    if (n0 >= N) return;
    const int chunks = K >> 4;  // 16 elements per 16-byte chunk
    float acc[R][MT], post[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        post[r] = __half2float(S[min(n0 + r, N - 1)]);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
    }
#pragma unroll (MT * R <= 4 ? 4 : (MT * R <= 16 ? 2 : 1))
    for (int c = lane; c < chunks; c += 32) {
        half2 w[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const long long nr = min(n0 + r, N - 1);
            uint4 q = ldg_stream(W + nr * chunks + c);
            deq_int8_word(q.x, w[r]);
            deq_int8_word(q.y, w[r] + 2);
            deq_int8_word(q.z, w[r] + 4);
            deq_int8_word(q.w, w[r] + 6);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m0 + m < M) {
                const uint4* xp = reinterpret_cast<const uint4*>(X + (long long)(m0 + m) * K + (c << 4));
                uint4 xv[2];
                xv[0] = __ldg(xp);
                xv[1] = __ldg(xp + 1);
                const half2* xh = reinterpret_cast<const half2*>(xv);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    half2 a0 = __float2half2_rn(0.f), a1 = a0;
#pragma unroll
                    for (int j = 0; j < 8; j += 2) {
                        a0 = __hfma2(w[r][j], xh[j], a0);
                        a1 = __hfma2(w[r][j + 1], xh[j + 1], a1);
                    }
                    acc[r][m] += h2sum(a0) + h2sum(a1);
                }
            }
        }
    }
    GEMV_EPILOGUE_R
}

template <int MT>
__device__ __forceinline__ void gemv_fp16(const uint4* __restrict__ W, const half* __restrict__ X,
                                          const half* __restrict__ bias, void* __restrict__ Y,
                                          int M, int N, int K, int ldy, int out_f32) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int m0 = blockIdx.y * MT;
    if (n >= N) return;
    const int chunks = K >> 3;  // 8 elements per 16-byte chunk
    const uint4* wrow = W + (long long)n * chunks;
    const float post_scale = 1.f;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
#pragma unroll (MT <= 4 ? 4 : 2)
    for (int c = lane; c < chunks; c += 32) {
        uint4 q = ldg_stream(wrow + c);
        const half2* w = reinterpret_cast<const half2*>(&q);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m0 + m < M) {
                uint4 xv = __ldg(reinterpret_cast<const uint4*>(X + (long long)(m0 + m) * K + (c << 3)));
                const half2* xh = reinterpret_cast<const half2*>(&xv);
                float2 p0 = __half22float2(__hmul2(w[0], xh[0]));
                float2 p1 = __half22float2(__hmul2(w[1], xh[1]));
                float2 p2 = __half22float2(__hmul2(w[2], xh[2]));
                float2 p3 = __half22float2(__hmul2(w[3], xh[3]));
                acc[m] += (p0.x + p0.y) + (p1.x + p1.y) + (p2.x + p2.y) + (p3.x + p3.y);
            }
        }
    }
    GEMV_EPILOGUE
}

#define GEMV_INSTANCES(MT, R)                                                                   \
    extern "C" __global__ void gemv_int4_m##MT(const uint4* W, const half* S, const half* X,     \
        const half* bias, void* Y, int M, int N, int K, int gshift, int ldy, int out_f32) {     \
        gemv_int4<MT, R>(W, S, X, bias, Y, M, N, K, gshift, ldy, out_f32); }                    \
    extern "C" __global__ void gemv_int8_m##MT(const uint4* W, const half* S, const half* X,     \
        const half* bias, void* Y, int M, int N, int K, int ldy, int out_f32) {                 \
        gemv_int8<MT, R>(W, S, X, bias, Y, M, N, K, ldy, out_f32); }                            \
    extern "C" __global__ void gemv_fp16_m##MT(const uint4* W, const half* X, const half* bias, \
        void* Y, int M, int N, int K, int ldy, int out_f32) {                                   \
        gemv_fp16<MT>(W, X, bias, Y, M, N, K, ldy, out_f32); }

// M = 1 variants with more rows per warp (longer-lived warps, more loads in flight).
extern "C" __global__ void gemv_int4_m1_r2(const uint4* W, const half* S, const half* X, const half* bias,
    void* Y, int M, int N, int K, int gshift, int ldy, int out_f32) {
    gemv_int4<1, 2>(W, S, X, bias, Y, M, N, K, gshift, ldy, out_f32); }
extern "C" __global__ void gemv_int4_m1_r4(const uint4* W, const half* S, const half* X, const half* bias,
    void* Y, int M, int N, int K, int gshift, int ldy, int out_f32) {
    gemv_int4<1, 4>(W, S, X, bias, Y, M, N, K, gshift, ldy, out_f32); }

// ---------------------------------------------------------------------------------------
// Block-K int4 GEMV for M = 1 ("bk"): one block of NT threads computes R consecutive output
// rows, its threads splitting K (thread t takes 16-byte chunks t, t + NT, ...), so every
// thread issues its R weight loads at once and a row needs ~K / (32 NT) rounds instead of
// K / 1024 per warp. Partial sums meet in shared memory. The block's R results then go
// through one of four epilogues, which fuse the small kernels that follow a linear:
//   _st    y[n] = half/float(v + bias)                                    (plain)
//   _glu   rows interleaved (2j = gate_j, 2j+1 = up_j): act[j] = silu(g) * u   (SiLU.mul)
//   _res   res[n] += half(v) (float residual); the last block to finish normalises the
//          whole row: h = half(res * rsqrt(mean(res^2) + eps) * w)            (add + RMSNorm)
//   _rope  q/k rows paired per head (2i = x_i, 2i+1 = x_{i+D/2}): rotated q -> q_out,
//          rotated k and v -> the paged KV cache at slots[0]                   (RoPE + KV write)
// Roundings mirror the unfused kernels (each linear's output is rounded to half first).
// ---------------------------------------------------------------------------------------
template <int R, int NT, int U>
__device__ __forceinline__ void gemv_int4_bk_core(const uint4* __restrict__ W, const half* __restrict__ S,
                                                  const half* __restrict__ X, int N, int K, int gshift,
                                                  int n0, float* __restrict__ yout) {
    __shared__ float red[R][NT / 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int chunks = K >> 5, groups = K >> gshift;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll U
    for (int c = tid; c < chunks; c += NT) {
        uint4 q[R];
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const long long nr = min(n0 + r, N - 1);
            q[r] = ldg_stream(W + nr * chunks + c);
            s[r] = __half2float(S[nr * groups + ((c << 5) >> gshift)]);
        }
        const uint4* xp = reinterpret_cast<const uint4*>(X + (c << 5));
        uint4 xv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[j] = __ldg(xp + j);
        const half2* xh = reinterpret_cast<const half2*>(xv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            half2 w[16];
            deq_int4_word(q[r].x, w);
            deq_int4_word(q[r].y, w + 4);
            deq_int4_word(q[r].z, w + 8);
            deq_int4_word(q[r].w, w + 12);
            half2 a0 = __float2half2_rn(0.f), a1 = a0;
#pragma unroll
            for (int j = 0; j < 16; j += 2) {
                a0 = __hfma2(w[j], xh[j], a0);
                a1 = __hfma2(w[j + 1], xh[j + 1], a1);
            }
            acc[r] += (h2sum(a0) + h2sum(a1)) * s[r];
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0) red[r][warp] = v;
    }
    __syncthreads();
    if (tid < R) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < NT / 32; ++w) v += red[tid][w];
        yout[tid] = v;
    }
    __syncthreads();
}

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half(v)); }

template <int R, int NT, int U>
__device__ __forceinline__ void gemv_int4_bk_st(const uint4* W, const half* S, const half* X, const half* bias,
                                                void* Y, int N, int K, int gshift, int out_f32) {
    __shared__ float yo[R];
    const int n0 = blockIdx.x * R;
    gemv_int4_bk_core<R, NT, U>(W, S, X, N, K, gshift, n0, yo);
    const int t = threadIdx.x, n = n0 + t;
    if (t < R && n < N) {
        float v = yo[t] + (bias ? __half2float(bias[n]) : 0.f);
        if (out_f32) reinterpret_cast<float*>(Y)[n] = v;
        else reinterpret_cast<half*>(Y)[n] = __float2half(v);
    }
}

template <int R, int NT, int U>
__device__ __forceinline__ void gemv_int4_bk_glu(const uint4* W, const half* S, const half* X, const half* bias,
                                                 half* act, int N, int K, int gshift) {
    __shared__ float yo[R];
    const int n0 = blockIdx.x * R;
    gemv_int4_bk_core<R, NT, U>(W, S, X, N, K, gshift, n0, yo);
    const int t = threadIdx.x, n = n0 + 2 * t;
    if (t < R / 2 && n + 1 < N) {
        const float g = round_half(yo[2 * t] + (bias ? __half2float(bias[n]) : 0.f));
        const float u = round_half(yo[2 * t + 1] + (bias ? __half2float(bias[n + 1]) : 0.f));
        act[n >> 1] = __float2half(g / (1.f + __expf(-g)) * u);
    }
}

template <int R, int NT, int U>
__device__ __forceinline__ void gemv_int4_bk_res(const uint4* W, const half* S, const half* X, const half* bias,
                                                 float* res, const half* __restrict__ nw, half* hout,
                                                 unsigned* counter, int N, int K, int gshift, float eps) {
    __shared__ float yo[R];
    __shared__ float red[32];
    __shared__ bool last;
    const int n0 = blockIdx.x * R;
    gemv_int4_bk_core<R, NT, U>(W, S, X, N, K, gshift, n0, yo);
    const int t = threadIdx.x, n = n0 + t;
    if (t < R && n < N) {
        res[n] += round_half(yo[t] + (bias ? __half2float(bias[n]) : 0.f));
        __threadfence();  // this block's residual update is visible before its ticket is taken
    }
    // the last block to finish sees every block's update (threadFenceReduction pattern)
    __syncthreads();
    if (t == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The row goes through registers in batches of MAXV float4s per thread, each batch's loads
    // issued together (a strided loop of dependent L2 loads made this tail ~9-25 us); a row
    // that fits one batch (H <= 4 * MAXV * NT) is read once.
    constexpr int MAXV = 8;
    const int n4 = N >> 2;
    const float4* r4 = reinterpret_cast<const float4*>(res);
    float4 rv[MAXV];
    float ss = 0.f;
    for (int base = 0; base < n4; base += NT * MAXV) {
#pragma unroll
        for (int j = 0; j < MAXV; ++j) {
            const int i = base + t + j * NT;
            rv[j] = i < n4 ? __ldcg(r4 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int j = 0; j < MAXV; ++j) ss += rv[j].x * rv[j].x + rv[j].y * rv[j].y + rv[j].z * rv[j].z + rv[j].w * rv[j].w;
    }
    ss = block_reduce(ss, red, false);
    const float inv = rsqrtf(ss / N + eps);
    for (int base = 0; base < n4; base += NT * MAXV) {
        if (n4 > NT * MAXV) {  // several batches: reload this one (only the last is in registers)
#pragma unroll
            for (int j = 0; j < MAXV; ++j) {
                const int i = base + t + j * NT;
                rv[j] = i < n4 ? __ldcg(r4 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
#pragma unroll
        for (int j = 0; j < MAXV; ++j) {
            const int i = base + t + j * NT;
            if (i < n4) {
                const uint2 wv = reinterpret_cast<const uint2*>(nw)[i];
                const float2 w01 = __half22float2(u32_as_h2(wv.x)), w23 = __half22float2(u32_as_h2(wv.y));
                const half2 o01 = __floats2half2_rn(rv[j].x * inv * w01.x, rv[j].y * inv * w01.y);
                const half2 o23 = __floats2half2_rn(rv[j].z * inv * w23.x, rv[j].w * inv * w23.y);
                uint2 ov;
                ov.x = *reinterpret_cast<const u32*>(&o01);
                ov.y = *reinterpret_cast<const u32*>(&o23);
                reinterpret_cast<uint2*>(hout)[i] = ov;
            }
        }
    }
    if (t == 0) *counter = 0u;  // ready for the next fused launch on this stream
}

template <int R, int NT, int U>
__device__ __forceinline__ void gemv_int4_bk_rope(const uint4* W, const half* S, const half* X, const half* bias,
                                                  const int* __restrict__ pos, const int* __restrict__ slots,
                                                  const float* __restrict__ cosb, const float* __restrict__ sinb,
                                                  half* q_out, half* kc, half* vc, int N, int K, int gshift,
                                                  int Hq, int Hkv, int D) {
    __shared__ float yo[R];
    const int n0 = blockIdx.x * R;
    gemv_int4_bk_core<R, NT, U>(W, S, X, N, K, gshift, n0, yo);
    const int t = threadIdx.x, n = n0 + 2 * t;
    if (t >= R / 2 || n + 1 >= N) return;
    const float x1 = round_half(yo[2 * t] + (bias ? __half2float(bias[n]) : 0.f));
    const float x2 = round_half(yo[2 * t + 1] + (bias ? __half2float(bias[n + 1]) : 0.f));
    const int h = n / D, half_d = D >> 1, i = (n % D) >> 1;
    const int slot = slots[0];
    if (h < Hq + Hkv) {
        const int p = pos[0];
        const float c = cosb[(long long)p * half_d + i], s = sinb[(long long)p * half_d + i];
        const half o1 = __float2half(x1 * c - x2 * s), o2 = __float2half(x2 * c + x1 * s);
        if (h < Hq) {
            q_out[h * D + i] = o1;
            q_out[h * D + i + half_d] = o2;
        } else if (slot >= 0) {
            half* dst = kc + ((long long)slot * Hkv + (h - Hq)) * D;
            dst[i] = o1;
            dst[i + half_d] = o2;
        }
    } else if (slot >= 0) {  // v rows keep their order
        const int j = n - (Hq + Hkv) * D;
        vc[(long long)slot * Hkv * D + j] = __float2half(x1);
        vc[(long long)slot * Hkv * D + j + 1] = __float2half(x2);
    }
}

#define BK_INSTANCES(R, NT, U)                                                                          \
    extern "C" __global__ void __launch_bounds__(NT) gemv_int4_bk_r##R##_t##NT##_u##U##_st(                 \
        const uint4* W, const half* S, const half* X, const half* bias, void* Y, int N, int K,       \
        int gshift, int out_f32) {                                                                   \
        gemv_int4_bk_st<R, NT, U>(W, S, X, bias, Y, N, K, gshift, out_f32); }                           \
    extern "C" __global__ void __launch_bounds__(NT) gemv_int4_bk_r##R##_t##NT##_u##U##_glu(                \
        const uint4* W, const half* S, const half* X, const half* bias, half* act, int N, int K,     \
        int gshift) {                                                                                \
        gemv_int4_bk_glu<R, NT, U>(W, S, X, bias, act, N, K, gshift); }                                 \
    extern "C" __global__ void __launch_bounds__(NT) gemv_int4_bk_r##R##_t##NT##_u##U##_res(                \
        const uint4* W, const half* S, const half* X, const half* bias, float* res, const half* nw,  \
        half* hout, unsigned* counter, int N, int K, int gshift, float eps) {                        \
        gemv_int4_bk_res<R, NT, U>(W, S, X, bias, res, nw, hout, counter, N, K, gshift, eps); }         \
    extern "C" __global__ void __launch_bounds__(NT) gemv_int4_bk_r##R##_t##NT##_u##U##_rope(               \
        const uint4* W, const half* S, const half* X, const half* bias, const int* pos,              \
        const int* slots, const float* cosb, const float* sinb, half* q_out, half* kc, half* vc,     \
        int N, int K, int gshift, int Hq, int Hkv, int D) {                                          \
        gemv_int4_bk_rope<R, NT, U>(W, S, X, bias, pos, slots, cosb, sinb, q_out, kc, vc, N, K, gshift, \
                                 Hq, Hkv, D); }

// (R, NT, U): keep in step with kernels.BK_VARIANTS
BK_INSTANCES(2, 64, 2)
BK_INSTANCES(4, 64, 2)
BK_INSTANCES(2, 128, 2)
BK_INSTANCES(4, 128, 2)
BK_INSTANCES(8, 128, 1)
BK_INSTANCES(2, 256, 2)
BK_INSTANCES(4, 256, 2)
BK_INSTANCES(8, 256, 1)
BK_INSTANCES(2, 64, 4)
BK_INSTANCES(2, 128, 4)
BK_INSTANCES(4, 128, 4)

// (MT, rows per warp R): keep in step with kernels.GEMV_ROWS_PER_WARP
GEMV_INSTANCES(1, 1)
GEMV_INSTANCES(2, 1)
GEMV_INSTANCES(4, 2)
GEMV_INSTANCES(8, 4)
GEMV_INSTANCES(16, 4)

// ---------------------------------------------------------------------------------------
// Embedding gather into the float residual stream: res[m, :] = emb[ids[m], :].
// ---------------------------------------------------------------------------------------
extern "C" __global__ void embed(const int* __restrict__ ids, const half* __restrict__ emb,
                                 float* __restrict__ res, int H) {
    const int m = blockIdx.x;
    const half* row = emb + (long long)ids[m] * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) res[(long long)m * H + i] = __half2float(row[i]);
}

// Embedding gather fused with the first layer's RMSNorm: res[m] = emb[ids[m]] (float),
// out[m] = half(res[m] * rsqrt(mean(res[m]^2) + eps) * w). One block per row; the row is held
// in registers (H % 4 == 0 and H <= 32 blockDim), all loads issued at once.
extern "C" __global__ void embed_rmsnorm(const int* __restrict__ ids, const half* __restrict__ emb,
                                         const half* __restrict__ w, float* __restrict__ res,
                                         half* __restrict__ out, int H, float eps) {
    __shared__ float red[32];
    constexpr int MAXV = 8;
    const int m = blockIdx.x, t = threadIdx.x, n4 = H >> 2;
    const uint2* row = reinterpret_cast<const uint2*>(emb + (long long)ids[m] * H);
    float4 rv[MAXV];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
        const int i = t + j * blockDim.x;
        if (i < n4) {
            const uint2 e = row[i];
            const float2 a = __half22float2(u32_as_h2(e.x)), b = __half22float2(u32_as_h2(e.y));
            rv[j] = make_float4(a.x, a.y, b.x, b.y);
            reinterpret_cast<float4*>(res + (long long)m * H)[i] = rv[j];
        } else {
            rv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        ss += rv[j].x * rv[j].x + rv[j].y * rv[j].y + rv[j].z * rv[j].z + rv[j].w * rv[j].w;
    }
    ss = block_reduce(ss, red, false);
    const float inv = rsqrtf(ss / H + eps);
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
        const int i = t + j * blockDim.x;
        if (i < n4) {
            const uint2 wv = reinterpret_cast<const uint2*>(w)[i];
            const float2 w01 = __half22float2(u32_as_h2(wv.x)), w23 = __half22float2(u32_as_h2(wv.y));
            const half2 o01 = __floats2half2_rn(rv[j].x * inv * w01.x, rv[j].y * inv * w01.y);
            const half2 o23 = __floats2half2_rn(rv[j].z * inv * w23.x, rv[j].w * inv * w23.y);
            uint2 ov;
            ov.x = *reinterpret_cast<const u32*>(&o01);
            ov.y = *reinterpret_cast<const u32*>(&o23);
            reinterpret_cast<uint2*>(out + (long long)m * H)[i] = ov;
        }
    }
}

// Residual add fused with RMSNorm: res[m] += x[m] (x may be null); out[m] = half(res[m] *
// rsqrt(mean(res[m]^2) + eps) * w). One block per row.
extern "C" __global__ void add_rmsnorm(float* __restrict__ res, const half* __restrict__ x,
                                       const half* __restrict__ w, half* __restrict__ out, int H, float eps) {
    __shared__ float red[32];
    const int m = blockIdx.x;
    float* r = res + (long long)m * H;
    float ss = 0.f;
    constexpr int MAXV = 4;
    const int n4 = H >> 2, t = threadIdx.x;
    if ((H & 3) == 0 && n4 <= MAXV * (int)blockDim.x) {  // the row in registers: one round trip
        float4 rv[MAXV];
#pragma unroll
        for (int j = 0; j < MAXV; ++j) {
            const int i = t + j * blockDim.x;
            if (i < n4) {
                rv[j] = reinterpret_cast<const float4*>(r)[i];
                if (x) {
                    const uint2 xv = reinterpret_cast<const uint2*>(x + (long long)m * H)[i];
                    const float2 a = __half22float2(u32_as_h2(xv.x)), b = __half22float2(u32_as_h2(xv.y));
                    rv[j].x += a.x; rv[j].y += a.y; rv[j].z += b.x; rv[j].w += b.y;
                    reinterpret_cast<float4*>(r)[i] = rv[j];
                }
            } else {
                rv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
            ss += rv[j].x * rv[j].x + rv[j].y * rv[j].y + rv[j].z * rv[j].z + rv[j].w * rv[j].w;
        }
        ss = block_reduce(ss, red, false);
        const float inv = rsqrtf(ss / H + eps);
#pragma unroll
        for (int j = 0; j < MAXV; ++j) {
            const int i = t + j * blockDim.x;
            if (i < n4) {
                const uint2 wv = reinterpret_cast<const uint2*>(w)[i];
                const float2 w01 = __half22float2(u32_as_h2(wv.x)), w23 = __half22float2(u32_as_h2(wv.y));
                const half2 o01 = __floats2half2_rn(rv[j].x * inv * w01.x, rv[j].y * inv * w01.y);
                const half2 o23 = __floats2half2_rn(rv[j].z * inv * w23.x, rv[j].w * inv * w23.y);
                uint2 ov;
                ov.x = *reinterpret_cast<const u32*>(&o01);
                ov.y = *reinterpret_cast<const u32*>(&o23);
                reinterpret_cast<uint2*>(out + (long long)m * H)[i] = ov;
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = r[i];
        if (x) { v += __half2float(x[(long long)m * H + i]); r[i] = v; }
        ss += v * v;
    }
    ss = block_reduce(ss, red, false);
    const float inv = rsqrtf(ss / H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        out[(long long)m * H + i] = __float2half(r[i] * inv * __half2float(w[i]));
}

// RoPE (HF rotate_half convention: pairs (i, i + D/2)) on q and k of the fused qkv rows, whose
// q/k rows the session stores paired per head (row 2i = x_i, row 2i + 1 = x_{i+D/2}, see
// CudaDecoderSession._load_weights); q is written to q_out in HF order,
// q_out [M, Hq*D]; rotated k and v written into the paged cache at slots[m]
// (slot < 0: a padding row, nothing cached). cos/sin: float [max_pos, D/2].
extern "C" __global__ void rope_cache(const half* __restrict__ qkv, const int* __restrict__ pos,
                                      const int* __restrict__ slots, const float* __restrict__ cosb,
                                      const float* __restrict__ sinb, half* __restrict__ q_out,
                                      half* __restrict__ kc, half* __restrict__ vc,
                                      int Hq, int Hkv, int D) {
    const int m = blockIdx.x;
    const int half_d = D >> 1;
    const int width = (Hq + 2 * Hkv) * D;
    const half* row = qkv + (long long)m * width;
    const int p = pos[m];
    const int slot = slots[m];
    const int pairs = (Hq + Hkv) * half_d;
    // gridDim.y blocks share one token's work: one item per thread, not a serial loop of
    // dependent global loads in a single block (decode has only M = batch tokens)
    for (int t = blockIdx.y * blockDim.x + threadIdx.x; t < pairs + Hkv * D; t += blockDim.x * gridDim.y) {
        if (t < pairs) {
            const int h = t / half_d, i = t % half_d;
            const half* src = row + h * D;  // paired rows: 2i = x_i, 2i + 1 = x_{i + D/2}
            float x1 = __half2float(src[2 * i]), x2 = __half2float(src[2 * i + 1]);
            float c = cosb[(long long)p * half_d + i], s = sinb[(long long)p * half_d + i];
            half o1 = __float2half(x1 * c - x2 * s), o2 = __float2half(x2 * c + x1 * s);
            if (h < Hq) {
                q_out[(long long)m * Hq * D + h * D + i] = o1;
                q_out[(long long)m * Hq * D + h * D + i + half_d] = o2;
            } else if (slot >= 0) {
                half* dst = kc + ((long long)slot * Hkv + (h - Hq)) * D;
                dst[i] = o1;
                dst[i + half_d] = o2;
            }
        } else if (slot >= 0) {
            const int j = t - pairs;  // v element [0, Hkv*D)
            vc[(long long)slot * Hkv * D + j] = row[(Hq + Hkv) * D + j];
        }
    }
}

// SiLU(gate) * up; gu: half [M, 2I] with gate and up columns interleaved (2j = gate_j,
// 2j + 1 = up_j: the session interleaves the fused weight's rows), out: half [M, I].
extern "C" __global__ void silu_mul(const half* __restrict__ gu, half* __restrict__ out, int M, int I) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)M * I) return;
    const half2 p = reinterpret_cast<const half2*>(gu)[i];  // row m = i / I, pair j = i % I
    float g = __low2float(p), u = __high2float(p);
    out[i] = __float2half(g / (1.f + __expf(-g)) * u);
}

// ---------------------------------------------------------------------------------------
// Decode attention over the paged KV cache. Grid (Hq, B), blockDim threads; GQA: query head h
// reads kv head h / (Hq / Hkv). The sequence's block table is first copied to shared memory
// (no dependent global load per token for the slot). Three passes over its L tokens:
//   1. scores[t] = q . k_t * scale (one token per thread; its K row in D/8 16-byte loads,
//      all issued before use when D is a compile-time constant)
//   2. softmax in shared memory
//   3. out = sum_t p_t v_t. Compile-time D: threads = (token group, 16-byte column chunk), so a
//      V row is read by D/8 threads with one 16-byte load each and each group walks only
//      L / (blockDim / (D/8)) tokens, UNROLL of them in flight (for D = 128, L = 256: 2 rounds
//      instead of 8 with the half2 layout). Runtime D: (token group, half2 column).
// Dynamic shared memory: (max_ctx + D + 32 + 8 * blockDim + max_blocks) 4-byte words.
// ---------------------------------------------------------------------------------------
template <int DT>
__device__ __forceinline__ void paged_attn_impl(const half* __restrict__ q, const half* __restrict__ kc,
                                                const half* __restrict__ vc, const int* __restrict__ block_tables,
                                                const int* __restrict__ ctx_lens, half* __restrict__ out,
                                                int Hq, int Hkv, int Drt, int BS, int max_blocks, int max_ctx,
                                                float scale) {
    const int D = DT > 0 ? DT : Drt;
    extern __shared__ float sm[];
    float* scores = sm;                 // [max_ctx]
    float* qs = sm + max_ctx;           // [D]
    float* red = qs + D;                // [32]
    float* accbuf = red + 32;           // [8 * blockDim]
    int* bts = reinterpret_cast<int*>(accbuf + 8 * blockDim.x);  // [max_blocks] block table copy
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int L = ctx_lens[b];
    const int kvh = h / (Hq / Hkv);
    half* o = out + ((long long)b * Hq + h) * D;
    if (L <= 0) {
        for (int d = tid; d < D; d += blockDim.x) o[d] = __float2half(0.f);
        return;
    }
    const half* qh = q + ((long long)b * Hq + h) * D;
    for (int d = tid; d < D; d += blockDim.x) qs[d] = __half2float(qh[d]) * scale;
    const int* bt = block_tables + (long long)b * max_blocks;
    const int nblk = min((L + BS - 1) / BS, max_blocks);
    for (int i = tid; i < nblk; i += blockDim.x) bts[i] = bt[i];
    __syncthreads();
    // compile-time D: the first round of V loads is issued now, before the scores exist (V's
    // addresses do not depend on them), so K and V are in flight together: one memory round
    // trip fewer per layer. VU tokens per (group, chunk) thread: 256 tokens per round.
    constexpr int NCH = DT > 0 ? DT / 8 : 1;  // 16-byte chunks per V row
    constexpr int VU = DT >= 128 ? 16 : 8;
    const int groups = blockDim.x / NCH;
    const int ch = tid % NCH, grp = tid / NCH;
    uint4 vpre[DT > 0 ? VU : 1];
    if (DT > 0) {
#pragma unroll
        for (int u = 0; u < VU; ++u) {
            const int t = grp + u * groups;
            if (grp < groups && t < L) {
                const long long slot = (long long)bts[t / BS] * BS + (t % BS);
                vpre[u] = __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
            } else {
                vpre[u] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }
    float mx = -INFINITY;
    for (int t = tid; t < L; t += blockDim.x) {
        const long long slot = (long long)bts[t / BS] * BS + (t % BS);
        const uint4* kp = reinterpret_cast<const uint4*>(kc + (slot * Hkv + kvh) * D);
        float s = 0.f;
        if (DT > 0) {
            uint4 kv[DT > 0 ? DT / 8 : 1];
#pragma unroll
            for (int c = 0; c < DT / 8; ++c) kv[c] = __ldg(kp + c);
#pragma unroll
            for (int c = 0; c < DT / 8; ++c) {
                const half2* kh = reinterpret_cast<const half2*>(&kv[c]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float2 f = __half22float2(kh[j]);
                    s += f.x * qs[c * 8 + 2 * j] + f.y * qs[c * 8 + 2 * j + 1];
                }
            }
        } else {
            for (int c = 0; c < (D >> 3); ++c) {
                uint4 kv = __ldg(kp + c);
                const half2* kh = reinterpret_cast<const half2*>(&kv);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float2 f = __half22float2(kh[j]);
                    s += f.x * qs[c * 8 + 2 * j] + f.y * qs[c * 8 + 2 * j + 1];
                }
            }
        }
        scores[t] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_reduce(mx, red, true);
    float sum = 0.f;
    for (int t = tid; t < L; t += blockDim.x) {
        float e = __expf(scores[t] - mx);
        scores[t] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);  // also a barrier: scores visible to all
    const float inv = 1.f / sum;
    if (DT > 0) {
        float a[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = 0.f;
        constexpr int UNROLL = VU;
        if (grp < groups) {
            for (int t0 = grp; t0 < L; t0 += groups * UNROLL) {
                uint4 v[UNROLL];
                float p[UNROLL];
                const bool first = t0 == grp;
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int t = t0 + u * groups;
                    if (t < L) {
                        const long long slot = (long long)bts[t / BS] * BS + (t % BS);
                        v[u] = first ? vpre[u] : __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
                        p[u] = scores[t];
                    } else {
                        v[u] = make_uint4(0u, 0u, 0u, 0u);
                        p[u] = 0.f;
                    }
                }
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const half2* vh = reinterpret_cast<const half2*>(&v[u]);
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float2 f = __half22float2(vh[j]);
                        a[2 * j] += p[u] * f.x;
                        a[2 * j + 1] += p[u] * f.y;
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) accbuf[grp * D + ch * 8 + j] = a[j];
        }
        __syncthreads();
        for (int d = tid; d < D; d += blockDim.x) {
            float acc = 0.f;
            for (int g = 0; g < groups; ++g) acc += accbuf[g * D + d];
            o[d] = __float2half(acc * inv);
        }
        return;
    }
    const int ncol = D >> 1, rgroups = blockDim.x / ncol;
    const int col = tid % ncol, rgrp = tid / ncol;
    float2 acc = make_float2(0.f, 0.f);
    const int UNROLL = 8;
    if (rgrp < rgroups) {
        for (int t0 = rgrp; t0 < L; t0 += rgroups * UNROLL) {
            float2 v[UNROLL];
            float p[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int t = t0 + u * rgroups;
                if (t < L) {
                    const long long slot = (long long)bts[t / BS] * BS + (t % BS);
                    v[u] = __half22float2(reinterpret_cast<const half2*>(vc + (slot * Hkv + kvh) * D)[col]);
                    p[u] = scores[t];
                } else {
                    v[u] = make_float2(0.f, 0.f);
                    p[u] = 0.f;
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                acc.x += p[u] * v[u].x;
                acc.y += p[u] * v[u].y;
            }
        }
    }
    accbuf[2 * tid] = acc.x;
    accbuf[2 * tid + 1] = acc.y;
    __syncthreads();
    if (tid < ncol) {
        float ax = 0.f, ay = 0.f;
        for (int g = 0; g < rgroups; ++g) { ax += accbuf[2 * (g * ncol + tid)]; ay += accbuf[2 * (g * ncol + tid) + 1]; }
        reinterpret_cast<half2*>(o)[tid] = __floats2half2_rn(ax * inv, ay * inv);
    }
}

#define ATTN_INSTANCE(NAME, DT)                                                                   \
    extern "C" __global__ void NAME(const half* q, const half* kc, const half* vc, const int* bt,  \
        const int* ctx, half* out, int Hq, int Hkv, int D, int BS, int max_blocks, int max_ctx,    \
        float scale) {                                                                             \
        paged_attn_impl<DT>(q, kc, vc, bt, ctx, out, Hq, Hkv, D, BS, max_blocks, max_ctx, scale); }

ATTN_INSTANCE(paged_attn_decode, 0)
ATTN_INSTANCE(paged_attn_decode_d64, 64)
ATTN_INSTANCE(paged_attn_decode_d128, 128)

// ---------------------------------------------------------------------------------------
// Split-sequence decode attention (flash-decoding) for compile-time D: grid (Hq, B, P), of which
// min(P, ceil(L / min_split)) splits are used for a sequence of L tokens. One
// block per (head, sequence) used 32 of the H100's 132 SMs for an 8B model, each pulling
// its head's whole K and V alone (~9 us per layer). Block (h, b, s) takes tokens
// [s * ceil(L/P), (s+1) * ceil(L/P)), computes its local max m_s, sum l_s and unnormalised
// acc_s = sum_t exp(score_t - m_s) v_t, and writes them to part_*; the (h, b) pair's last
// block (ticket counter) merges the P parts: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// K and V loads of the block's tokens are issued together (V's addresses do not depend on the
// scores). Shared memory as paged_attn_decode.
// ---------------------------------------------------------------------------------------
template <int D, bool KCOAL>
__device__ __forceinline__ void paged_attn_split_impl(const half* __restrict__ q, const half* __restrict__ kc,
                                                      const half* __restrict__ vc, const int* __restrict__ block_tables,
                                                      const int* __restrict__ ctx_lens, half* __restrict__ out,
                                                      float* part_o, float* part_ml, unsigned* tickets,
                                                      int Hq, int Hkv, int BS, int max_blocks, int max_ctx, float scale,
                                                      int min_split) {
    constexpr int NCH = D / 8;  // 16-byte chunks per K / V row
    constexpr int VU = 8;       // V tokens in flight per thread: 2048 / D tokens per round
    extern __shared__ float sm[];
    float* scores = sm;                 // [max_ctx] (this split's tokens from 0)
    float* qs = sm + max_ctx;           // [D]
    float* red = qs + D;                // [32]
    float* accbuf = red + 32;           // [8 * blockDim]
    int* bts = reinterpret_cast<int*>(accbuf + 8 * blockDim.x);
    __shared__ bool last;
    const int h = blockIdx.x, b = blockIdx.y, sp = blockIdx.z, P = gridDim.z, tid = threadIdx.x;
    // the length, q and the whole block-table row are loaded together (one round trip, not two)
    const int L = ctx_lens[b];
    const half* qh = q + ((long long)b * Hq + h) * D;
    for (int d = tid; d < D; d += blockDim.x) qs[d] = __half2float(qh[d]) * scale;
    const int* bt = block_tables + (long long)b * max_blocks;
    for (int i = tid; i < max_blocks; i += blockDim.x) bts[i] = bt[i];
    const int kvh = h / (Hq / Hkv);
    half* o = out + ((long long)b * Hq + h) * D;
    if (L <= 0) {  // a padding row: every split of it returns here
        if (sp == 0)
            for (int d = tid; d < D; d += blockDim.x) o[d] = __float2half(0.f);
        return;
    }
    // splits actually used: at most one per min_split tokens (a short context is faster in
    // one block than with the merge's two extra memory round trips); the others return
    const int Pe = min(P, max(1, (L + min_split - 1) / min_split));
    if (sp >= Pe) return;
    const int per = (L + Pe - 1) / Pe;
    const int t0 = min(L, sp * per), t1 = min(L, t0 + per), n = t1 - t0;
    __syncthreads();
    const int groups = blockDim.x / NCH;
    const int ch = tid % NCH, grp = tid / NCH;
    uint4 vpre[VU];
#pragma unroll
    for (int u = 0; u < VU; ++u) {
        const int t = grp + u * groups;  // relative to t0
        if (grp < groups && t < n) {
            const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
            vpre[u] = __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
        } else {
            vpre[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    float mx = -INFINITY;
    if constexpr (KCOAL) {
    // Scores with the V layout: the NCH threads of a group read one K row (coalesced 16-byte
    // chunks), each multiplies its chunk by its 8 q values (registers) and the group sums with
    // shuffles. Round count is uniform across the block so every lane reaches the shuffles.
    float qr[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) qr[j] = qs[ch * 8 + j];
    constexpr int KU = 8;  // K rows in flight per thread
    const int rounds = (n + groups * KU - 1) / (groups * KU);
    for (int r = 0; r < rounds; ++r) {
        uint4 kv[KU];
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            const int t = (r * KU + u) * groups + grp;
            if (grp < groups && t < n) {
                const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
                kv[u] = __ldg(reinterpret_cast<const uint4*>(kc + (slot * Hkv + kvh) * D) + ch);
            } else {
                kv[u] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
#pragma unroll
        for (int u = 0; u < KU; ++u) {
            const half2* kh = reinterpret_cast<const half2*>(&kv[u]);
            float sc = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = __half22float2(kh[j]);
                sc += f.x * qr[2 * j] + f.y * qr[2 * j + 1];
            }
#pragma unroll
            for (int o = NCH / 2; o > 0; o >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o);
            const int t = (r * KU + u) * groups + grp;
            if (grp < groups && t < n) {
                if (ch == 0) scores[t] = sc;
                mx = fmaxf(mx, sc);
            }
        }
    }
    } else {  // one token per thread: its K row in NCH 16-byte loads, all in flight
        for (int t = tid; t < n; t += blockDim.x) {
            const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
            const uint4* kp = reinterpret_cast<const uint4*>(kc + (slot * Hkv + kvh) * D);
            uint4 kv[NCH];
#pragma unroll
            for (int c = 0; c < NCH; ++c) kv[c] = __ldg(kp + c);
            float s0 = 0.f, s1 = 0.f;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                const half2* kh = reinterpret_cast<const half2*>(&kv[c]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __half22float2(kh[j]);
                    if (j & 1) s1 += f.x * qs[c * 8 + 2 * j] + f.y * qs[c * 8 + 2 * j + 1];
                    else s0 += f.x * qs[c * 8 + 2 * j] + f.y * qs[c * 8 + 2 * j + 1];
                }
            }
            scores[t] = s0 + s1;
            mx = fmaxf(mx, s0 + s1);
        }
    }
    mx = block_reduce(mx, red, true);
    float sum = 0.f;
    for (int t = tid; t < n; t += blockDim.x) {
        const float e = __expf(scores[t] - mx);
        scores[t] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);  // also a barrier: scores visible to all
    float a[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = 0.f;
    if (grp < groups) {
        for (int tb = grp; tb < n; tb += groups * VU) {
            const bool first = tb == grp;
            uint4 v[VU];
            float p[VU];
#pragma unroll
            for (int u = 0; u < VU; ++u) {
                const int t = tb + u * groups;
                if (t < n) {
                    const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
                    v[u] = first ? vpre[u] : __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
                    p[u] = scores[t];
                } else {
                    v[u] = make_uint4(0u, 0u, 0u, 0u);
                    p[u] = 0.f;
                }
            }
#pragma unroll
            for (int u = 0; u < VU; ++u) {
                const half2* vh = reinterpret_cast<const half2*>(&v[u]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __half22float2(vh[j]);
                    a[2 * j] += p[u] * f.x;
                    a[2 * j + 1] += p[u] * f.y;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) accbuf[grp * D + ch * 8 + j] = a[j];
    }
    __syncthreads();
    const long long bh = (long long)b * Hq + h;
    if (Pe == 1) {
        const float inv = 1.f / sum;
        for (int d = tid; d < D; d += blockDim.x) {
            float acc = 0.f;
            for (int g = 0; g < groups; ++g) acc += accbuf[g * D + d];
            o[d] = __float2half(acc * inv);
        }
        return;
    }
    for (int d = tid; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int g = 0; g < groups; ++g) acc += accbuf[g * D + d];
        part_o[(bh * P + sp) * D + d] = acc;
    }
    if (tid == 0) {
        part_ml[(bh * P + sp) * 2] = mx;  // -inf for an empty split: it weighs 0 below
        part_ml[(bh * P + sp) * 2 + 1] = sum;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(tickets + bh, 1u) == (unsigned)Pe - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    float M = -INFINITY;
    for (int j = 0; j < Pe; ++j) M = fmaxf(M, __ldcg(part_ml + (bh * P + j) * 2));
    float l = 0.f;
    for (int j = 0; j < Pe; ++j) l += __ldcg(part_ml + (bh * P + j) * 2 + 1) * __expf(__ldcg(part_ml + (bh * P + j) * 2) - M);
    const float inv = 1.f / l;
    for (int d = tid; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < Pe; ++j) acc += __ldcg(part_o + (bh * P + j) * D + d) * __expf(__ldcg(part_ml + (bh * P + j) * 2) - M);
        o[d] = __float2half(acc * inv);
    }
    if (tid == 0) tickets[bh] = 0u;
}

#define ATTN_SPLIT_INSTANCE(NAME, D, KCOAL)                                                                  \
    extern "C" __global__ void NAME(const half* q, const half* kc, const half* vc, const int* bt,       \
        const int* ctx, half* out, float* part_o, float* part_ml, unsigned* tickets, int Hq, int Hkv,   \
        int BS, int max_blocks, int max_ctx, float scale, int min_split) {                              \
        paged_attn_split_impl<D, KCOAL>(q, kc, vc, bt, ctx, out, part_o, part_ml, tickets, Hq, Hkv, BS,  \
                                 max_blocks, max_ctx, scale, min_split); }

ATTN_SPLIT_INSTANCE(paged_attn_split_d64, 64, true)
ATTN_SPLIT_INSTANCE(paged_attn_split_d128, 128, true)
ATTN_SPLIT_INSTANCE(paged_attn_split_tk_d64, 64, false)
ATTN_SPLIT_INSTANCE(paged_attn_split_tk_d128, 128, false)

// Causal softmax over prefill attention scores S half [rows, L] in place; row r is query
// t = r % T at absolute position P + t, which sees keys [0, P + t].
extern "C" __global__ void causal_softmax(half* __restrict__ S, int L, int T, int P) {
    __shared__ float red[32];
    const long long r = blockIdx.x;
    const int t = (int)(r % T);
    const int valid = P + t + 1;
    half* row = S + r * L;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) mx = fmaxf(mx, __half2float(row[j]));
    mx = block_reduce(mx, red, true);
    float sum = 0.f;
    for (int j = threadIdx.x; j < valid; j += blockDim.x) sum += __expf(__half2float(row[j]) - mx);
    sum = block_reduce(sum, red, false);
    const float inv = 1.f / sum;
    for (int j = threadIdx.x; j < L; j += blockDim.x)
        row[j] = __float2half(j < valid ? __expf(__half2float(row[j]) - mx) * inv : 0.f);
}

// Greedy sampling: out[b] = argmax_v logits[b, v] (lowest index on ties). One block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int* __restrict__ out, int V) {
    __shared__ float sv[1024];
    __shared__ int si[1024];
    const int b = blockIdx.x, tid = threadIdx.x;
    const float* row = logits + (long long)b * V;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int v = tid; v < V; v += blockDim.x) {
        float x = row[v];
        if (x > best) { best = x; bi = v; }
    }
    sv[tid] = best;
    si[tid] = bi;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (tid < s) {
            float o = sv[tid + s];
            int oi = si[tid + s];
            if (o > sv[tid] || (o == sv[tid] && oi < si[tid])) { sv[tid] = o; si[tid] = oi; }
        }
        __syncthreads();
    }
    if (tid == 0) out[b] = si[0];
}

__device__ __forceinline__ void argmax_pair(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
}

// Block-wide (value, index) argmax, lowest index on ties; result valid in thread 0.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) argmax_pair(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? sv[lane] : -INFINITY;
        i = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) argmax_pair(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    }
}

// Greedy sampling spread over gridDim.x blocks per row (grid (P, B)): each block reduces a
// slice into (pv, pi)[b, blockIdx.x]; the row's last block (ticket counter) reduces the P
// partials in order and writes out[b]. Same result as argmax_rows, several times faster on
// a 128k vocabulary (one block of 1024 threads was ~29 us of an 8B decode step).
// ids_out (may be null) also receives the ids: the next decode step's input slot, so a greedy
// stream can run steps back to back without the host in the loop (CudaDecoderSession.greedy_stream).
// hist (may be null) records the id at its position: hist[b, pos[b] + 1], so a stream's tokens
// can be read back without racing the steps queued behind it.
extern "C" __global__ void argmax_rows_mb(const float* __restrict__ logits, int* __restrict__ out,
                                          int* __restrict__ ids_out, int* __restrict__ hist,
                                          const int* __restrict__ pos, int hist_stride,
                                          float* pv, int* pi, unsigned* tickets, int V) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ bool last;
    const int b = blockIdx.y, P = gridDim.x, tid = threadIdx.x;
    const int per = (V + P - 1) / P, v0 = blockIdx.x * per, v1 = min(V, v0 + per);
    const float* row = logits + (long long)b * V;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int v = v0 + tid; v < v1; v += blockDim.x) argmax_pair(best, bi, row[v], v);
    block_argmax(best, bi, sv, si);
    if (tid == 0) {
        pv[b * P + blockIdx.x] = best;
        pi[b * P + blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(tickets + b, 1u) == (unsigned)P - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    best = -INFINITY;
    bi = 0x7fffffff;
    for (int j = tid; j < P; j += blockDim.x) argmax_pair(best, bi, __ldcg(pv + b * P + j), __ldcg(pi + b * P + j));
    __syncthreads();
    block_argmax(best, bi, sv, si);
    if (tid == 0) {
        out[b] = bi;
        if (ids_out) ids_out[b] = bi;
        if (hist) {
            const int p = pos[b] + 1;
            if (p >= 0 && p < hist_stride) hist[(long long)b * hist_stride + p] = bi;
        }
        tickets[b] = 0u;
    }
}

// End of a decode step: move each live row's inputs to the next position (pos + 1, its slot
// from the block table, length + 1), so the next step can run with no host copy when its
// blocks are reserved ahead (CudaDecoderSession.greedy_stream). inp: ids[mb] pos[mb] slots[mb]
// ctx[mb] tables[mb, max_blocks]; rows with length 0 (padding) are left alone. A host-fed step
// overwrites all of it, so this is harmless there.
extern "C" __global__ void advance_inputs(int* inp, int mb, int max_blocks, int BS, int rows) {
    const int r = threadIdx.x;
    if (r >= rows) return;
    int* pos = inp + mb;
    int* slots = inp + 2 * mb;
    int* ctx = inp + 3 * mb;
    const int* table = inp + 4 * mb + (long long)r * max_blocks;
    if (ctx[r] <= 0) return;
    const int p = pos[r] + 1;
    pos[r] = p;
    ctx[r] = p + 1;
    slots[r] = p / BS < max_blocks ? table[p / BS] * BS + p % BS : -1;
}
"""

BK_VARIANTS = (  # block-K int4 GEMV instances (rows R, threads NT, unroll U), as in BK_INSTANCES above
    (2, 64, 2), (4, 64, 2), (2, 128, 2), (4, 128, 2), (8, 128, 1), (2, 256, 2), (4, 256, 2), (8, 256, 1),
    (2, 64, 4), (2, 128, 4), (4, 128, 4),
)

KERNEL_NAMES = (
    "repack_int4",
    "dequant_int4",
    "dequant_int8",
    *(f"gemv_{k}_m{m}" for k in ("int4", "int8", "fp16") for m in (1, 2, 4, 8, 16)),
    "gemv_int4_m1_r2",
    "gemv_int4_m1_r4",
    *(f"gemv_int4_bk_r{r}_t{nt}_u{u}_{epi}" for r, nt, u in BK_VARIANTS for epi in ("st", "glu", "res", "rope")),
    "embed",
    "embed_rmsnorm",
    "add_rmsnorm",
    "rope_cache",
    "silu_mul",
    "paged_attn_decode",
    "paged_attn_decode_d64",
    "paged_attn_decode_d128",
    "paged_attn_split_d64",
    "paged_attn_split_d128",
    "paged_attn_split_tk_d64",
    "paged_attn_split_tk_d128",
    "causal_softmax",
    "argmax_rows",
    "argmax_rows_mb",
    "advance_inputs",
)
