// ---------------------------------------------------------------------------------------
// Small-batch GEMM on tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate) with the
// int4 / int8 dequantization in registers: Y[m, n] = sum_k X[m, k] W[n, k], M = 2..64.
// Reads the weights in the layout the GEMVs read (no second copy): int4 repacked words
// [N, K/8] (see repack_int4), int8 bytes [N, K].
//
// The K order inside a warp is permuted (a GEMM's sum does not care, as long as X and W use
// the same permutation), so that each lane's one 16-byte weight load feeds its B fragments
// directly. For an iteration J over KJ = 128 (int4) or 64 (int8) values of K, lane (g, c)
// (g = lane / 4 = the fragment's n or m row, c = lane % 4) loads chunk 4J + c of its weight row:
// K range [J*KJ + c*KC, + KC), KC = KJ / 4. In k16 step s, the mma's logical k pairs map to
//     b0 (k 2c, 2c+1)   <- physical J*KJ + c*KC + 4s + {0, 1}
//     b1 (k 2c+8, 2c+9) <- physical J*KJ + c*KC + 4s + {2, 3}
// a function of the logical k alone, so A (X, rows g and g + 8) takes the same four halves
// X[row][J*KJ + c*KC + 4s .. + 3] as (a0, a2) / (a1, a3); two steps are one 16-byte load.
// int4 repacked word w holds pairs p = 0..3 (elements 2p, 2p+1): steps 2w and 2w+1 use pairs
// (0, 1) and (2, 3); int8 word s holds (k 4s..4s+3) = (b0, b1) of step s.
//
// Block = GEMM_WARPS warps, each NT n8-tiles (NT * 8 output columns) and MT m16-tiles;
// gridDim.z tiles M past MT * 16 rows (prefill). gridDim.y splits K (enough blocks to fill the GPU for short-N layers): each split writes
// float partials ws[split, m, n]; the last block of a column (ticket counter, reset by it)
// sums them in split order and applies the epilogue, so results do not depend on timing.
// Each output is one dot product in a fixed order whatever M and the other rows are (the
// split count depends on the weight shape alone): a row's result is batch-invariant.
// X (<= 64 rows) is read through L1 (__ldg), weights stream past it (ldg_stream).
// ---------------------------------------------------------------------------------------
#define GEMM_WARPS 4
// DEPTH: weight iterations in flight per warp (2, or 4 for the m1 instances "_d4": a 16-row layer
// GEMM is latency-bound, few warps per SM; the autotuner picks per shape). The J order, and so
// every sum, is the same at any depth.

// One iteration J of a warp: dequantize its weight chunks (wq; int4: times the lane's group
// scales sc) and run the k16 steps' mma.
template <int BITS, int MT, int NT, bool XSHARED = false>
__device__ __forceinline__ void tc_math(float (&acc)[MT][NT][4], const uint4 (&wq)[NT], const half* const (&xrow)[MT][2],
                                        const half2 (&sc)[NT], int J) {
    constexpr int KJ = BITS == 4 ? 128 : 64;
    constexpr int PAIRS = KJ / 32;
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
        uint4 xa[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint4* xp = reinterpret_cast<const uint4*>(xrow[mt][h] + J * KJ + 8 * p);
                xa[mt][h] = XSHARED ? *xp : __ldg(xp);  // XSHARED: xrow points into shared memory, J is block-relative
            }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            u32 b[4];  // (b0, b1) of step 2p, then of step 2p + 1
            const u32* wv = reinterpret_cast<const u32*>(&wq[nt]);
            if (BITS == 4) {
                half2 d[4];
                deq_int4_word(wv[p], d);
#pragma unroll
                for (int e = 0; e < 4; ++e) b[e] = h2_as_u32(__hmul2(d[e], sc[nt]));
            } else {
                half2 d[2];
                deq_int8_word(wv[2 * p], d);
                b[0] = h2_as_u32(d[0]);
                b[1] = h2_as_u32(d[1]);
                deq_int8_word(wv[2 * p + 1], d);
                b[2] = h2_as_u32(d[0]);
                b[3] = h2_as_u32(d[1]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816(acc[mt][nt], xa[mt][0].x, xa[mt][1].x, xa[mt][0].y, xa[mt][1].y, b[0], b[1]);
                mma_16816(acc[mt][nt], xa[mt][0].z, xa[mt][1].z, xa[mt][0].w, xa[mt][1].w, b[2], b[3]);
            }
        }
    }
}

