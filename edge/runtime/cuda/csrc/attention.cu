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
// Sliding layers (window > 0) read only the last `window` tokens [L - window, L); scores are
// soft-capped (softcap > 0: cap * tanh(s / cap)) before the softmax. Token loops run over
// j = t - lo, t the position. Dynamic shared memory: (max_ctx + D + 32 + 8 * blockDim + max_blocks)
// 4-byte words.
// ---------------------------------------------------------------------------------------
template <int DT>
__device__ __forceinline__ void paged_attn_impl(const half* __restrict__ q, const half* __restrict__ kc,
                                                const half* __restrict__ vc, const int* __restrict__ block_tables,
                                                const int* __restrict__ ctx_lens, half* __restrict__ out,
                                                int Hq, int Hkv, int Drt, int BS, int max_blocks, int max_ctx,
                                                float scale, int window, float softcap) {
    const int D = DT > 0 ? DT : Drt;
    extern __shared__ float sm[];
    float* scores = sm;                 // [max_ctx]: scores[j] of token lo + j
    float* qs = sm + max_ctx;           // [D]
    float* red = qs + D;                // [32]
    float* accbuf = red + 32;           // [8 * blockDim]
    int* bts = reinterpret_cast<int*>(accbuf + 8 * blockDim.x);  // [max_blocks] block table copy
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const int L = ctx_lens[b];
    const int lo = attn_window_start(L, window), n = L - lo;  // tokens read: [lo, L)
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
            const int t = lo + grp + u * groups;
            if (grp < groups && t < L) {
                const long long slot = (long long)bts[t / BS] * BS + (t % BS);
                vpre[u] = __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
            } else {
                vpre[u] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    }
    float mx = -INFINITY;
    for (int j = tid; j < n; j += blockDim.x) {
        const int t = lo + j;
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
        s = attn_softcap(s, softcap);
        scores[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_reduce(mx, red, true);
    float sum = 0.f;
    for (int j = tid; j < n; j += blockDim.x) {
        float e = __expf(scores[j] - mx);
        scores[j] = e;
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
            for (int j0 = grp; j0 < n; j0 += groups * UNROLL) {
                uint4 v[UNROLL];
                float p[UNROLL];
                const bool first = j0 == grp;
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int j = j0 + u * groups, t = lo + j;
                    if (j < n) {
                        const long long slot = (long long)bts[t / BS] * BS + (t % BS);
                        v[u] = first ? vpre[u] : __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
                        p[u] = scores[j];
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
        for (int j0 = rgrp; j0 < n; j0 += rgroups * UNROLL) {
            float2 v[UNROLL];
            float p[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int j = j0 + u * rgroups, t = lo + j;
                if (j < n) {
                    const long long slot = (long long)bts[t / BS] * BS + (t % BS);
                    v[u] = __half22float2(reinterpret_cast<const half2*>(vc + (slot * Hkv + kvh) * D)[col]);
                    p[u] = scores[j];
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
        float scale, int window, float softcap) {                                                  \
        paged_attn_impl<DT>(q, kc, vc, bt, ctx, out, Hq, Hkv, D, BS, max_blocks, max_ctx, scale, window, softcap); }

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
#define ATTN_SPLIT_MAX 8  // most splits per (head, sequence): session.ATTN_MAX_SPLITS

// The decode kernels' split of one sequence's keys: the tokens read are [lo, L) (all of them, or
// the last `window` on a sliding layer); at most one split per min_split tokens is used (a short
// context is faster in one block than with the merge's two extra memory round trips), so `Pe` <=
// P splits hold tokens and split `sp` reads [t0, t1) (sp >= Pe: nothing).
struct AttnSplit {
    int Pe, t0, t1;
};
__device__ __forceinline__ AttnSplit attn_split(int L, int window, int P, int min_split, int sp) {
    const int lo = attn_window_start(L, window), Lw = L - lo;
    const int Pe = min(min(P, ATTN_SPLIT_MAX), max(1, (Lw + min_split - 1) / min_split));
    const int per = (Lw + Pe - 1) / Pe;
    const int t0 = lo + min(Lw, sp * per);
    return {Pe, t0, min(L, t0 + per)};
}
template <int D, bool KCOAL, int FORM = 2>
__device__ __forceinline__ void paged_attn_split_impl(const half* __restrict__ q, const half* __restrict__ kc,
                                                      const half* __restrict__ vc, const int* __restrict__ block_tables,
                                                      const int* __restrict__ ctx_lens, half* __restrict__ out,
                                                      float* part_o, float* part_ml, unsigned* tickets,
                                                      int Hq, int Hkv, int BS, int max_blocks, int max_ctx, float scale,
                                                      int min_split, int window, float softcap) {
    constexpr int NCH = D / 8;  // 16-byte chunks per K / V row
    constexpr int VU = 8;       // V tokens in flight per thread: 2048 / D tokens per round
    extern __shared__ float sm[];
    float* scores = sm;                 // [max_ctx] (this split's tokens from 0)
    float* qs = sm + max_ctx;           // [D]
    float* red = qs + D;                // [32]
    float* accbuf = red + 32;           // [8 * blockDim]
    int* bts = reinterpret_cast<int*>(accbuf + 8 * blockDim.x);
    __shared__ bool last;
    // FORM (session 12; bench_step_ab.py times the three): 0 as before; 1 the own token's K row
    // and the merge's parts loaded early (OWNK, below); 2 also the ticket taken with one
    // acquire-release atomic instead of two sequentially consistent fences (LIGHT, below)
    constexpr bool OWNK = FORM >= 1, LIGHT = FORM >= 2;
    const int h = blockIdx.x, b = blockIdx.y, sp = blockIdx.z, P = gridDim.z, tid = threadIdx.x;
    // The length and the whole block-table row (the step's inputs) and the K / V rows of earlier
    // positions are read before pdl_wait(): under programmatic launch they load while the qkv
    // kernel before finishes. q and the step's own token (position L - 1, which that kernel
    // writes) are read after it.
    const int L = ctx_lens[b];
    const int* bt = block_tables + (long long)b * max_blocks;
    for (int i = tid; i < max_blocks; i += blockDim.x) bts[i] = bt[i];
    const int kvh = h / (Hq / Hkv);
    half* o = out + ((long long)b * Hq + h) * D;
    if (L <= 0) {  // a padding row: every split of it returns here
        pdl_wait();
        pdl_trigger();
        if (sp == 0)
            for (int d = tid; d < D; d += blockDim.x) o[d] = __float2half(0.f);
        return;
    }
    const AttnSplit split = attn_split(L, window, P, min_split, sp);
    const int Pe = split.Pe, t0 = split.t0, n = split.t1 - split.t0;
    if (sp >= Pe) return;  // (writes nothing: needs no wait)
    const int own = L - 1 - t0;  // the step's own token, relative to t0 (in this split when < n)
    __syncthreads();
    const int groups = blockDim.x / NCH;
    const int ch = tid % NCH, grp = tid / NCH;
    auto kv_row = [&](const half* cache, int t) {  // 16-byte chunk ch of token t0 + t's row
        const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
        return reinterpret_cast<const uint4*>(cache + (slot * Hkv + kvh) * D);
    };
    uint4 vpre[VU];
#pragma unroll
    for (int u = 0; u < VU; ++u) {
        const int t = grp + u * groups;  // relative to t0
        vpre[u] = grp < groups && t < n && t != own ? __ldg(kv_row(vc, t) + ch) : make_uint4(0u, 0u, 0u, 0u);
    }
    // one token per thread (!KCOAL): the thread's first token's K row, all NCH chunks in flight
    uint4 kpre[KCOAL ? 1 : NCH];
    if constexpr (!KCOAL) {
#pragma unroll
        for (int c = 0; c < NCH; ++c) kpre[c] = tid < n && tid != own ? __ldg(kv_row(kc, tid) + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    pdl_wait();
    pdl_trigger();
    // the step's own token's rows go to registers of their own (a load into a register with a
    // load still in flight would wait for it: one more round trip before the scores)
    const bool own_v = grp < groups && own < n && own % groups == grp && own < groups * VU;
    const uint4 vown = own_v ? __ldg(kv_row(vc, own) + ch) : make_uint4(0u, 0u, 0u, 0u);
    // OWNK (one token per thread): the thread whose first token is the step's own loads that K
    // row now, in the same round trip as q and the own V row (its kpre slots were left empty
    // above), not after the barrier below: one L2 round trip fewer on the split that holds the
    // new token, which every merge waits for. Same loads, same sums: the same bits.
    if constexpr (!KCOAL && OWNK) {
        if (tid == own && own < n) {
            const uint4* kp = kv_row(kc, own);
#pragma unroll
            for (int c = 0; c < NCH; ++c) kpre[c] = __ldg(kp + c);
        }
    }
    const half* qh = q + ((long long)b * Hq + h) * D;
    for (int d = tid; d < D; d += blockDim.x) qs[d] = __half2float(qh[d]) * scale;
    __syncthreads();  // qs
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
            sc = attn_softcap(sc, softcap);
            const int t = (r * KU + u) * groups + grp;
            if (grp < groups && t < n) {
                if (ch == 0) scores[t] = sc;
                mx = fmaxf(mx, sc);
            }
        }
    }
    } else {  // one token per thread: its K row in NCH 16-byte loads, all in flight
        auto score = [&](int t, const uint4* kv) {
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
            const float sc = attn_softcap(s0 + s1, softcap);
            scores[t] = sc;
            mx = fmaxf(mx, sc);
        };
        if (tid < n && (OWNK || tid != own)) {
            score(tid, kpre);  // the first token's row, loaded above
        } else if (tid < n) {
            const uint4* kp = kv_row(kc, own);
            uint4 kv[NCH];
#pragma unroll
            for (int c = 0; c < NCH; ++c) kv[c] = __ldg(kp + c);
            score(tid, kv);
        }
        for (int t = tid + blockDim.x; t < n; t += blockDim.x) {
            const uint4* kp = kv_row(kc, t);
            uint4 kv[NCH];
#pragma unroll
            for (int c = 0; c < NCH; ++c) kv[c] = __ldg(kp + c);
            score(t, kv);
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
                    v[u] = first ? (t == own ? vown : vpre[u]) : __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
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
    if constexpr (LIGHT) {
        // LIGHT: the barrier orders every thread's part stores before thread 0's ticket, an
        // atom.acq_rel.gpu: its release publishes them (cumulative over what the barrier made
        // thread 0 observe), its acquire orders the last block's reads after the other
        // splits' tickets (and the barrier after it, every thread's). __threadfence() is a
        // fence.sc (MEMBAR.SC.GPU in the SASS), in every thread, twice on the critical path.
        __syncthreads();
        if (tid == 0) {
            unsigned t;
            asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(t) : "l"(tickets + bh) : "memory");
            last = t == (unsigned)Pe - 1;
        }
        __syncthreads();
        if (!last) return;
    } else {
        __threadfence();
        __syncthreads();
        if (tid == 0) last = atomicAdd(tickets + bh, 1u) == (unsigned)Pe - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
    }
    // The merge's loads are issued together, not one L2 round trip per split: every split's
    // (m, l) at once, then each thread's parts of o (the sums keep the split order 0, 1, ...).
    float pm[ATTN_SPLIT_MAX], pl[ATTN_SPLIT_MAX];
#pragma unroll
    for (int j = 0; j < ATTN_SPLIT_MAX; ++j) {
        pm[j] = j < Pe ? __ldcg(part_ml + (bh * P + j) * 2) : -INFINITY;
        pl[j] = j < Pe ? __ldcg(part_ml + (bh * P + j) * 2 + 1) : 0.f;
    }
    // OWNK: the thread's first column of every part in the same round trip as (m, l) (written
    // after the weights, the SASS issued them after the exponentials: a second L2 round trip);
    // further columns (D > blockDim) load in the loop below
    float po0[ATTN_SPLIT_MAX];
    if constexpr (OWNK) {
#pragma unroll
        for (int j = 0; j < ATTN_SPLIT_MAX; ++j) po0[j] = j < Pe && tid < D ? __ldcg(part_o + (bh * P + j) * D + tid) : 0.f;
    }
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < ATTN_SPLIT_MAX; ++j)
        if (j < Pe) M = fmaxf(M, pm[j]);
    float l = 0.f;
#pragma unroll
    for (int j = 0; j < ATTN_SPLIT_MAX; ++j)
        if (j < Pe) {
            pm[j] = __expf(pm[j] - M);  // the split's weight
            l += pl[j] * pm[j];
        }
    const float inv = 1.f / l;
    for (int d = tid; d < D; d += blockDim.x) {
        float po[ATTN_SPLIT_MAX];
#pragma unroll
        for (int j = 0; j < ATTN_SPLIT_MAX; ++j) po[j] = OWNK && d == tid ? po0[j] : j < Pe ? __ldcg(part_o + (bh * P + j) * D + d) : 0.f;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < ATTN_SPLIT_MAX; ++j)
            if (j < Pe) acc += po[j] * pm[j];
        o[d] = __float2half(acc * inv);
    }
    if (tid == 0) tickets[bh] = 0u;
}

#define ATTN_SPLIT_INSTANCE(NAME, D, KCOAL, FORM)                                                            \
    extern "C" __global__ void NAME(const half* q, const half* kc, const half* vc, const int* bt,       \
        const int* ctx, half* out, float* part_o, float* part_ml, unsigned* tickets, int Hq, int Hkv,   \
        int BS, int max_blocks, int max_ctx, float scale, int min_split, int window, float softcap) {   \
        paged_attn_split_impl<D, KCOAL, FORM>(q, kc, vc, bt, ctx, out, part_o, part_ml, tickets, Hq, Hkv, \
                                 BS, max_blocks, max_ctx, scale, min_split, window, softcap); }

ATTN_SPLIT_INSTANCE(paged_attn_split_d64, 64, true, 0)
ATTN_SPLIT_INSTANCE(paged_attn_split_d128, 128, true, 0)
ATTN_SPLIT_INSTANCE(paged_attn_split_tk_d64, 64, false, 2)
ATTN_SPLIT_INSTANCE(paged_attn_split_tk_d128, 128, false, 2)
// the kernel before session 12 (FORM 0) and its early loads alone (1): bench_step_ab.py's A/B
ATTN_SPLIT_INSTANCE(paged_attn_split_tk0_d64, 64, false, 0)
ATTN_SPLIT_INSTANCE(paged_attn_split_tk0_d128, 128, false, 0)
ATTN_SPLIT_INSTANCE(paged_attn_split_tk1_d64, 64, false, 1)
ATTN_SPLIT_INSTANCE(paged_attn_split_tk1_d128, 128, false, 1)

// ---------------------------------------------------------------------------------------
// Split decode attention in a small block ("lr", session 12): grid (Hq, B, P) and splits as
// paged_attn_split, but 64 threads at <= 64 registers (4,096 a block) with K / V staged in
// shared memory by cp.async. paged_attn_split's blocks need 32,768 registers, so none fits
// beside the qkv GEMV before it (6 blocks of 128 threads at 80 registers hold 61,440 of an SM's
// 65,536) and its block table / K / V loads start only as qkv's blocks leave; these blocks fit
// in the 4,096 left, so under programmatic launch their first tile of K / V (64 tokens) streams
// from DRAM while qkv runs. Tiles of LR_TT tokens, two shared-memory stages (the next tile loads
// while one is used), online softmax across tiles: per split the running (m, l, acc) as
// paged_attn_split's parts, merged the same way (acquire-release ticket, last block merges).
// Thread t scores token t of a tile (q . K_t, q in shared memory); for P . V thread t owns
// D / 64 output columns. Rows are stored with their 16-byte chunks XOR-swizzled by the token
// (chunk c of token t at c ^ (t % NCH)), so a warp's 16-byte K reads and 4-byte V reads hit
// distinct banks. Sums run in another order than paged_attn_split's (same function to ~1e-6).
// Dynamic shared memory: lr_smem (decode.py): 2 stages x (K + V) x LR_TT x D halves, q (D
// floats), p (LR_TT floats), 32 floats of reduction.
//
// CL > 0 ("lc", session 13, sm_90 only): the same blocks as a thread-block cluster of the CL
// splits of one (head, sequence) (grid z = CL), merged through distributed shared memory instead
// of the global parts and the ticket: splits 1.. store (m, l, acc) into split 0's shared memory
// (st.shared::cluster) and arrive on the cluster barrier with release; split 0 waits with acquire
// and merges in split order, the same arithmetic as the ticket's merge (the same bits as lr at
// the same splits). What it removes from the critical path: the parts' stores to L2, the
// acquire-release atomic and the merging block's L2 loads of the parts (three L2 round trips).
// A block that holds no tokens (sp >= Pe) exits at once; an exited thread counts as arrived at a
// cluster barrier (PTX ISA, exit).
// ---------------------------------------------------------------------------------------
#define LR_TT 64  // tokens a tile = threads a block
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LC_CLUSTER(CL) __cluster_dims__(1, 1, CL)
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory"); }
__device__ __forceinline__ void cluster_arrive_release() { asm volatile("barrier.cluster.arrive.release;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait_acquire() { asm volatile("barrier.cluster.wait.acquire;" ::: "memory"); }
// the address of `p` (this block's shared memory) in cluster block `rank`'s shared memory window
__device__ __forceinline__ u32 cluster_map_shared(const void* p, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"((u32)__cvta_generic_to_shared(p)), "r"(rank));
    return r;
}
__device__ __forceinline__ void st_cluster_f32(u32 addr, float v) {
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}
#else  // clusters need sm_90: the lc kernels are built everywhere but never launched below it (decode.py)
#define LC_CLUSTER(CL)
__device__ __forceinline__ void cluster_arrive_relaxed() { __trap(); }
__device__ __forceinline__ void cluster_arrive_release() { __trap(); }
__device__ __forceinline__ void cluster_wait_acquire() { __trap(); }
__device__ __forceinline__ u32 cluster_map_shared(const void*, u32) { __trap(); return 0; }
__device__ __forceinline__ void st_cluster_f32(u32, float) { __trap(); }
#endif
template <int D, int CL = 0>
__device__ __forceinline__ void paged_attn_lr_impl(const half* __restrict__ q, const half* __restrict__ kc,
                                                   const half* __restrict__ vc, const int* __restrict__ block_tables,
                                                   const int* __restrict__ ctx_lens, half* __restrict__ out,
                                                   float* part_o, float* part_ml, unsigned* tickets,
                                                   int Hq, int Hkv, int BS, int max_blocks, float scale,
                                                   int min_split, int window, float softcap) {
    constexpr int NCH = D / 8;          // 16-byte chunks a row
    constexpr int DPT = D / LR_TT;      // output columns a thread (1 or 2)
    static_assert(DPT == 1 || DPT == 2, "D 64 or 128");  // (only D = 128 is built: decode.split_kernel)
    extern __shared__ __align__(16) unsigned char lr_sm[];
    half* ks = reinterpret_cast<half*>(lr_sm);             // [2][LR_TT][D]
    half* vs = ks + 2 * LR_TT * D;                           // [2][LR_TT][D]
    float* qs = reinterpret_cast<float*>(vs + 2 * LR_TT * D);  // [D]
    float* ps = qs + D;                                      // [LR_TT]
    float* red = ps + LR_TT;                                 // [32]
    __shared__ bool last;
    __shared__ float cl_o[CL > 0 ? CL : 1][CL > 0 ? D : 1];  // lc, split 0's: the other splits' acc
    __shared__ float cl_ml[CL > 0 ? CL : 1][2];               // ... and their (m, l)
    // lc: phase 0 of the cluster barrier (every block has started, so its shared memory exists,
    // before any block stores into split 0's); waited on just before those stores
    if constexpr (CL > 0) cluster_arrive_relaxed();
    const int h = blockIdx.x, b = blockIdx.y, sp = blockIdx.z, P = gridDim.z, tid = threadIdx.x;
    const int L = ctx_lens[b];
    const int* bt = block_tables + (long long)b * max_blocks;
    const int kvh = h / (Hq / Hkv);
    half* o = out + ((long long)b * Hq + h) * D;
    if (L <= 0) {  // a padding row
        pdl_wait();
        pdl_trigger();
        if (sp == 0)
            for (int d = tid; d < D; d += blockDim.x) o[d] = __float2half(0.f);
        return;
    }
    const AttnSplit split = attn_split(L, window, P, min_split, sp);
    const int Pe = split.Pe, t0 = split.t0, n = split.t1 - split.t0;
    if (sp >= Pe) return;
    const int own = L - 1 - t0;  // the step's own token relative to t0 (in this split when < n)
    const int tiles = (n + LR_TT - 1) / LR_TT;
    // thread tid copies token tid of tile `tile` (K and V rows, NCH chunks each, swizzled) into stage st
    auto issue = [&](int tile, int st, bool skip_own) {
        const int t = tile * LR_TT + tid;
        if (t < n && !(skip_own && t == own)) {
            const int pos = t0 + t;
            const long long slot = (long long)bt[pos / BS] * BS + (pos % BS);
            const half* kr = kc + (slot * Hkv + kvh) * D;
            const half* vr = vc + (slot * Hkv + kvh) * D;
            half* kd = ks + (st * LR_TT + tid) * D;
            half* vd = vs + (st * LR_TT + tid) * D;
#pragma unroll 4
            for (int c = 0; c < NCH; ++c) {
                const int cs = c ^ (tid % NCH);
                cp_async16_ordered(kd + cs * 8, kr + c * 8);
                cp_async16_ordered(vd + cs * 8, vr + c * 8);
            }
        }
    };
    // before pdl_wait: the first tile's rows of earlier positions (the own row is the qkv
    // kernel's to write)
    issue(0, 0, true);
    cp_async_commit_ordered();
    pdl_wait();
    pdl_trigger();
    if (own < LR_TT && tid == own && own < n) {  // the own row of tile 0, now written
        const int pos = t0 + own;
        const long long slot = (long long)bt[pos / BS] * BS + (pos % BS);
        const half* kr = kc + (slot * Hkv + kvh) * D;
        const half* vr = vc + (slot * Hkv + kvh) * D;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            const int cs = c ^ (tid % NCH);
            cp_async16_ordered(ks + tid * D + cs * 8, kr + c * 8);
            cp_async16_ordered(vs + tid * D + cs * 8, vr + c * 8);
        }
    }
    cp_async_commit_ordered();
    const half* qh = q + ((long long)b * Hq + h) * D;
    for (int d = tid; d < D; d += LR_TT) qs[d] = __half2float(qh[d]) * scale;
    float m_run = -INFINITY, l_run = 0.f, acc[DPT];
#pragma unroll
    for (int j = 0; j < DPT; ++j) acc[j] = 0.f;
    const int d0 = tid * DPT;  // this thread's output columns
    for (int tile = 0; tile < tiles; ++tile) {
        const int st = tile & 1;
        if (tile + 1 < tiles) {  // the next tile into the other stage (read two tiles ago, barrier below)
            issue(tile + 1, st ^ 1, false);
            cp_async_commit_ordered();
            cp_async_wait_ordered<1>();
        } else {
            cp_async_wait_ordered<0>();
        }
        __syncthreads();  // this tile's rows and q visible to every thread
        const int cnt = min(LR_TT, n - tile * LR_TT);
        float sc = -INFINITY;
        if (tid < cnt) {
            const uint4* kr = reinterpret_cast<const uint4*>(ks + (st * LR_TT + tid) * D);
            float s0 = 0.f, s1 = 0.f;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                const uint4 kv = kr[c ^ (tid % NCH)];
                const half2* kh = reinterpret_cast<const half2*>(&kv);
                const float4 qa = *reinterpret_cast<const float4*>(qs + c * 8);
                const float4 qb = *reinterpret_cast<const float4*>(qs + c * 8 + 4);
                const float2 f0 = __half22float2(kh[0]), f1 = __half22float2(kh[1]);
                const float2 f2 = __half22float2(kh[2]), f3 = __half22float2(kh[3]);
                s0 += f0.x * qa.x + f0.y * qa.y + f2.x * qb.x + f2.y * qb.y;
                s1 += f1.x * qa.z + f1.y * qa.w + f3.x * qb.z + f3.y * qb.w;
            }
            sc = attn_softcap(s0 + s1, softcap);
        }
        const float m_new = fmaxf(m_run, block_reduce(sc, red, true));
        const float alpha = __expf(m_run - m_new);  // 0 at the first tile (m_run = -inf)
        const float p = tid < cnt ? __expf(sc - m_new) : 0.f;
        ps[tid] = p;
        l_run = l_run * alpha + block_reduce(p, red, false);  // its barriers also publish ps
        m_run = m_new;
#pragma unroll
        for (int j = 0; j < DPT; ++j) acc[j] *= alpha;
        const half* vt = vs + st * LR_TT * D;
        for (int t = 0; t < cnt; ++t) {
            const float pt = ps[t];
            const half* vr = vt + t * D + ((d0 / 8) ^ (t % NCH)) * 8 + (d0 % 8);
            if constexpr (DPT == 2) {
                const float2 f = __half22float2(*reinterpret_cast<const half2*>(vr));
                acc[0] += pt * f.x;
                acc[1] += pt * f.y;
            } else {
                acc[0] += pt * __half2float(*vr);
            }
        }
        __syncthreads();  // every thread is done with stage st before the next iteration refills it
    }
    const long long bh = (long long)b * Hq + h;
    if (Pe == 1) {
        const float inv = 1.f / l_run;
#pragma unroll
        for (int j = 0; j < DPT; ++j) o[d0 + j] = __float2half(acc[j] * inv);
        return;
    }
    if constexpr (CL > 0) {  // the merge through split 0's shared memory (cluster rank = sp: grid z = CL)
        cluster_wait_acquire();  // phase 0
        if (sp != 0) {
#pragma unroll
            for (int j = 0; j < DPT; ++j) st_cluster_f32(cluster_map_shared(&cl_o[sp][d0 + j], 0), acc[j]);
            if (tid == 0) {
                st_cluster_f32(cluster_map_shared(&cl_ml[sp][0], 0), m_run);
                st_cluster_f32(cluster_map_shared(&cl_ml[sp][1], 0), l_run);
            }
            cluster_arrive_release();  // phase 1: this split's stores, visible to split 0's acquire
            return;
        }
        cluster_arrive_relaxed();  // phase 1 (split 0 stores nothing remote)
        cluster_wait_acquire();    // every split's (m, l, acc) is in cl_ml / cl_o
        float M = m_run;
        for (int j = 1; j < Pe; ++j) M = fmaxf(M, cl_ml[j][0]);
        const float w0 = __expf(m_run - M);
        float l = l_run * w0, a[DPT];
#pragma unroll
        for (int k = 0; k < DPT; ++k) a[k] = acc[k] * w0;
        for (int j = 1; j < Pe; ++j) {
            const float w = __expf(cl_ml[j][0] - M);
            l += cl_ml[j][1] * w;
#pragma unroll
            for (int k = 0; k < DPT; ++k) a[k] += cl_o[j][d0 + k] * w;
        }
        const float inv = 1.f / l;
#pragma unroll
        for (int k = 0; k < DPT; ++k) o[d0 + k] = __float2half(a[k] * inv);
        return;
    }
#pragma unroll
    for (int j = 0; j < DPT; ++j) part_o[(bh * P + sp) * D + d0 + j] = acc[j];
    if (tid == 0) {
        part_ml[(bh * P + sp) * 2] = m_run;
        part_ml[(bh * P + sp) * 2 + 1] = l_run;
    }
    __syncthreads();  // every part store before thread 0's release (paged_attn_split's LIGHT ticket)
    if (tid == 0) {
        unsigned t;
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(t) : "l"(tickets + bh) : "memory");
        last = t == (unsigned)Pe - 1;
    }
    __syncthreads();
    if (!last) return;
    float pm[ATTN_SPLIT_MAX], pl[ATTN_SPLIT_MAX], po[ATTN_SPLIT_MAX][DPT];
    const float* mlb = part_ml + bh * P * 2;
    const float* pob = part_o + bh * P * D + d0;
#pragma unroll
    for (int j = 0; j < ATTN_SPLIT_MAX; ++j) {
        pm[j] = j < Pe ? __ldcg(mlb + 2 * j) : -INFINITY;
        pl[j] = j < Pe ? __ldcg(mlb + 2 * j + 1) : 0.f;
#pragma unroll
        for (int k = 0; k < DPT; ++k) po[j][k] = j < Pe ? __ldcg(pob + j * D + k) : 0.f;
    }
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < ATTN_SPLIT_MAX; ++j)
        if (j < Pe) M = fmaxf(M, pm[j]);
    float l = 0.f, a[DPT];
#pragma unroll
    for (int k = 0; k < DPT; ++k) a[k] = 0.f;
#pragma unroll
    for (int j = 0; j < ATTN_SPLIT_MAX; ++j)
        if (j < Pe) {
            const float w = __expf(pm[j] - M);
            l += pl[j] * w;
#pragma unroll
            for (int k = 0; k < DPT; ++k) a[k] += po[j][k] * w;
        }
    const float inv = 1.f / l;
#pragma unroll
    for (int k = 0; k < DPT; ++k) o[d0 + k] = __float2half(a[k] * inv);
    if (tid == 0) tickets[bh] = 0u;
}

#define ATTN_LR_INSTANCE(NAME, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(LR_TT, 16) NAME(const half* q, const half* kc, const half* vc, \
        const int* bt, const int* ctx, half* out, float* part_o, float* part_ml, unsigned* tickets, int Hq,    \
        int Hkv, int BS, int max_blocks, int max_ctx, float scale, int min_split, int window, float softcap) { \
        paged_attn_lr_impl<D>(q, kc, vc, bt, ctx, out, part_o, part_ml, tickets, Hq, Hkv, BS, max_blocks,   \
                              scale, min_split, window, softcap); }

ATTN_LR_INSTANCE(paged_attn_lr_d128, 128)

#define ATTN_LC_INSTANCE(NAME, D, CL)                                                                              \
    extern "C" __global__ void __launch_bounds__(LR_TT, 16) LC_CLUSTER(CL) NAME(const half* q, const half* kc,     \
        const half* vc, const int* bt, const int* ctx, half* out, float* part_o, float* part_ml, unsigned* tickets, \
        int Hq, int Hkv, int BS, int max_blocks, int max_ctx, float scale, int min_split, int window, float softcap) { \
        paged_attn_lr_impl<D, CL>(q, kc, vc, bt, ctx, out, part_o, part_ml, tickets, Hq, Hkv, BS, max_blocks,       \
                                  scale, min_split, window, softcap); }

// a cluster of 8 splits (grid z = CL: decode.CLUSTER_SPLITS). Session 13, Llama-3-8B b1 step in one
// process: lc8 1.6266 ms, lr 1.6614; a cluster of 4 (grid z 4) 1.6919 and lr at grid z 4 1.7264: not built.
ATTN_LC_INSTANCE(paged_attn_lc8_d128, 128, 8)

// A decode-attention launch that only waits (bench_step_ab's attn_nop form, timing only): what the
// kernel boundary alone costs in the step under PDL, beside the step with no launch (no_attn).
extern "C" __global__ void pdl_nop() {
    pdl_wait();
    pdl_trigger();
}

// ---------------------------------------------------------------------------------------
// GQA decode attention for compile-time D: grid (Hkv, B, P), one block per (kv head, sequence,
// split) for all G = Hq / Hkv query heads that share the kv head (G <= GM). paged_attn_split
// runs one block per query head, so every K and V row crossed L2 -> SM G times (at 16 rows of
// Llama-3.2-1B: 25 MB a layer for 6 MB of cache, 512 blocks in two waves); here once, in
// Hkv * B * P blocks. Splits, windows, soft-capping and the merge are paged_attn_split's, per
// query head: block (kvh, b, s) writes (m, l, acc) of its G heads to part_* at the heads'
// own (b * Hq + h) index; the last block of (b, kvh) (ticket b * Hkv + kvh) merges them.
//   scores: one token per thread, its K row in D/8 16-byte loads, G dot products with q in
//           shared memory -> scores[g][t]
//   softmax: G maxima and G sums in one block reduction each
//   out:    threads = (token group, 16-byte column chunk) as paged_attn_split, each V chunk
//           weighted by G probabilities; groups summed by shuffles, then across warps in
//           shared memory.
// Dynamic shared memory (4-byte words): GM * max_ctx + GM * D + 32 * GM + (blockDim / 32) * GM * D + max_blocks.
// ---------------------------------------------------------------------------------------
template <int GM>
__device__ __forceinline__ void block_reduce_g(float (&v)[GM], float* red, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int g = 0; g < GM; ++g) v[g] = is_max ? warp_max(v[g]) : warp_sum(v[g]);
    __syncthreads();
    if (lane == 0)
#pragma unroll
        for (int g = 0; g < GM; ++g) red[warp * GM + g] = v[g];
    __syncthreads();
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        float r = lane < nw ? red[lane * GM + g] : (is_max ? -INFINITY : 0.f);
        v[g] = is_max ? warp_max(r) : warp_sum(r);
    }
}

template <int D, int GM>
__device__ __forceinline__ void paged_attn_gqa_impl(const half* __restrict__ q, const half* __restrict__ kc,
                                                    const half* __restrict__ vc, const int* __restrict__ block_tables,
                                                    const int* __restrict__ ctx_lens, half* __restrict__ out,
                                                    float* part_o, float* part_ml, unsigned* tickets,
                                                    int Hq, int Hkv, int BS, int max_blocks, int max_ctx, float scale,
                                                    int min_split, int window, float softcap) {
    constexpr int NCH = D / 8;
    constexpr int VU = 8;
    extern __shared__ float sm[];
    const int nw = blockDim.x >> 5;
    float* scores = sm;                     // [GM][max_ctx]
    float* qs = sm + GM * max_ctx;          // [GM][D]
    float* red = qs + GM * D;               // [32][GM]
    float* accbuf = red + 32 * GM;          // [warps][GM][D]
    int* bts = reinterpret_cast<int*>(accbuf + nw * GM * D);
    __shared__ bool last;
    const int kvh = blockIdx.x, b = blockIdx.y, sp = blockIdx.z, P = gridDim.z, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int G = Hq / Hkv;  // <= GM (the host picks the instance)
    const int L = ctx_lens[b];
    const half* qh = q + ((long long)b * Hq + kvh * G) * D;  // the G heads' queries, [G][D]
    for (int i = tid; i < GM * D; i += blockDim.x) qs[i] = i < G * D ? __half2float(qh[i]) * scale : 0.f;
    const int* bt = block_tables + (long long)b * max_blocks;
    for (int i = tid; i < max_blocks; i += blockDim.x) bts[i] = bt[i];
    half* o = out + ((long long)b * Hq + kvh * G) * D;
    if (L <= 0) {
        if (sp == 0)
            for (int i = tid; i < G * D; i += blockDim.x) o[i] = __float2half(0.f);
        return;
    }
    const AttnSplit split = attn_split(L, window, P, min_split, sp);
    const int Pe = split.Pe, t0 = split.t0, n = split.t1 - split.t0;
    if (sp >= Pe) return;
    __syncthreads();
    const int groups = blockDim.x / NCH;
    const int ch = tid % NCH, grp = tid / NCH;
    uint4 vpre[VU];
#pragma unroll
    for (int u = 0; u < VU; ++u) {
        const int t = grp + u * groups;
        if (t < n) {
            const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
            vpre[u] = __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
        } else {
            vpre[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    float mx[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) mx[g] = -INFINITY;
    for (int t = tid; t < n; t += blockDim.x) {
        const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
        const uint4* kp = reinterpret_cast<const uint4*>(kc + (slot * Hkv + kvh) * D);
        uint4 kv[NCH];
#pragma unroll
        for (int c = 0; c < NCH; ++c) kv[c] = __ldg(kp + c);
        float s[GM];
#pragma unroll
        for (int g = 0; g < GM; ++g) s[g] = 0.f;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            const half2* kh = reinterpret_cast<const half2*>(&kv[c]);
            float2 f[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) f[j] = __half22float2(kh[j]);
#pragma unroll
            for (int g = 0; g < GM; ++g) {
                const float4 qa = *reinterpret_cast<const float4*>(qs + g * D + c * 8);
                const float4 qb = *reinterpret_cast<const float4*>(qs + g * D + c * 8 + 4);
                s[g] += f[0].x * qa.x + f[0].y * qa.y + f[1].x * qa.z + f[1].y * qa.w
                      + f[2].x * qb.x + f[2].y * qb.y + f[3].x * qb.z + f[3].y * qb.w;
            }
        }
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            const float sc = attn_softcap(s[g], softcap);
            scores[g * max_ctx + t] = sc;
            if (g < G) mx[g] = fmaxf(mx[g], sc);
        }
    }
    block_reduce_g<GM>(mx, red, true);
    float sum[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) sum[g] = 0.f;
    for (int t = tid; t < n; t += blockDim.x) {
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            const float e = g < G ? __expf(scores[g * max_ctx + t] - mx[g]) : 0.f;
            scores[g * max_ctx + t] = e;
            sum[g] += e;
        }
    }
    block_reduce_g<GM>(sum, red, false);  // also a barrier: probabilities visible to all
    float a[GM][8];
#pragma unroll
    for (int g = 0; g < GM; ++g)
#pragma unroll
        for (int j = 0; j < 8; ++j) a[g][j] = 0.f;
    for (int tb = grp; tb < n; tb += groups * VU) {
        const bool first = tb == grp;
        uint4 v[VU];
#pragma unroll
        for (int u = 0; u < VU; ++u) {
            const int t = tb + u * groups;
            if (t < n) {
                const long long slot = (long long)bts[(t0 + t) / BS] * BS + ((t0 + t) % BS);
                v[u] = first ? vpre[u] : __ldg(reinterpret_cast<const uint4*>(vc + (slot * Hkv + kvh) * D) + ch);
            } else {
                v[u] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
#pragma unroll
        for (int u = 0; u < VU; ++u) {
            const int t = tb + u * groups;
            if (t < n) {
                const half2* vh = reinterpret_cast<const half2*>(&v[u]);
                float2 f[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) f[j] = __half22float2(vh[j]);
#pragma unroll
                for (int g = 0; g < GM; ++g) {
                    const float p = scores[g * max_ctx + t];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        a[g][2 * j] += p * f[j].x;
                        a[g][2 * j + 1] += p * f[j].y;
                    }
                }
            }
        }
    }
    // the token groups of a warp (lanes ch, ch + NCH, ...) by shuffles, then the warps in shared memory
#pragma unroll
    for (int g = 0; g < GM; ++g)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int off = 16; off >= NCH; off >>= 1) a[g][j] += __shfl_xor_sync(0xffffffffu, a[g][j], off);
    if (lane < NCH)
#pragma unroll
        for (int g = 0; g < GM; ++g)
#pragma unroll
            for (int j = 0; j < 8; ++j) accbuf[(warp * GM + g) * D + ch * 8 + j] = a[g][j];
    __syncthreads();
    const long long bh0 = (long long)b * Hq + kvh * G;  // the first head's (b, h) index
    if (Pe == 1) {
#pragma unroll
        for (int g = 0; g < GM; ++g) {
            if (g >= G) break;
            const float inv = 1.f / sum[g];
            for (int d = tid; d < D; d += blockDim.x) {
                float acc = 0.f;
                for (int w = 0; w < nw; ++w) acc += accbuf[(w * GM + g) * D + d];
                o[g * D + d] = __float2half(acc * inv);
            }
        }
        return;
    }
#pragma unroll
    for (int g = 0; g < GM; ++g) {
        if (g >= G) break;
        for (int d = tid; d < D; d += blockDim.x) {
            float acc = 0.f;
            for (int w = 0; w < nw; ++w) acc += accbuf[(w * GM + g) * D + d];
            part_o[((bh0 + g) * P + sp) * D + d] = acc;
        }
        if (tid == 0) {
            part_ml[((bh0 + g) * P + sp) * 2] = mx[g];
            part_ml[((bh0 + g) * P + sp) * 2 + 1] = sum[g];
        }
    }
    const long long tk = (long long)b * Hkv + kvh;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(tickets + tk, 1u) == (unsigned)Pe - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the merge of each head as paged_attn_split's (loads issued together, splits summed in order)
    for (int i = tid; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        const long long bh = bh0 + g;
        float pm[ATTN_SPLIT_MAX], pl[ATTN_SPLIT_MAX], po[ATTN_SPLIT_MAX];
#pragma unroll
        for (int j = 0; j < ATTN_SPLIT_MAX; ++j) {
            pm[j] = j < Pe ? __ldcg(part_ml + (bh * P + j) * 2) : -INFINITY;
            pl[j] = j < Pe ? __ldcg(part_ml + (bh * P + j) * 2 + 1) : 0.f;
            po[j] = j < Pe ? __ldcg(part_o + (bh * P + j) * D + d) : 0.f;
        }
        float M = -INFINITY;
#pragma unroll
        for (int j = 0; j < ATTN_SPLIT_MAX; ++j)
            if (j < Pe) M = fmaxf(M, pm[j]);
        float l = 0.f, acc = 0.f;
#pragma unroll
        for (int j = 0; j < ATTN_SPLIT_MAX; ++j)
            if (j < Pe) {
                const float w = __expf(pm[j] - M);
                l += pl[j] * w;
                acc += po[j] * w;
            }
        o[g * D + d] = __float2half(acc / l);
    }
    if (tid == 0) tickets[tk] = 0u;
}

#define ATTN_GQA_INSTANCE(NAME, D, GM, MINB)                                                                      \
    extern "C" __global__ void __launch_bounds__(256, MINB) NAME(const half* q, const half* kc, const half* vc, const int* bt, \
        const int* ctx, half* out, float* part_o, float* part_ml, unsigned* tickets, int Hq, int Hkv,   \
        int BS, int max_blocks, int max_ctx, float scale, int min_split, int window, float softcap) {   \
        paged_attn_gqa_impl<D, GM>(q, kc, vc, bt, ctx, out, part_o, part_ml, tickets, Hq, Hkv, BS,       \
                                   max_blocks, max_ctx, scale, min_split, window, softcap); }

ATTN_GQA_INSTANCE(paged_attn_gqa4_d64, 64, 4, 2)
ATTN_GQA_INSTANCE(paged_attn_gqa4_d128, 128, 4, 2)
ATTN_GQA_INSTANCE(paged_attn_gqa8_d64, 64, 8, 1)
ATTN_GQA_INSTANCE(paged_attn_gqa8_d128, 128, 8, 1)

// Causal softmax over prefill attention scores S half [rows, L] in place; row r is query
// t = r % T at absolute position P + t, which sees keys [0, P + t] (on a sliding layer,
// window > 0: keys (P + t - window, P + t]); scores soft-capped first when softcap > 0.
extern "C" __global__ void causal_softmax(half* __restrict__ S, int L, int T, int P, int window, float softcap) {
    __shared__ float red[32];
    const long long r = blockIdx.x;
    const int t = (int)(r % T);
    const int valid = P + t + 1;
    const int lo = attn_window_start(valid, window);
    half* row = S + r * L;
    float mx = -INFINITY;
    for (int j = lo + threadIdx.x; j < valid; j += blockDim.x) mx = fmaxf(mx, attn_softcap(__half2float(row[j]), softcap));
    mx = block_reduce(mx, red, true);
    float sum = 0.f;
    for (int j = lo + threadIdx.x; j < valid; j += blockDim.x) sum += __expf(attn_softcap(__half2float(row[j]), softcap) - mx);
    sum = block_reduce(sum, red, false);
    const float inv = 1.f / sum;
    for (int j = threadIdx.x; j < L; j += blockDim.x)
        row[j] = __float2half(j >= lo && j < valid ? __expf(attn_softcap(__half2float(row[j]), softcap) - mx) * inv : 0.f);
}

