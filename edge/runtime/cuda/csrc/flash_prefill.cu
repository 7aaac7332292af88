// ---------------------------------------------------------------------------------------
// Prefill attention on tensor cores (flash attention, FA2 shape): causal, GQA, over the paged
// KV cache. One block = NW warps x MI m16-tiles of queries of one q head (4 x 1: 64 queries).
// Keys in blocks of 64: K and V rows gathered from the pool through the row's slot list into
// shared memory; S = Q K^T with mma.m16n8k16 (fp16 in, fp32 accumulate), online softmax on the
// accumulator fragments (exp2, running max / sum per row), P re-packed as fp16 A fragments
// (the C fragments of two adjacent n8 tiles are one k16 A fragment) and O += P V. S never
// leaves registers. K / V tiles: cp.async into two shared-memory stages (the next tile loads
// while this one is used), read as mma B fragments with ldmatrix (.trans for V); the causal mask
// is applied on the tiles that reach past the block's first query only; query blocks run
// longest first.
//   q    half [t, Hq*D] (RoPE applied, not scaled)     out half [t, Hq*D]
//   kc/vc half [slots, Hkv, D]                          slots int [L]: the row's positions 0..L-1
//   query i sits at position p0 + i (p0 = L - t) and sees keys 0..p0+i; on a sliding layer
//   (window > 0) only keys p0+i-window+1..p0+i (key blocks wholly before the block's first
//   query's window are skipped). softcap > 0: scores s -> cap * tanh(s / cap) before the softmax.
// grid (Hq, ceil(t / QB)), 32 * NW threads (below).
// ---------------------------------------------------------------------------------------
#define FA_KB 64  // keys per block
#define FA_QB 64  // queries per block of the encoder's attention (encoder.cu)
#define FA_PAD 8  // halves of padding per shared-memory row (16 bytes: ldmatrix rows hit distinct banks)

// Shared memory of one launch: two stages of K and V tiles, [stage][FA_KB][D + FA_PAD] each.
__host__ __device__ constexpr int flash_prefill_smem(int d) { return 2 * 2 * FA_KB * (d + FA_PAD) * 2; }

__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    const u32 s = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    const u32 s = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(s));
}

// K and V rows [kb, kb + FA_KB) of kv head hk, gathered through slots, into one stage
// (16-byte cp.async each; rows past L are zero-filled and masked later).
template <int D>
__device__ __forceinline__ void flash_load_tile(half* Ks, half* Vs, const half* __restrict__ kc, const half* __restrict__ vc,
                                                const int* __restrict__ slots, int kb, int L, int Hkv, int hk) {
    constexpr int CH = D / 8, LD = D + FA_PAD;
    for (int i = threadIdx.x; i < FA_KB * CH; i += blockDim.x) {
        const int r = i / CH, ch = i % CH, key = kb + r;
        const long long base = key < L ? ((long long)slots[key] * Hkv + hk) * D + ch * 8 : 0;
        const int n = key < L ? 16 : 0;
        cp_async16(Ks + r * LD + ch * 8, kc + base, n);
        cp_async16(Vs + r * LD + ch * 8, vc + base, n);
    }
}