// The lane's int4 group-scale index for weight row `row` in iteration J (one group per lane per
// iteration: groups are >= 32 = KC values).
template <int BITS>
__device__ __forceinline__ long long tc_scale_index(int row, int groups, int gshift, int J, int c) {
    constexpr int KJ = BITS == 4 ? 128 : 64;
    return (long long)row * groups + ((J * KJ + c * (KJ / 4)) >> gshift);
}

template <int BITS, int MT, int NT>
__device__ __forceinline__ void tc_iter(float (&acc)[MT][NT][4], const uint4 (&wq)[NT], const half* const (&xrow)[MT][2],
                                        const half* __restrict__ S, const int (&nrow)[NT], int groups, int gshift, int J, int c) {
    half2 sc[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        sc[nt] = BITS == 4 ? __half2half2(__ldg(S + tc_scale_index<BITS>(nrow[nt], groups, gshift, J, c))) : __float2half2_rn(1.f);
    tc_math<BITS, MT, NT>(acc, wq, xrow, sc, J);
}

// The end of a launch: split-K partials and the last block's ordered sum (splits > 1), then the
// int8 scale, bias and the store. C fragment: acc[..][0..1] at (row g, cols 2c, 2c+1), [2..3] row g + 8.
template <int BITS, int MT, int NT>
__device__ __forceinline__ void tc_finish(float (&acc)[MT][NT][4], const half* __restrict__ S, const half* __restrict__ bias,
                                          void* __restrict__ Y, float* __restrict__ ws, unsigned* __restrict__ tickets,
                                          int M, int N, int m0, int nbase, int g, int c, unsigned ticket, int ldy, int out_f32) {
    __shared__ bool last;
    const int splits = gridDim.y, sp = blockIdx.y;
    if (splits > 1) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int m = m0 + mt * 16 + g + 8 * (e >> 1), n = nbase + nt * 8 + 2 * c + (e & 1);
                    if (m < M && n < N) ws[((long long)sp * M + m) * N + n] = acc[mt][nt][e];
                }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(tickets + ticket, 1u) == (unsigned)splits - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        // split-major: the MT * NT * 4 loads of one split are independent and go out together
        // (output-major, each output's `splits` loads ran one L2 round trip after another:
        // ~13 us of a 16-row layer GEMM). Each output still sums its splits in order 0, 1, ...
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float* wsp = ws + (long long)s * M * N;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int m = m0 + mt * 16 + g + 8 * (e >> 1), n = nbase + nt * 8 + 2 * c + (e & 1);
                        if (m < M && n < N) acc[mt][nt][e] += __ldcg(wsp + (long long)m * N + n);
                    }
        }
        if (threadIdx.x == 0) tickets[ticket] = 0u;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + mt * 16 + g + 8 * (e >> 1), n = nbase + nt * 8 + 2 * c + (e & 1);
                if (m < M && n < N) {
                    float v = acc[mt][nt][e];
                    if (BITS == 8) v *= __half2float(S[n]);
                    if (bias) v += __half2float(bias[n]);
                    if (out_f32) reinterpret_cast<float*>(Y)[(long long)m * ldy + n] = v;
                    else reinterpret_cast<half*>(Y)[(long long)m * ldy + n] = __float2half(v);
                }
            }
}

