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

// The same load, `volatile`: issued where it is written, so a load placed before pdl_wait() stays
// there (a plain asm load may be sunk to its first use, after the wait).
__device__ __forceinline__ uint4 ldg_stream_early(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
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
    pdl_wait();
    pdl_trigger();
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
            deq_int4_word_lop3(q.x, w[r]);
            deq_int4_word_lop3(q.y, w[r] + 4);
            deq_int4_word_lop3(q.z, w[r] + 8);
            deq_int4_word_lop3(q.w, w[r] + 12);
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
    pdl_wait();
    pdl_trigger();
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
// One 16-byte chunk (32 int4 weights of one row) times X's 32 halves: products summed in two
// half2 chains, then in float (both block-K cores; the same ops, so the same bits).
__device__ __forceinline__ float dot_int4_chunk(uint4 q, const half2* __restrict__ xh) {
    half2 w[16];
    deq_int4_word_lop3(q.x, w);
    deq_int4_word_lop3(q.y, w + 4);
    deq_int4_word_lop3(q.z, w + 8);
    deq_int4_word_lop3(q.w, w + 12);
    half2 a0 = __float2half2_rn(0.f), a1 = a0;
#pragma unroll
    for (int j = 0; j < 16; j += 2) {
        a0 = __hfma2(w[j], xh[j], a0);
        a1 = __hfma2(w[j + 1], xh[j + 1], a1);
    }
    return h2sum(a0) + h2sum(a1);
}

// Row nr of a row-major array, from a pointer into row 0 and the row's size in bytes: one IMAD.WIDE.U32 a
// row. The 64-bit element index nr * chunks + c before session 17 took IMAD.WIDE + LEA + LEA.HI.X a row, for
// the weights and again for the scales: the block-K GEMVs now issue 3-5% fewer instructions (SASS by NVRTC
// for sm_90: gate|up r8_t128_u2_p1_b8_gluf 880 -> 848, down r16_t224_u2_p4_b2_fold 1,632 -> 1,552).
template <typename T>
__device__ __forceinline__ const T* row_at(const T* row0, int nr, u32 row_bytes) {
    return reinterpret_cast<const T*>(reinterpret_cast<const char*>(row0) + (unsigned long long)(u32)nr * row_bytes);
}

// The RMSNorm folded into the next GEMV (session 15: the "fold" producer, the "gluf" / "ropef"
// consumers below). After pdl_wait (FI) a block loads what it needs besides X and the weights, so
// that the L2 round trips overlap the weight stream instead of adding to the block's tail: a
// consumer the producer blocks' partial sums of squares (at most FOLD_MAXP a thread) and the scale
// s; a producer s and, in threads t < R, its row's residual and norm weight. The parts' sum meets
// in bk_sum_warps' barrier (no barrier of its own): in threads t < R, the same bits in every block.
#define FOLD_MAXP 4
// FI, the fold's side in a block-K core: 0 none, FOLD_CONSUMER (gluf / ropef: sums the parts), FOLD_PRODUCER
// (fold: loads s, its rows' residual and norm weight; no parts to sum, so no shuffles or shared sums of them)
#define FOLD_CONSUMER 1
#define FOLD_PRODUCER 2
#define FOLD_HEADROOM 0.00390625f  // 2^-8: X' = res * w * s / 256 (see gemv_int4_bk_fold)
struct FoldIn {
    const float* parts;   // [nparts] the producer's per-block sums of squares (consumer; null: none)
    const float* sprev;   // the previous norm's 1 / rms (s = *sprev * FOLD_HEADROOM)
    int nparts;
    const float* res;     // the residual row (producer; null: none)
    const half* nw;       // the norm's weight (producer)
};
struct FoldOut {
    float pss;    // threads t < R: the sum of every part (after bk_sum_warps)
    float s;      // the scale X' is written with
    float r_old;  // producer, threads t < R: res[n0 + t] before this linear's add
    float w;      // producer, threads t < R: the norm weight of row n0 + t
};

__device__ __forceinline__ float ld_cg_early(const float* p) {  // issued where written (see ldg_stream_early)
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// The same through the read-only path, cached in L1: the parts and s are read by every block of the
// consumer (3,584 blocks of Llama-3-8B's gate|up), so the SM's later blocks find them in L1 instead
// of asking one L2 line each (the .cg form: gate|up 18.91 -> 20.33 us a launch, session 15 call 3).
// Read-only while the kernel runs: the kernel before wrote them, and nothing reads them before pdl_wait.
__device__ __forceinline__ float ld_nc_early(const float* p) {
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ int ld_nc_early_s32(const int* p) {
    int v;
    asm volatile("ld.global.nc.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// What an epilogue loads once its core's pdl_wait is over, before the chunks (a callable; none by default):
// the RoPE epilogue's cos / sin (gemv_int4_bk_rope).
struct NoAfterWait {
    __device__ __forceinline__ void operator()() const {}
};

template <int R, int NT, int FI>
struct FoldLoads {
    float p[FI == FOLD_CONSUMER ? FOLD_MAXP : 1];
    float s, r_old, w;
    __device__ __forceinline__ void issue(const FoldIn& fi, int tid, int n0, int N) {
        if constexpr (FI == FOLD_CONSUMER) {
#pragma unroll
            for (int j = 0; j < FOLD_MAXP; ++j) {
                const int i = tid + j * NT;
                p[j] = i < fi.nparts ? ld_nc_early(fi.parts + i) : 0.f;
            }
        }
        if constexpr (FI) {
            s = ld_nc_early(fi.sprev) * FOLD_HEADROOM;
            r_old = w = 0.f;
            if (FI == FOLD_PRODUCER && fi.res && tid < R && n0 + tid < N) {
                r_old = ld_cg_early(fi.res + n0 + tid);
                w = __half2float(fi.nw[n0 + tid]);
            }
        }
    }
    // this thread's parts in order -> fo, and their warp's sum (for bk_sum_warps)
    __device__ __forceinline__ float finish(FoldOut* fo) const {
        if constexpr (FI) {
            fo->s = s;
            fo->r_old = r_old;
            fo->w = w;
        }
        if constexpr (FI == FOLD_CONSUMER) {
            float v = 0.f;
#pragma unroll
            for (int j = 0; j < FOLD_MAXP; ++j) v += p[j];
            return warp_sum(v);
        }
        return 0.f;
    }
};

// yout[r] = the sum over the block's warps of red[r][warp], in warp order (then a barrier).
// FI = FOLD_CONSUMER: also the warps' sums of the fold's parts (wp) -> fo->pss in threads t < R, in warp order.
template <int R, int NT, int FI = 0>
__device__ __forceinline__ void bk_sum_warps(const float (&red)[R][NT / 32], float* __restrict__ yout,
                                             float wp = 0.f, FoldOut* fo = nullptr) {
    __shared__ float redp[FI == FOLD_CONSUMER ? NT / 32 : 1];
    const int t = threadIdx.x;
    if constexpr (FI == FOLD_CONSUMER) {
        if ((t & 31) == 0) redp[t >> 5] = wp;
    }
    __syncthreads();
    if (t < R) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < NT / 32; ++w) v += red[t][w];
        yout[t] = v;
        if constexpr (FI == FOLD_CONSUMER) {
            float p = 0.f;
#pragma unroll
            for (int w = 0; w < NT / 32; ++w) p += redp[w];
            fo->pss = p;
        }
    }
    __syncthreads();
}

// R rows' partial sums across a warp in one transposing butterfly (both block-K cores): the same xor
// pairs as warp_sum, so each row's sum has warp_sum's bits, in R - 1 + 5 - log2 R shuffles instead of 5 R.
template <int R>
__device__ __forceinline__ float warp_sum_rows(float* v, int lane) {
    // v[0..R) per lane -> the sum over the warp of v[idx], idx = lane >> (5 - log2 R), in lanes
    // whose low 5 - log2 R bits are 0 (every lane holds some row's full sum at the end)
    int cnt = R;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        if (cnt > 1) {
            const int half = cnt >> 1;
            const bool upper = lane & o;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                if (i < half) {
                    const float keep = upper ? v[i + half] : v[i];
                    const float send = upper ? v[i] : v[i + half];
                    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
                }
            }
            cnt = half;
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
        }
    }
    return v[0];
}

template <int R, int NT, int U, int FI = 0, typename AW = NoAfterWait>
__device__ __forceinline__ void gemv_int4_bk_core(const uint4* __restrict__ W, const half* __restrict__ S,
                                                  const half* __restrict__ X, int N, int K, int gshift,
                                                  int n0, float* __restrict__ yout, FoldIn fi = FoldIn(),
                                                  FoldOut* fo = nullptr, AW after_wait = AW()) {
    __shared__ float red[R][NT / 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int chunks = K >> 5, groups = K >> gshift;
    FoldLoads<R, NT, FI> fl;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    // The first chunk's weights and scales are loaded before pdl_wait (they do not depend on the
    // kernel before: under programmatic launch they stream in while it finishes); X after it.
    // (EDGE_BK_WAIT_FIRST: wait before any load; session 7's bk_ab timed the two: early loads win under PDL.)
    uint4 q0[R];
    float s0[R];
#ifdef EDGE_BK_WAIT_FIRST
    pdl_wait();
    pdl_trigger();
    fl.issue(fi, tid, n0, N);
#endif
    const u32 wrow = (u32)chunks * 16u, srow = (u32)groups * 2u;  // bytes a row of W / of S
    if (tid < chunks) {
        const uint4* wc = W + tid;
        const half* sc = S + ((tid << 5) >> gshift);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int nr = min(n0 + r, N - 1);
            q0[r] = ldg_stream_early(row_at(wc, nr, wrow));
            s0[r] = __half2float(*row_at(sc, nr, srow));
        }
    }
#ifndef EDGE_BK_WAIT_FIRST
    pdl_wait();
    pdl_trigger();
#endif
    fl.issue(fi, tid, n0, N);
    after_wait();
    // one chunk c of the R rows: products with X's 32 elements, summed in half2, scaled into acc
    auto chunk = [&](int c, const uint4* q, const float* s) {
        const uint4* xp = reinterpret_cast<const uint4*>(X + (c << 5));
        uint4 xv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[j] = __ldg(xp + j);
        const half2* xh = reinterpret_cast<const half2*>(xv);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += dot_int4_chunk(q[r], xh) * s[r];
    };
    if (tid < chunks) chunk(tid, q0, s0);  // the same order of sums as one loop from tid
#pragma unroll U
    for (int c = tid + NT; c < chunks; c += NT) {
        uint4 q[R];
        float s[R];
        const uint4* wc = W + c;
        const half* sc = S + ((c << 5) >> gshift);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int nr = min(n0 + r, N - 1);
            q[r] = ldg_stream(row_at(wc, nr, wrow));
            s[r] = __half2float(*row_at(sc, nr, srow));
        }
        chunk(c, q, s);
    }
    const float wp = fl.finish(fo);
    // one butterfly for the R rows (session 19; was R warp_sums: 5 R shuffles, 80 a thread in o's r16)
    constexpr int LOG_R = R >= 32 ? 5 : R >= 16 ? 4 : R >= 8 ? 3 : R >= 4 ? 2 : R >= 2 ? 1 : 0;
    const float v = warp_sum_rows<R>(acc, lane);
    if ((lane & ((32 >> LOG_R) - 1)) == 0) red[lane >> (5 - LOG_R)][warp] = v;
    bk_sum_warps<R, NT, FI>(red, yout, wp, fo);
}