// NW warps of MI m16-tiles each: QB = 16 * NW * MI queries per block. A wider block reads each K / V
// tile from L2 once for more queries; MI = 2 also feeds each K / V fragment (ldmatrix) to two mma
// (measured on the H200, Llama-3.2-1B 2,048 tokens, all layers: 4 x 1 1.646 ms, 8 x 1 1.667, 4 x 2
// 2.100 at 251 registers; bench/CUDA_NOTES.md session 8, so no 4 x 2 instance is built).
// Grid (Hq, ceil(t / QB)) with the heads varying fastest: the longest query blocks of every head
// launch first and the short ones fill the tail (session 7's (ceil(t / 64), Hq) ran each head's blocks
// in turn, its longest ones last: 2.068 ms against 1.646). A warp skips the key tiles wholly after its
// last query (they are all masked for its rows: the online softmax would multiply by exactly 1 and
// add exactly 0, so the result is the same bits as computing them).
template <int D, bool CAP, int NW, int MI>
__device__ __forceinline__ void flash_prefill(const half* __restrict__ q, const half* __restrict__ kc,
                                              const half* __restrict__ vc, const int* __restrict__ slots,
                                              half* __restrict__ out, int t, int L, int Hq, int Hkv, float scale_log2,
                                              int window, float softcap) {
    constexpr int QB = 16 * NW * MI;  // queries per block
    constexpr int DS = D / 16;  // k16 steps over the head dimension
    constexpr int DN = D / 8;  // n8 tiles of O
    constexpr int LD = D + FA_PAD;
    constexpr int STAGE = FA_KB * LD;  // halves per K (or V) stage
    extern __shared__ __align__(16) unsigned char fa_smem[];
    half* Kst = reinterpret_cast<half*>(fa_smem);  // [2][FA_KB][LD]
    half* Vst = Kst + 2 * STAGE;                    // [2][FA_KB][LD]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int h = blockIdx.x, hk = h / (Hq / Hkv);
    const int q0 = (gridDim.y - 1 - blockIdx.y) * QB;  // the longest (last) query blocks start first
    const int p0 = L - t;
    const int ldq = Hq * D;
    const int key_end = min(L, p0 + min(q0 + QB, t));  // keys any query of the block sees
    const int key_begin = window > 0 ? max(0, p0 + q0 - window + 1) / FA_KB * FA_KB : 0;
    const int ntiles = (key_end - key_begin + FA_KB - 1) / FA_KB;
    const int qmax = key_end - 1;  // the block's last query position (rows past t aside)
    constexpr float LOG2E = 1.4426950408889634f;
    const float cap_log2 = softcap * LOG2E, scale_cap = scale_log2 / (LOG2E * softcap);  // used when softcap > 0
    flash_load_tile<D>(Kst, Vst, kc, vc, slots, key_begin, L, Hkv, hk);
    cp_async_commit();
    const int wq = q0 + warp * 16 * MI;  // the warp's first query row
    // Q fragments of this warp's MI x 16 rows (rows past t read row t-1, never written)
    u32 qa[MI][DS][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        const int r0 = min(wq + 16 * mi + g, t - 1), r1 = min(wq + 16 * mi + g + 8, t - 1);
        const half* q0p = q + (long long)r0 * ldq + h * D;
        const half* q1p = q + (long long)r1 * ldq + h * D;
#pragma unroll
        for (int s = 0; s < DS; ++s) {
            qa[mi][s][0] = *reinterpret_cast<const u32*>(q0p + 16 * s + 2 * c);
            qa[mi][s][1] = *reinterpret_cast<const u32*>(q1p + 16 * s + 2 * c);
            qa[mi][s][2] = *reinterpret_cast<const u32*>(q0p + 16 * s + 2 * c + 8);
            qa[mi][s][3] = *reinterpret_cast<const u32*>(q1p + 16 * s + 2 * c + 8);
        }
    }
    float o[MI][DN][4];
    float mrow[MI][2], lrow[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int n = 0; n < DN; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mi][n][e] = 0.f;
        mrow[mi][0] = mrow[mi][1] = -1e30f;
        lrow[mi][0] = lrow[mi][1] = 0.f;
    }
    // the last key position the warp's rows see (-1: every row of the warp is past t)
    const int warp_last = wq < t ? p0 + min(wq + 16 * MI, t) - 1 : -1;
    const int qmin = p0 + q0;  // the block's first query position
    // ldmatrix lane roles: x4 over K reads 8 keys x 32 head dims (lane -> key lane % 8, dims 8 * (lane / 8));
    // x4.trans over V reads 16 keys x 16 head dims (lane -> key (lane & 7) + 8 * ((lane >> 3) & 1), dims 8 * (lane >> 4))
    const int k_row = lane & 7, k_col = 8 * (lane >> 3);
    const int v_row = (lane & 7) + 8 * ((lane >> 3) & 1), v_col = 8 * (lane >> 4);
    for (int it = 0; it < ntiles; ++it) {
        const int kb = key_begin + it * FA_KB;
        if (it + 1 < ntiles) {  // prefetch the next tile into the other stage
            flash_load_tile<D>(Kst + ((it + 1) & 1) * STAGE, Vst + ((it + 1) & 1) * STAGE, kc, vc, slots, kb + FA_KB, L, Hkv, hk);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        // (warp-uniform) else every key of the tile is after the warp's rows; a 64-query block has no such
        // tile below t (the test costs 20 registers there: 114 -> 134, a block less per SM)
        if (QB <= FA_KB || kb <= warp_last) {
        const half* Ks = Kst + (it & 1) * STAGE;
        const half* Vs = Vst + (it & 1) * STAGE;
        // S = Q K^T for MI x 16 rows x 64 keys (8 n8 tiles); each K fragment serves the MI row tiles
        float sc[MI][8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[mi][nt][e] = 0.f;
#pragma unroll
            for (int s = 0; s < DS; s += 2) {
                u32 b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, Ks + (nt * 8 + k_row) * LD + 16 * s + k_col);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mma_16816(sc[mi][nt], qa[mi][s][0], qa[mi][s][1], qa[mi][s][2], qa[mi][s][3], b0, b1);
                    mma_16816(sc[mi][nt], qa[mi][s + 1][0], qa[mi][s + 1][1], qa[mi][s + 1][2], qa[mi][s + 1][3], b2, b3);
                }
            }
        }
        // causal + length (+ window) mask on the tiles that need it (past the block's first query,
        // the sequence's end, or before its last query's window), scale (+ soft-cap) into exp2
        const bool diag = kb + FA_KB - 1 > qmin || kb + FA_KB > L || (window > 0 && kb <= qmax - window);
        u32 pa[MI][4][4];  // P as A fragments, one per k16 step of keys
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const int qpos0 = p0 + wq + 16 * mi + g;  // positions of this thread's rows g and g + 8
            float mx[2] = {mrow[mi][0], mrow[mi][1]};
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float v = CAP ? cap_log2 * tanhf(sc[mi][nt][e] * scale_cap) : sc[mi][nt][e] * scale_log2;
                    if (diag) {
                        const int key = kb + nt * 8 + 2 * c + (e & 1);
                        const int qp = qpos0 + 8 * (e >> 1);
                        v = (key <= qp && key < L && (window <= 0 || key > qp - window)) ? v : -INFINITY;
                    }
                    sc[mi][nt][e] = v;
                    mx[e >> 1] = fmaxf(mx[e >> 1], v);
                }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            }
            float corr[2], sum[2] = {0.f, 0.f};
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                corr[r] = exp2f(mrow[mi][r] - mx[r]);
                mrow[mi][r] = mx[r];
            }
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const float e0 = exp2f(sc[mi][nt][0] - mx[0]), e1 = exp2f(sc[mi][nt][1] - mx[0]);
                const float e2 = exp2f(sc[mi][nt][2] - mx[1]), e3 = exp2f(sc[mi][nt][3] - mx[1]);
                sum[0] += e0 + e1;
                sum[1] += e2 + e3;
                const u32 lo = h2_as_u32(__floats2half2_rn(e0, e1)), hi = h2_as_u32(__floats2half2_rn(e2, e3));
                // tile 2kk -> (a0, a1), tile 2kk + 1 -> (a2, a3)
                pa[mi][nt >> 1][(nt & 1) * 2 + 0] = lo;
                pa[mi][nt >> 1][(nt & 1) * 2 + 1] = hi;
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
                sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
                lrow[mi][r] = lrow[mi][r] * corr[r] + sum[r];
            }