template <int BITS, int MT, int NT, int DEPTH>
__device__ __forceinline__ void gemm_tc(const uint4* __restrict__ W, const half* __restrict__ S,
                                        const half* __restrict__ X, const half* __restrict__ bias,
                                        void* __restrict__ Y, float* __restrict__ ws, unsigned* __restrict__ tickets,
                                        int M, int N, int K, int gshift, int ldy, int out_f32) {
    constexpr int KJ = BITS == 4 ? 128 : 64;  // K per iteration of the warp
    constexpr int KC = KJ / 4;  // K per lane per iteration (one 16-byte weight chunk)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int nbase = (blockIdx.x * GEMM_WARPS + warp) * NT * 8;
    const int m0 = blockIdx.z * MT * 16;
    const unsigned ticket = blockIdx.z * gridDim.x + blockIdx.x;
    const int splits = gridDim.y, sp = blockIdx.y;
    const int iters = K / KJ;
    const int j0 = (int)((long long)iters * sp / splits), j1 = (int)((long long)iters * (sp + 1) / splits);
    const int chunks = K / KC;  // 16-byte chunks per weight row
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    const uint4* wrow[NT];
    int nrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        nrow[nt] = min(nbase + nt * 8 + g, N - 1);  // rows past N load row N-1, never written
        wrow[nt] = W + (long long)nrow[nt] * chunks + c;
    }
    const half* xrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) xrow[mt][h] = X + (long long)min(m0 + mt * 16 + g + 8 * h, M - 1) * K + c * KC;
    const int groups = K >> gshift;
    // Software pipeline: DEPTH iterations' weights in flight per warp (a ring of register
    // slots, static indices: the J loop is unrolled by the depth); each slot is refilled with
    // the iteration DEPTH ahead before its own math runs.
    uint4 wbuf[DEPTH][NT];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
        if (j0 + d < j1)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) wbuf[d][nt] = ldg_stream(wrow[nt] + 4 * (j0 + d));
    for (int J0 = j0; J0 < j1; J0 += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            const int J = J0 + d;
            if (J < j1) {
                uint4 wq[NT];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) wq[nt] = wbuf[d][nt];
                if (J + DEPTH < j1)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) wbuf[d][nt] = ldg_stream(wrow[nt] + 4 * (J + DEPTH));
                tc_iter<BITS, MT, NT>(acc, wq, xrow, S, nrow, groups, gshift, J, c);
            }
        }
    }
    tc_finish<BITS, MT, NT>(acc, S, bias, Y, ws, tickets, M, N, m0, nbase, g, c, ticket, ldy, out_f32);
}