// ---------------------------------------------------------------------------------------
// Block-K GEMV, pipelined ("_p" variants): the block's R rows go in G = R / P stages of P rows.
// A thread streams its chunks (t, t + NT, ...) stage by stage through a register ring of D
// stages, so D - 1 stages' weights (and scales) are in flight while one is summed; each X chunk
// is read once for all G stages. Per thread the sums run in the same order as
// gemv_int4_bk_core's (chunk by chunk), and the R partial sums meet across the warp in a
// transposing butterfly (the same xor pairs as warp_sum, so the same bits; R - 1 + 5 - log2 R
// shuffles instead of 5 R), then across warps in warp order: bit for bit the classic kernel of
// the same R and NT, in fewer registers than R rows' loads at once would take.
// ---------------------------------------------------------------------------------------
template <int R, int NT, int D, int P, int FI = 0, typename AW = NoAfterWait>
__device__ __forceinline__ void gemv_int4_bk_pipe(const uint4* __restrict__ W, const half* __restrict__ S,
                                                  const half* __restrict__ X, int N, int K, int gshift,
                                                  int n0, float* __restrict__ yout, FoldIn fi = FoldIn(),
                                                  FoldOut* fo = nullptr, AW after_wait = AW()) {
    constexpr int G = R / P;
    static_assert(R % P == 0 && G % D == 0 && D >= 2, "R / P stages, a multiple of the ring depth D");
    static_assert(R <= 32 && (R & (R - 1)) == 0, "R a power of 2, at most 32");
    constexpr int LOG_R = R >= 32 ? 5 : R >= 16 ? 4 : R >= 8 ? 3 : R >= 4 ? 2 : R >= 2 ? 1 : 0;
    __shared__ float red[R][NT / 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int chunks = K >> 5, groups = K >> gshift;
    const int iters = (chunks + NT - 1) / NT;  // the same for every thread of the block
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    uint4 q[D][P];
    float s[D][P];
    // stage `st` (rows n0 + st P ..) of chunk iteration j into ring slot `slot`
    const u32 wrow = (u32)chunks * 16u, srow = (u32)groups * 2u;  // bytes a row of W / of S
    auto load = [&](int slot, int j, int st, bool early) {
        const int c = tid + j * NT;
        if (c < chunks) {
            const uint4* wc = W + c;
            const half* sc = S + ((c << 5) >> gshift);
#pragma unroll
            for (int p = 0; p < P; ++p) {
                const int nr = min(n0 + st * P + p, N - 1);
                const uint4* wp = row_at(wc, nr, wrow);
                q[slot][p] = early ? ldg_stream_early(wp) : ldg_stream(wp);
                s[slot][p] = __half2float(*row_at(sc, nr, srow));
            }
        }
    };
    // the first D - 1 stages' weights before pdl_wait (they do not depend on the kernel before)
#pragma unroll
    for (int i = 0; i < D - 1; ++i) load(i, 0, i, true);
    pdl_wait();
    pdl_trigger();
    FoldLoads<R, NT, FI> fl;
    fl.issue(fi, tid, n0, N);
    after_wait();
    // X's chunk of iteration j (c = tid + j NT). The next iteration's is loaded with the next iteration's
    // first weights (session 19): loaded at its iteration's start, it was a dependent L1 / L2 round trip in
    // the middle of every thread of a several-iteration kernel (down, K = 14,336: 2 iterations), with one
    // ring stage of weights in flight.
    auto load_x = [&](int j, uint4* xv) {
        const int c = tid + j * NT;
        if (c < chunks) {
            const uint4* xp = reinterpret_cast<const uint4*>(X + (c << 5));
#pragma unroll
            for (int k = 0; k < 4; ++k) xv[k] = __ldg(xp + k);
        }
    };
    // Only in the 16-row, 4-rows-a-stage variants (128 registers or more): the next chunk's 16 registers spill
    // in the variants capped at 64-85 (NVRTC 12.9, sm_90: 16-128 bytes of stack, gate|up's r8_t128_u2_p1_b8 and
    // r16_t128_u2_p2_b6 among them); the others load it at their iteration's start as before.
    constexpr bool XN = R >= 16 && P >= 4;
    uint4 xv[4];
    if constexpr (XN) load_x(0, xv);
    for (int j = 0; j < iters; ++j) {
        const int c = tid + j * NT;
        const bool ok = c < chunks;
        if constexpr (!XN) load_x(j, xv);
        uint4 xn[4];
        const half2* xh = reinterpret_cast<const half2*>(xv);
#pragma unroll
        for (int st = 0; st < G; ++st) {
            const int ns = st + D - 1;  // the stage D - 1 ahead: this iteration's or the next one's
            if (ns < G) {
                load(ns % D, j, ns, false);
            } else if (j + 1 < iters) {
                load(ns % D, j + 1, ns - G, false);
                if (XN && ns == G) load_x(j + 1, xn);
            }
            if (ok) {
#pragma unroll
                for (int p = 0; p < P; ++p) acc[st * P + p] += dot_int4_chunk(q[st % D][p], xh) * s[st % D][p];
            }
        }
        if (XN && j + 1 < iters) {
#pragma unroll
            for (int k = 0; k < 4; ++k) xv[k] = xn[k];
        }
    }
    const float wp = fl.finish(fo);
    const float v = warp_sum_rows<R>(acc, lane);
    if ((lane & ((32 >> LOG_R) - 1)) == 0) red[lane >> (5 - LOG_R)][warp] = v;
    bk_sum_warps<R, NT, FI>(red, yout, wp, fo);
}

// The core an epilogue runs: classic (P = 0) or pipelined with P rows a stage and a ring of U.
template <int R, int NT, int U, int P, int FI = 0, typename AW = NoAfterWait>
__device__ __forceinline__ void gemv_int4_bk_any(const uint4* W, const half* S, const half* X, int N, int K,
                                                 int gshift, int n0, float* yout, FoldIn fi = FoldIn(),
                                                 FoldOut* fo = nullptr, AW after_wait = AW()) {
    if constexpr (P == 0) gemv_int4_bk_core<R, NT, U, FI>(W, S, X, N, K, gshift, n0, yout, fi, fo, after_wait);
    else gemv_int4_bk_pipe<R, NT, U, P, FI>(W, S, X, N, K, gshift, n0, yout, fi, fo, after_wait);
}

// A consumer's ratio inv / s in a thread t < R (fo.pss: the row's sum of squares, bk_sum_warps):
// inv = rsqrt(mean + eps), which block 0's thread 0 stores for the next producer (inv_out).
__device__ __forceinline__ float fold_ratio(const FoldOut& fo, float* inv_out, int H, float eps) {
    const float inv = rsqrtf(fo.pss / H + eps);
    if (blockIdx.x == 0 && threadIdx.x == 0) *inv_out = inv;
    return inv / fo.s;
}

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half(v)); }