#pragma unroll
            for (int n = 0; n < DN; ++n) {
                o[mi][n][0] *= corr[0];
                o[mi][n][1] *= corr[0];
                o[mi][n][2] *= corr[1];
                o[mi][n][3] *= corr[1];
            }
        }
        // O += P V: x4.trans gives (b0, b1) of n8 tiles n and n + 1 for keys kk*16 .. +15
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int n = 0; n < DN; n += 2) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, Vs + (kk * 16 + v_row) * LD + n * 8 + v_col);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mma_16816(o[mi][n], pa[mi][kk][0], pa[mi][kk][1], pa[mi][kk][2], pa[mi][kk][3], b0, b1);
                    mma_16816(o[mi][n + 1], pa[mi][kk][0], pa[mi][kk][1], pa[mi][kk][2], pa[mi][kk][3], b2, b3);
                }
            }
        }
        }  // kb <= warp_last
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    // O / l -> out (rows < t)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        const float inv0 = 1.f / lrow[mi][0], inv1 = 1.f / lrow[mi][1];
        const int r0 = wq + 16 * mi + g, r1 = r0 + 8;
#pragma unroll
        for (int n = 0; n < DN; ++n) {
            const int d = n * 8 + 2 * c;
            if (r0 < t) *reinterpret_cast<half2*>(out + (long long)r0 * ldq + h * D + d) = __floats2half2_rn(o[mi][n][0] * inv0, o[mi][n][1] * inv0);
            if (r1 < t) *reinterpret_cast<half2*>(out + (long long)r1 * ldq + h * D + d) = __floats2half2_rn(o[mi][n][2] * inv1, o[mi][n][3] * inv1);
        }
    }
}

// grid (Hq, ceil(t / QB)), 32 * NW threads, flash_prefill_smem(D) bytes of dynamic shared memory
// (edge.runtime.cuda.prefill.FLASH_VARIANTS names the instances: "" = 4 warps x 1 m16-tile, w8_ = 8 x 1).
// flash_prefill_cap_d*: with the score soft-cap (softcap > 0); the plain ones ignore softcap (the
// cap's code costs 29 registers, a block per SM at head_dim 64).
#define FLASH_PREFILL_INSTANCE(NAME, D, CAP, NW, MI)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * NW) NAME(                                               \
        const half* q, const half* kc, const half* vc, const int* slots, half* out, int t, int L, int Hq,       \
        int Hkv, float scale_log2, int window, float softcap) {                                                \
        flash_prefill<D, CAP, NW, MI>(q, kc, vc, slots, out, t, L, Hq, Hkv, scale_log2, window, softcap);       \
    }
FLASH_PREFILL_INSTANCE(flash_prefill_d64, 64, false, 4, 1)
FLASH_PREFILL_INSTANCE(flash_prefill_d128, 128, false, 4, 1)
FLASH_PREFILL_INSTANCE(flash_prefill_cap_d64, 64, true, 4, 1)
FLASH_PREFILL_INSTANCE(flash_prefill_cap_d128, 128, true, 4, 1)
FLASH_PREFILL_INSTANCE(flash_prefill_w8_d64, 64, false, 8, 1)
FLASH_PREFILL_INSTANCE(flash_prefill_w8_d128, 128, false, 8, 1)