// The same GEMM (one m16-tile per warp, MT = 1) with the weights and the int4 group scales
// streamed through a per-warp shared-memory ring of STAGES iterations by cp.async, instead of
// a ring of DEPTH register slots: STAGES - 1 iterations (and their scales) are in flight per
// warp at no register cost, so a warp waits on memory once at its start, not on every
// iteration's scale load (the register kernel loads each iteration's scales when it uses them).
// Each lane copies and reads back only its own slots (its 16-byte chunk per n8-tile, the 4-byte
// word holding its scale), so the ring needs no barrier. X: the block's 16 rows over its K range
// are copied to shared memory once, before the ring starts (one round trip for all iterations;
// gemm_tc reads X through L1 in every iteration, an L2 round trip per iteration on the critical
// path of a warp's short K loop), rows padded by 16 bytes. The J order and each iteration's math
// are gemm_tc's: the same bits as gemm_int*_tc_m1 at any depth.
// Dynamic shared memory: ring GEMM_WARPS * STAGES * NT * 32 * (16 + 4 (int4 scales)) bytes, then
// X 16 * (krange + 8) halves, krange = ceil(iterations / splits) * KJ (gemm.py: async_smem).
template <int BITS, int NT, int STAGES>
__device__ __forceinline__ void gemm_tc_async(const uint4* __restrict__ W, const half* __restrict__ S,
                                              const half* __restrict__ X, const half* __restrict__ bias,
                                              void* __restrict__ Y, float* __restrict__ ws, unsigned* __restrict__ tickets,
                                              int M, int N, int K, int gshift, int ldy, int out_f32) {
    constexpr int KJ = BITS == 4 ? 128 : 64;
    constexpr int KC = KJ / 4;
    extern __shared__ uint4 tc_ring[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int nbase = (blockIdx.x * GEMM_WARPS + warp) * NT * 8;
    const int m0 = blockIdx.z * 16;
    const unsigned ticket = blockIdx.z * gridDim.x + blockIdx.x;
    const int splits = gridDim.y, sp = blockIdx.y;
    const int iters = K / KJ;
    const int j0 = (int)((long long)iters * sp / splits), j1 = (int)((long long)iters * (sp + 1) / splits);
    const int chunks = K / KC;
    const int groups = K >> gshift;
    float acc[1][NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][nt][e] = 0.f;
    const uint4* wrow[NT];
    int nrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        nrow[nt] = min(nbase + nt * 8 + g, N - 1);
        wrow[nt] = W + (long long)nrow[nt] * chunks + c;
    }
    // this warp's ring: [STAGES][NT][32 lanes] 16-byte weight chunks, then (int4) [STAGES][NT][32] scale words
    uint4* wr = tc_ring + warp * STAGES * NT * 32;
    u32* sr = reinterpret_cast<u32*>(tc_ring + GEMM_WARPS * STAGES * NT * 32) + warp * STAGES * NT * 32;
    // the block's X: [16 rows][XS halves], columns [j0 * KJ, j1 * KJ) of K (rows past M repeat row M - 1)
    half* xs = reinterpret_cast<half*>(tc_ring + GEMM_WARPS * STAGES * NT * 32 * (BITS == 4 ? 5 : 4) / 4);
    const int kr = (j1 - j0) * KJ, kmax = ((iters + splits - 1) / splits) * KJ, XS = kmax + 8;
    for (int i = threadIdx.x; i < 16 * (kr / 8); i += blockDim.x) {
        const int r = i / (kr / 8), ch = i % (kr / 8);
        cp_async16_ordered(xs + r * XS + ch * 8, X + (long long)min(m0 + r, M - 1) * K + j0 * KJ + ch * 8);
    }
    cp_async_commit_ordered();
    const half* xrow[1][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) xrow[0][h] = xs + (g + 8 * h) * XS + c * KC;
    auto issue = [&](int J, int slot) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) cp_async16_ordered(wr + (slot * NT + nt) * 32 + lane, wrow[nt] + 4 * J);
        if (BITS == 4) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)  // the aligned word holding the scale (its other half is a neighbour's)
                cp_async4_ordered(sr + (slot * NT + nt) * 32 + lane, S + (tc_scale_index<BITS>(nrow[nt], groups, gshift, J, c) & ~1ll));
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (j0 + s < j1) issue(j0 + s, s);
        cp_async_commit_ordered();  // empty groups keep the count uniform
    }
    cp_async_wait_ordered<STAGES - 1>();  // this thread's part of X has landed (the group before the ring's)
    __syncthreads();  // ... and every thread's
    for (int J = j0; J < j1; ++J) {
        const int it = J - j0;
        if (J + STAGES - 1 < j1) issue(J + STAGES - 1, (it + STAGES - 1) % STAGES);  // the slot read last iteration
        cp_async_commit_ordered();
        cp_async_wait_ordered<STAGES - 1>();  // iteration J's group has landed
        const int slot = it % STAGES;
        uint4 wq[NT];
        half2 sc[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            wq[nt] = wr[(slot * NT + nt) * 32 + lane];
            if (BITS == 4) {
                const u32 w = sr[(slot * NT + nt) * 32 + lane];
                const half2 pair = u32_as_h2(w);
                sc[nt] = (tc_scale_index<BITS>(nrow[nt], groups, gshift, J, c) & 1) ? __high2half2(pair) : __low2half2(pair);
            } else {
                sc[nt] = __float2half2_rn(1.f);
            }
        }
        tc_math<BITS, 1, NT, true>(acc, wq, xrow, sc, J - j0);
    }
    cp_async_wait_ordered<0>();
    tc_finish<BITS, 1, NT>(acc, S, bias, Y, ws, tickets, M, N, m0, nbase, g, c, ticket, ldy, out_f32);
}