template <int R, int NT, int U, int P>
__device__ __forceinline__ void gemv_int4_bk_st(const uint4* W, const half* S, const half* X, const half* bias,
                                                void* Y, int N, int K, int gshift, int out_f32) {
    __shared__ float yo[R];
    const int n0 = blockIdx.x * R;
    gemv_int4_bk_any<R, NT, U, P>(W, S, X, N, K, gshift, n0, yo);
    const int t = threadIdx.x, n = n0 + t;
    if (t < R && n < N) {
        float v = yo[t] + (bias ? __half2float(bias[n]) : 0.f);
        if (out_f32) reinterpret_cast<float*>(Y)[n] = v;
        else reinterpret_cast<half*>(Y)[n] = __float2half(v);
    }
}

// FI: X is a folded X' (see gemv_int4_bk_fold); each output is scaled by inv / s before its rounding.
template <int R, int NT, int U, int P, bool FI = false>
__device__ __forceinline__ void gemv_int4_bk_glu(const uint4* W, const half* S, const half* X, const half* bias,
                                                 half* act, int N, int K, int gshift, FoldIn fi = FoldIn(),
                                                 float* inv_out = nullptr, float eps = 0.f) {
    __shared__ float yo[R];
    const int n0 = blockIdx.x * R;
    FoldOut fo;
    gemv_int4_bk_any<R, NT, U, P, FI ? FOLD_CONSUMER : 0>(W, S, X, N, K, gshift, n0, yo, fi, &fo);
    float ratio = 1.f;
    const int t = threadIdx.x, n = n0 + 2 * t;
    if constexpr (FI) {
        if (t < R / 2) ratio = fold_ratio(fo, inv_out, K, eps);
    }
    auto y = [&](int i) { if constexpr (FI) return yo[i] * ratio; else return yo[i]; };
    if (t < R / 2 && n + 1 < N) {
        const float g = round_half(y(2 * t) + (bias ? __half2float(bias[n]) : 0.f));
        const float u = round_half(y(2 * t + 1) + (bias ? __half2float(bias[n + 1]) : 0.f));
        act[n >> 1] = __float2half(g / (1.f + __expf(-g)) * u);
    }
}

