// ---------------------------------------------------------------------------------------
// Prefill attention on tensor cores (flash attention, FA2 shape): causal, GQA, over the paged
// KV cache. One block = 4 warps = 64 queries of one q head; each warp owns 16 query rows.
// Keys in blocks of 64: K and V rows gathered from the pool through the row's slot list into
// shared memory; S = Q K^T with mma.m16n8k16 (fp16 in, fp32 accumulate), online softmax on the
// accumulator fragments (exp2, running max / sum per row), P re-packed as fp16 A fragments
// (the C fragments of two adjacent n8 tiles are one k16 A fragment) and O += P V. S never
// leaves registers.
//   q    half [t, Hq*D] (RoPE applied, not scaled)     out half [t, Hq*D]
//   kc/vc half [slots, Hkv, D]                          slots int [L]: the row's positions 0..L-1
//   query i sits at position p0 + i (p0 = L - t) and sees keys 0..p0+i; on a sliding layer
//   (window > 0) only keys p0+i-window+1..p0+i (key blocks wholly before the block's first
//   query's window are skipped). softcap > 0: scores s -> cap * tanh(s / cap) before the softmax.
// grid (ceil(t / 64), Hq), 128 threads.
// ---------------------------------------------------------------------------------------
#define FA_KB 64  // keys per block
#define FA_QB 64  // queries per block