#define GEMM_TC_ASYNC_INSTANCE(NAME, BITS, NT, STAGES)                                                          \
    extern "C" __global__ void __launch_bounds__(GEMM_WARPS * 32) NAME(                                         \
        const uint4* W, const half* S, const half* X, const half* bias, void* Y, float* ws, unsigned* tickets, \
        int M, int N, int K, int gshift, int ldy, int out_f32) {                                               \
        gemm_tc_async<BITS, NT, STAGES>(W, S, X, bias, Y, ws, tickets, M, N, K, gshift, ldy, out_f32);         \
    }
GEMM_TC_ASYNC_INSTANCE(gemm_int4_tc_m1_a4, 4, 4, 4)
GEMM_TC_ASYNC_INSTANCE(gemm_int4_tc_m1_a8, 4, 4, 8)
GEMM_TC_ASYNC_INSTANCE(gemm_int8_tc_m1_a4, 8, 4, 4)
GEMM_TC_ASYNC_INSTANCE(gemm_int8_tc_m1_a8, 8, 4, 8)

// The 16-row GEMM with K split across the warps of a block instead of across blocks: block =
// KB_WARPS warps on the same NT * 8 columns, warp w takes the w-th contiguous share of the K
// iterations (a register ring of its weights and group scales, 2 deep), and the partial sums
// meet in shared memory, added by warp 0 in warp order (no split-K workspace, no ticket, no
// second pass over global memory). Why: at 16 rows gemm_tc is bound by per-warp latency at low
// occupancy (a warp's iteration of dequantization + 32 mma.sync takes ~1 us alone on its
// scheduler); global K splits add warps but also the partials' round trips (bench/CUDA_NOTES.md,
// session 7). One K split, so gridDim.y == 1. The sums differ from gemm_tc's (another
// association), and are the same whatever M: a row's result does not depend on its batch.
#define KB_WARPS 8
template <int BITS, int NT>
__device__ __forceinline__ void gemm_tc_kb(const uint4* __restrict__ W, const half* __restrict__ S,
                                           const half* __restrict__ X, const half* __restrict__ bias,
                                           void* __restrict__ Y, float* __restrict__ ws, unsigned* __restrict__ tickets,
                                           int M, int N, int K, int gshift, int ldy, int out_f32) {
    constexpr int KJ = BITS == 4 ? 128 : 64;
    constexpr int KC = KJ / 4;
    constexpr int DEPTH = 2;
    __shared__ float red[KB_WARPS - 1][NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int nbase = blockIdx.x * NT * 8;
    const int m0 = blockIdx.z * 16;
    const int iters = K / KJ;
    const int j0 = (int)((long long)iters * warp / KB_WARPS), j1 = (int)((long long)iters * (warp + 1) / KB_WARPS);
    const int chunks = K / KC;
    const int groups = K >> gshift;
    float acc[1][NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][nt][e] = 0.f;
    const uint4* wrow[NT];
    int nrow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        nrow[nt] = min(nbase + nt * 8 + g, N - 1);
        wrow[nt] = W + (long long)nrow[nt] * chunks + c;
    }
    const half* xrow[1][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) xrow[0][h] = X + (long long)min(m0 + g + 8 * h, M - 1) * K + c * KC;
    // the register ring holds each iteration's weights and (int4) group scales, DEPTH ahead
    uint4 wbuf[DEPTH][NT];
    half sbuf[DEPTH][NT];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
        if (j0 + d < j1)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                wbuf[d][nt] = ldg_stream(wrow[nt] + 4 * (j0 + d));
                if (BITS == 4) sbuf[d][nt] = __ldg(S + tc_scale_index<BITS>(nrow[nt], groups, gshift, j0 + d, c));
            }
    for (int J0 = j0; J0 < j1; J0 += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) {
            const int J = J0 + d;
            if (J < j1) {
                uint4 wq[NT];
                half2 sc[NT];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    wq[nt] = wbuf[d][nt];
                    sc[nt] = BITS == 4 ? __half2half2(sbuf[d][nt]) : __float2half2_rn(1.f);
                }
                if (J + DEPTH < j1)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        wbuf[d][nt] = ldg_stream(wrow[nt] + 4 * (J + DEPTH));
                        if (BITS == 4) sbuf[d][nt] = __ldg(S + tc_scale_index<BITS>(nrow[nt], groups, gshift, J + DEPTH, c));
                    }
                tc_math<BITS, 1, NT>(acc, wq, xrow, sc, J);
            }
        }
    }
    if (warp > 0)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) red[warp - 1][nt * 4 + e][lane] = acc[0][nt][e];
    __syncthreads();
    if (warp > 0) return;  // no barrier after this point