template <int R, int NT, int U, int P>
__device__ __forceinline__ void gemv_int4_bk_res(const uint4* W, const half* S, const half* X, const half* bias,
                                                 float* res, const half* __restrict__ nw, half* hout,
                                                 unsigned* counter, int N, int K, int gshift, float eps) {
    __shared__ float yo[R];
    __shared__ float red[32];
    __shared__ bool last;
    const int n0 = blockIdx.x * R;
    gemv_int4_bk_any<R, NT, U, P>(W, S, X, N, K, gshift, n0, yo);
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

// The producer of a folded RMSNorm ("fold"): res[n] += half(v) as _res, then, instead of the norm,
// X'[n] = half(res[n] * s * w[n]) with s = 1 / rms of the previous norm (the row before this
// linear's add) x 2^-8, and this block's sum of its rows' res^2 into parts[block]. The next GEMV (a
// "gluf" / "ropef" consumer) sums the parts into the row's rms and scales its dot products with X'
// by inv / s: add_rmsnorm + GEMV's function without the norm's launch, X' rounded at another scale
// (not the same bits). The 2^-8 keeps X' and the consumer's half sums of 8 products (int4 values up
// to 8) in range while the row's rms grows up to ~2^8 x between two norms (the random Llama-3-8B's
// first layer: ~800 x, bench/CUDA_NOTES.md session 11); elements below ~2^-6 of the rms become
// subnormal in X' (absolute error ~2^-17 of the rms: below a normal element's rounding).
template <int R, int NT, int U, int P>
__device__ __forceinline__ void gemv_int4_bk_fold(const uint4* W, const half* S, const half* X, const half* bias,
                                                  float* res, const half* __restrict__ nw, half* hout, float* parts,
                                                  const float* sprev, int N, int K, int gshift) {
    static_assert(R <= 32, "a block's rows in its first warp");
    __shared__ float yo[R];
    const int n0 = blockIdx.x * R;
    FoldOut fo;
    gemv_int4_bk_any<R, NT, U, P, FOLD_PRODUCER>(W, S, X, N, K, gshift, n0, yo, FoldIn{nullptr, sprev, 0, res, nw}, &fo);
    const int t = threadIdx.x, n = n0 + t;
    if (t >= 32) return;
    float sq = 0.f;
    if (t < R && n < N) {
        const float r = fo.r_old + round_half(yo[t] + (bias ? __half2float(bias[n]) : 0.f));
        res[n] = r;
        hout[n] = __float2half(r * fo.s * fo.w);
        sq = r * r;
    }
    // warp_sum's levels below R only: lanes t >= R hold +0, and x + 0 = x, so the same bits (session 19)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        if (o < R) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if (t == 0) parts[blockIdx.x] = sq;
}

template <int R, int NT, int U, int P, bool FI = false>
__device__ __forceinline__ void gemv_int4_bk_rope(const uint4* W, const half* S, const half* X, const half* bias,
                                                  const int* __restrict__ pos, const int* __restrict__ slots,
                                                  const float* __restrict__ cosb, const float* __restrict__ sinb,
                                                  half* q_out, half* kc, half* vc, int N, int K, int gshift,
                                                  int Hq, int Hkv, int D, FoldIn fi = FoldIn(), float* inv_out = nullptr,
                                                  float eps = 0.f) {
    __shared__ float yo[R];
    const int n0 = blockIdx.x * R;
    const int t = threadIdx.x, n = n0 + 2 * t;
    const int h = n / D, half_d = D >> 1, i = (n % D) >> 1;
    // The position and the slot are the step's inputs (written only by the host or by the previous step's
    // advance_inputs, at least two kernels back), cos / sin constant tables. Every step kernel calls pdl_wait
    // before pdl_trigger, so this kernel starts only after the kernel before has waited on its own
    // predecessor: those writes are done. The rotating threads therefore load the position and slot before the
    // core's pdl_wait and cos / sin right after it, while the weights stream (session 18; before, the epilogue
    // loaded them: two dependent L2 round trips at every block's end, pos then cos / sin). The same reasoning
    // as paged attention's early loads of ctx_lens and block tables (attention.cu).
    int p = 0, slot = -1;
    float c = 1.f, sn = 0.f;
    if (t < R / 2) {
        p = ld_nc_early_s32(pos);
        slot = ld_nc_early_s32(slots);
    }
    auto after_wait = [&] {
        if (t < R / 2 && n + 1 < N && h < Hq + Hkv) {
            c = ld_nc_early(cosb + (long long)p * half_d + i);
            sn = ld_nc_early(sinb + (long long)p * half_d + i);
        }
    };
    FoldOut fo;
    gemv_int4_bk_any<R, NT, U, P, FI ? FOLD_CONSUMER : 0>(W, S, X, N, K, gshift, n0, yo, fi, &fo, after_wait);
    if (t >= R / 2) return;
    float ratio = 1.f;
    if constexpr (FI) ratio = fold_ratio(fo, inv_out, K, eps);
    auto y = [&](int i) { if constexpr (FI) return yo[i] * ratio; else return yo[i]; };
    if (n + 1 >= N) return;
    const float x1 = round_half(y(2 * t) + (bias ? __half2float(bias[n]) : 0.f));
    const float x2 = round_half(y(2 * t + 1) + (bias ? __half2float(bias[n + 1]) : 0.f));
    if (h < Hq + Hkv) {
        const half o1 = __float2half(x1 * c - x2 * sn), o2 = __float2half(x2 * c + x1 * sn);
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

#define BK_INSTANCES_P(R, NT, U, P, SUF, MINB)                                                                        \
    extern "C" __global__ void __launch_bounds__(NT, MINB) gemv_int4_bk_r##R##_t##NT##_u##U##SUF##_st(                 \
        const uint4* W, const half* S, const half* X, const half* bias, void* Y, int N, int K,       \
        int gshift, int out_f32) {                                                                   \
        gemv_int4_bk_st<R, NT, U, P>(W, S, X, bias, Y, N, K, gshift, out_f32); }                           \
    extern "C" __global__ void __launch_bounds__(NT, MINB) gemv_int4_bk_r##R##_t##NT##_u##U##SUF##_glu(                \
        const uint4* W, const half* S, const half* X, const half* bias, half* act, int N, int K,     \
        int gshift) {                                                                                \
        gemv_int4_bk_glu<R, NT, U, P>(W, S, X, bias, act, N, K, gshift); }                                 \
    extern "C" __global__ void __launch_bounds__(NT, MINB) gemv_int4_bk_r##R##_t##NT##_u##U##SUF##_res(                \
        const uint4* W, const half* S, const half* X, const half* bias, float* res, const half* nw,  \
        half* hout, unsigned* counter, int N, int K, int gshift, float eps) {                        \
        gemv_int4_bk_res<R, NT, U, P>(W, S, X, bias, res, nw, hout, counter, N, K, gshift, eps); }         \
    extern "C" __global__ void __launch_bounds__(NT, MINB) gemv_int4_bk_r##R##_t##NT##_u##U##SUF##_rope(               \
        const uint4* W, const half* S, const half* X, const half* bias, const int* pos,              \
        const int* slots, const float* cosb, const float* sinb, half* q_out, half* kc, half* vc,     \
        int N, int K, int gshift, int Hq, int Hkv, int D) {                                          \
        gemv_int4_bk_rope<R, NT, U, P>(W, S, X, bias, pos, slots, cosb, sinb, q_out, kc, vc, N, K, gshift, \
                                 Hq, Hkv, D); }                                                 \
    extern "C" __global__ void __launch_bounds__(NT, MINB) gemv_int4_bk_r##R##_t##NT##_u##U##SUF##_fold(               \
        const uint4* W, const half* S, const half* X, const half* bias, float* res, const half* nw,  \
        half* hout, float* parts, const float* sprev, int N, int K, int gshift) {                     \
        gemv_int4_bk_fold<R, NT, U, P>(W, S, X, bias, res, nw, hout, parts, sprev, N, K, gshift); }         \
    extern "C" __global__ void __launch_bounds__(NT, MINB) gemv_int4_bk_r##R##_t##NT##_u##U##SUF##_gluf(               \
        const uint4* W, const half* S, const half* X, const half* bias, half* act, const float* parts, \
        const float* sprev, float* inv_out, int nparts, int N, int K, int gshift, float eps) {        \
        gemv_int4_bk_glu<R, NT, U, P, true>(W, S, X, bias, act, N, K, gshift, FoldIn{parts, sprev, nparts, nullptr, nullptr}, \
                                            inv_out, eps); }                                          \
    extern "C" __global__ void __launch_bounds__(NT, MINB) gemv_int4_bk_r##R##_t##NT##_u##U##SUF##_ropef(              \
        const uint4* W, const half* S, const half* X, const half* bias, const int* pos,              \
        const int* slots, const float* cosb, const float* sinb, half* q_out, half* kc, half* vc,     \
        const float* parts, const float* sprev, float* inv_out, int nparts, int N, int K, int gshift, \
        int Hq, int Hkv, int D, float eps) {                                                          \
        gemv_int4_bk_rope<R, NT, U, P, true>(W, S, X, bias, pos, slots, cosb, sinb, q_out, kc, vc, N, K, \
                                             gshift, Hq, Hkv, D, FoldIn{parts, sprev, nparts, nullptr, nullptr}, inv_out, eps); }