template <int D>
__device__ __forceinline__ void flash_prefill(const half* __restrict__ q, const half* __restrict__ kc,
                                              const half* __restrict__ vc, const int* __restrict__ slots,
                                              half* __restrict__ out, int t, int L, int Hq, int Hkv, float scale_log2,
                                              int window, float softcap) {
    constexpr int PAD = 8;  // halves of padding per smem row (bank spread)
    constexpr int DS = D / 16;  // k16 steps over the head dimension
    constexpr int DN = D / 8;  // n8 tiles of O
    __shared__ __align__(16) half Ks[FA_KB][D + PAD];
    __shared__ __align__(16) half Vs[FA_KB][D + PAD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int h = blockIdx.y, hk = h / (Hq / Hkv);
    const int q0 = blockIdx.x * FA_QB;
    const int p0 = L - t;
    const int ldq = Hq * D;
    // Q fragments of this warp's 16 rows (rows past t read row t-1, never written)
    u32 qa[DS][4];
    {
        const int r0 = min(q0 + warp * 16 + g, t - 1), r1 = min(q0 + warp * 16 + g + 8, t - 1);
        const half* q0p = q + (long long)r0 * ldq + h * D;
        const half* q1p = q + (long long)r1 * ldq + h * D;
#pragma unroll
        for (int s = 0; s < DS; ++s) {
            qa[s][0] = *reinterpret_cast<const u32*>(q0p + 16 * s + 2 * c);
            qa[s][1] = *reinterpret_cast<const u32*>(q1p + 16 * s + 2 * c);
            qa[s][2] = *reinterpret_cast<const u32*>(q0p + 16 * s + 2 * c + 8);
            qa[s][3] = *reinterpret_cast<const u32*>(q1p + 16 * s + 2 * c + 8);
        }
    }
    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
    float mrow[2] = {-1e30f, -1e30f}, lrow[2] = {0.f, 0.f};
    const int qpos0 = p0 + q0 + warp * 16 + g;  // positions of this thread's rows g and g + 8
    const int key_end = min(L, p0 + min(q0 + FA_QB, t));  // keys any query of the block sees
    const int key_begin = window > 0 ? max(0, p0 + q0 - window + 1) / FA_KB * FA_KB : 0;
    constexpr float LOG2E = 1.4426950408889634f;
    const float cap_log2 = softcap * LOG2E, scale_cap = scale_log2 / (LOG2E * softcap);  // used when softcap > 0
    for (int kb = key_begin; kb < key_end; kb += FA_KB) {
        __syncthreads();  // the previous block's K / V are no longer read
        constexpr int CH = D / 8;  // 16-byte chunks per row
        for (int i = threadIdx.x; i < FA_KB * CH; i += blockDim.x) {
            const int r = i / CH, ch = i % CH, key = kb + r;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = kv;
            if (key < L) {
                const long long base = ((long long)slots[key] * Hkv + hk) * D + ch * 8;
                kv = *reinterpret_cast<const uint4*>(kc + base);
                vv = *reinterpret_cast<const uint4*>(vc + base);
            }
            *reinterpret_cast<uint4*>(&Ks[r][ch * 8]) = kv;
            *reinterpret_cast<uint4*>(&Vs[r][ch * 8]) = vv;
        }
        __syncthreads();
        // S = Q K^T for 16 rows x 64 keys (8 n8 tiles)
        float sc[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[nt][e] = 0.f;
#pragma unroll
            for (int s = 0; s < DS; ++s) {
                const u32 b0 = *reinterpret_cast<const u32*>(&Ks[nt * 8 + g][16 * s + 2 * c]);
                const u32 b1 = *reinterpret_cast<const u32*>(&Ks[nt * 8 + g][16 * s + 2 * c + 8]);
                mma_16816(sc[nt], qa[s][0], qa[s][1], qa[s][2], qa[s][3], b0, b1);
            }
        }
        // causal + length (+ window) mask, scale (+ soft-cap) into the exp2 domain, running max
        float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kb + nt * 8 + 2 * c + (e & 1);
                const int qp = qpos0 + 8 * (e >> 1);
                const bool seen = key <= qp && key < L && (window <= 0 || key > qp - window);
                const float sv = softcap > 0.f ? cap_log2 * tanhf(sc[nt][e] * scale_cap) : sc[nt][e] * scale_log2;
                const float v = seen ? sv : -INFINITY;
                sc[nt][e] = v;
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
            corr[r] = exp2f(mrow[r] - mx[r]);
            mrow[r] = mx[r];
        }
        u32 pa[4][4];  // P as A fragments, one per k16 step of keys
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const float e0 = exp2f(sc[nt][0] - mx[0]), e1 = exp2f(sc[nt][1] - mx[0]);
            const float e2 = exp2f(sc[nt][2] - mx[1]), e3 = exp2f(sc[nt][3] - mx[1]);
            sum[0] += e0 + e1;
            sum[1] += e2 + e3;
            const u32 lo = h2_as_u32(__floats2half2_rn(e0, e1)), hi = h2_as_u32(__floats2half2_rn(e2, e3));
            // tile 2kk -> (a0, a1), tile 2kk + 1 -> (a2, a3)
            pa[nt >> 1][(nt & 1) * 2 + 0] = lo;
            pa[nt >> 1][(nt & 1) * 2 + 1] = hi;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
            sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
            lrow[r] = lrow[r] * corr[r] + sum[r];
        }
#pragma unroll
        for (int n = 0; n < DN; ++n) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        // O += P V: B fragment (k = key, n = d): (V[2c][d], V[2c+1][d]) and keys + 8
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int n = 0; n < DN; ++n) {
                const int d = n * 8 + g, k0 = kk * 16 + 2 * c;
                const half2 v0 = __halves2half2(Vs[k0][d], Vs[k0 + 1][d]);
                const half2 v1 = __halves2half2(Vs[k0 + 8][d], Vs[k0 + 9][d]);
                mma_16816(o[n], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], h2_as_u32(v0), h2_as_u32(v1));
            }
        }
    }
    // O / l -> out (rows < t)
    const float inv0 = 1.f / lrow[0], inv1 = 1.f / lrow[1];
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int n = 0; n < DN; ++n) {
        const int d = n * 8 + 2 * c;
        if (r0 < t) *reinterpret_cast<half2*>(out + (long long)r0 * ldq + h * D + d) = __floats2half2_rn(o[n][0] * inv0, o[n][1] * inv0);
        if (r1 < t) *reinterpret_cast<half2*>(out + (long long)r1 * ldq + h * D + d) = __floats2half2_rn(o[n][2] * inv1, o[n][3] * inv1);
    }
}

#define FLASH_PREFILL_INSTANCE(D)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_prefill_d##D(                                       \
        const half* q, const half* kc, const half* vc, const int* slots, half* out, int t, int L, int Hq,       \
        int Hkv, float scale_log2, int window, float softcap) {                                                \
        flash_prefill<D>(q, kc, vc, slots, out, t, L, Hq, Hkv, scale_log2, window, softcap);                    \
    }
FLASH_PREFILL_INSTANCE(64)
FLASH_PREFILL_INSTANCE(128)