#pragma unroll
    for (int w = 0; w < KB_WARPS - 1; ++w)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[0][nt][e] += red[w][nt * 4 + e][lane];
    tc_finish<BITS, 1, NT>(acc, S, bias, Y, ws, tickets, M, N, m0, nbase, g, c, 0u, ldy, out_f32);  // gridDim.y == 1: stores only
}

#define GEMM_TC_KB_INSTANCE(NAME, BITS, NT)                                                                     \
    extern "C" __global__ void __launch_bounds__(KB_WARPS * 32) NAME(                                          \
        const uint4* W, const half* S, const half* X, const half* bias, void* Y, float* ws, unsigned* tickets, \
        int M, int N, int K, int gshift, int ldy, int out_f32) {                                               \
        gemm_tc_kb<BITS, NT>(W, S, X, bias, Y, ws, tickets, M, N, K, gshift, ldy, out_f32);                    \
    }
GEMM_TC_KB_INSTANCE(gemm_int4_tc_kb2, 4, 2)
GEMM_TC_KB_INSTANCE(gemm_int4_tc_kb4, 4, 4)
GEMM_TC_KB_INSTANCE(gemm_int8_tc_kb2, 8, 2)
GEMM_TC_KB_INSTANCE(gemm_int8_tc_kb4, 8, 4)

#define GEMM_TC_INSTANCE(NAME, BITS, MT, NT, DEPTH)                                                               \
    extern "C" __global__ void __launch_bounds__(GEMM_WARPS * 32) NAME(                                         \
        const uint4* W, const half* S, const half* X, const half* bias, void* Y, float* ws, unsigned* tickets, \
        int M, int N, int K, int gshift, int ldy, int out_f32) {                                               \
        gemm_tc<BITS, MT, NT, DEPTH>(W, S, X, bias, Y, ws, tickets, M, N, K, gshift, ldy, out_f32);            \
    }
GEMM_TC_INSTANCE(gemm_int4_tc_m1, 4, 1, 4, 2)
GEMM_TC_INSTANCE(gemm_int4_tc_m2, 4, 2, 4, 2)
GEMM_TC_INSTANCE(gemm_int4_tc_m4, 4, 4, 4, 2)
GEMM_TC_INSTANCE(gemm_int8_tc_m1, 8, 1, 4, 2)
GEMM_TC_INSTANCE(gemm_int8_tc_m2, 8, 2, 4, 2)
GEMM_TC_INSTANCE(gemm_int8_tc_m4, 8, 4, 4, 2)
GEMM_TC_INSTANCE(gemm_int4_tc_m1_d4, 4, 1, 4, 4)
GEMM_TC_INSTANCE(gemm_int8_tc_m1_d4, 8, 1, 4, 4)