#define BK_INSTANCES(R, NT, U) BK_INSTANCES_P(R, NT, U, 0, , 1)
#define BK_PIPE_INSTANCES(R, NT, U, P, MINB) BK_INSTANCES_P(R, NT, U, P, _p##P##_b##MINB, MINB)

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
BK_INSTANCES(16, 64, 1)
BK_INSTANCES(16, 128, 1)
BK_INSTANCES(16, 256, 1)
// pipelined (R, NT, ring U, P rows a stage, blocks an SM the registers are capped for): keep in step with
// kernels.BK_PIPE_VARIANTS
BK_PIPE_INSTANCES(16, 128, 2, 2, 4)
BK_PIPE_INSTANCES(16, 128, 2, 2, 6)
BK_PIPE_INSTANCES(16, 128, 2, 4, 4)
BK_PIPE_INSTANCES(16, 256, 2, 4, 2)
BK_PIPE_INSTANCES(16, 64, 2, 4, 8)
BK_PIPE_INSTANCES(8, 256, 2, 2, 3)
BK_PIPE_INSTANCES(8, 128, 2, 2, 6)
BK_PIPE_INSTANCES(16, 256, 2, 2, 3)
BK_PIPE_INSTANCES(8, 128, 4, 2, 5)
BK_PIPE_INSTANCES(8, 128, 4, 1, 6)
BK_PIPE_INSTANCES(8, 128, 2, 1, 8)
BK_PIPE_INSTANCES(16, 128, 4, 2, 4)
BK_PIPE_INSTANCES(16, 256, 4, 2, 2)
BK_PIPE_INSTANCES(8, 256, 4, 1, 3)
BK_PIPE_INSTANCES(8, 448, 2, 1, 2)
BK_PIPE_INSTANCES(4, 128, 2, 1, 8)
BK_PIPE_INSTANCES(8, 64, 2, 2, 12)
BK_PIPE_INSTANCES(16, 224, 2, 4, 2)

// (MT, rows per warp R): keep in step with kernels.GEMV_ROWS_PER_WARP
GEMV_INSTANCES(1, 1)
GEMV_INSTANCES(2, 1)
GEMV_INSTANCES(4, 2)
GEMV_INSTANCES(8, 4)
GEMV_INSTANCES(16, 4)

