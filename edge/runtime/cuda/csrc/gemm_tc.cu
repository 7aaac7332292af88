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

// One iteration J of a warp: dequantize its weight chunks (wq) and run the k16 steps' mma.
template <int BITS, int MT, int NT>
__device__ __forceinline__ void tc_iter(float (&acc)[MT][NT][4], const uint4 (&wq)[NT], const half* const (&xrow)[MT][2],
                                        const half* __restrict__ S, const int (&nrow)[NT], int groups, int gshift, int J, int c) {
    constexpr int KJ = BITS == 4 ? 128 : 64;
    constexpr int KC = KJ / 4;
    constexpr int PAIRS = KJ / 32;
    half2 sc[NT];
    if (BITS == 4) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) sc[nt] = __half2half2(__ldg(S + (long long)nrow[nt] * groups + ((J * KJ + c * KC) >> gshift)));
    }
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
        uint4 xa[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) xa[mt][h] = __ldg(reinterpret_cast<const uint4*>(xrow[mt][h] + J * KJ + 8 * p));
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

template <int BITS, int MT, int NT, int DEPTH>
__device__ __forceinline__ void gemm_tc(const uint4* __restrict__ W, const half* __restrict__ S,
                                        const half* __restrict__ X, const half* __restrict__ bias,
                                        void* __restrict__ Y, float* __restrict__ ws, unsigned* __restrict__ tickets,
                                        int M, int N, int K, int gshift, int ldy, int out_f32) {
    constexpr int KJ = BITS == 4 ? 128 : 64;  // K per iteration of the warp
    constexpr int KC = KJ / 4;  // K per lane per iteration (one 16-byte weight chunk)
    __shared__ bool last;
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
    // C fragment: acc[..][0..1] at (row g, cols 2c, 2c+1), acc[..][2..3] at row g + 8
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
