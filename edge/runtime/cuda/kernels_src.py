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

// M = 1 variants with more rows per warp (longer-lived warps, more loads in flight); the
// session times them on the model's largest int4 layer at load and keeps the fastest.
extern "C" __global__ void gemv_int4_m1_r2(const uint4* W, const half* S, const half* X, const half* bias,
    void* Y, int M, int N, int K, int gshift, int ldy, int out_f32) {
    gemv_int4<1, 2>(W, S, X, bias, Y, M, N, K, gshift, ldy, out_f32); }
extern "C" __global__ void gemv_int4_m1_r4(const uint4* W, const half* S, const half* X, const half* bias,
    void* Y, int M, int N, int K, int gshift, int ldy, int out_f32) {
    gemv_int4<1, 4>(W, S, X, bias, Y, M, N, K, gshift, ldy, out_f32); }

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

// Residual add fused with RMSNorm: res[m] += x[m] (x may be null); out[m] = half(res[m] *
// rsqrt(mean(res[m]^2) + eps) * w). One block per row.
extern "C" __global__ void add_rmsnorm(float* __restrict__ res, const half* __restrict__ x,
                                       const half* __restrict__ w, half* __restrict__ out, int H, float eps) {
    __shared__ float red[32];
    const int m = blockIdx.x;
    float* r = res + (long long)m * H;
    float ss = 0.f;
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

// RoPE (HF rotate_half convention: pairs (i, i + D/2)) on q and k of the fused qkv rows,
// q written to q_out [M, Hq*D]; rotated k and v written into the paged cache at slots[m]
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
            const half* src = row + h * D;
            float x1 = __half2float(src[i]), x2 = __half2float(src[i + half_d]);
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

// SiLU(gate) * up; gu: half [M, 2I] (gate rows first, then up), out: half [M, I].
extern "C" __global__ void silu_mul(const half* __restrict__ gu, half* __restrict__ out, int M, int I) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)M * I) return;
    long long m = i / I, j = i % I;
    float g = __half2float(gu[m * 2 * I + j]), u = __half2float(gu[m * 2 * I + I + j]);
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
        constexpr int NCH = DT > 0 ? DT / 8 : 1;  // 16-byte chunks per V row
        const int groups = blockDim.x / NCH;
        const int ch = tid % NCH, grp = tid / NCH;
        float a[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = 0.f;
        const int UNROLL = 8;
        if (grp < groups) {
            for (int t0 = grp; t0 < L; t0 += groups * UNROLL) {
                uint4 v[UNROLL];
                float p[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int t = t0 + u * groups;
                    if (t < L) {
                        const long long slot = (long long)bts[t / BS] * BS + (t % BS);
                        v[u] = __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
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
    const int ncol = D >> 1, groups = blockDim.x / ncol;
    const int col = tid % ncol, grp = tid / ncol;
    float2 acc = make_float2(0.f, 0.f);
    const int UNROLL = 8;
    if (grp < groups) {
        for (int t0 = grp; t0 < L; t0 += groups * UNROLL) {
            float2 v[UNROLL];
            float p[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int t = t0 + u * groups;
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
        for (int g = 0; g < groups; ++g) { ax += accbuf[2 * (g * ncol + tid)]; ay += accbuf[2 * (g * ncol + tid) + 1]; }
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
"""

KERNEL_NAMES = (
    "repack_int4",
    "dequant_int4",
    "dequant_int8",
    *(f"gemv_{k}_m{m}" for k in ("int4", "int8", "fp16") for m in (1, 2, 4, 8, 16)),
    "gemv_int4_m1_r2",
    "gemv_int4_m1_r4",
    "embed",
    "add_rmsnorm",
    "rope_cache",
    "silu_mul",
    "paged_attn_decode",
    "paged_attn_decode_d64",
    "paged_attn_decode_d128",
    "causal_softmax",
    "argmax_rows",
)
