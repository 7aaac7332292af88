// ---------------------------------------------------------------------------------------
// The fp32 compute mode (edge.runtime.cuda.fp32): the layer ops and attention of the decoder
// block with float activations and a float KV cache, compiled as their own module (after
// common.cuh) without --use_fast_math. Same names, launch shapes and argument order as the
// fp16 kernels of layer_ops.cu, so the session's layer loop launches either; attention is one
// plain kernel for decode and one for prefill (a reference path: correct first, simple loops).
// The linears are cuBLAS SGEMMs (fp32 compute, no TF32), launched from Python.
//
// Layouts as the fp16 path (kernels_src.py), with float for half: activations float [M, K],
// KV cache float [num_slots, Hkv, D], q/k rows of the fused qkv paired per head for RoPE.
// ---------------------------------------------------------------------------------------

// out[m] = res[m] * 1 / sqrt(mean(res[m]^2) + eps) * w, res[m] already final (one block per row).
__device__ __forceinline__ void rmsnorm_row_f32(const float* __restrict__ r, const float* __restrict__ w,
                                                float* __restrict__ o, int H, float eps, float ss, float* red) {
    ss = block_reduce(ss, red, false);
    const float inv = 1.f / sqrtf(ss / H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = r[i] * inv * w[i];
}

// res[m] = emb[ids[m]] * scale.
extern "C" __global__ void embed(const int* __restrict__ ids, const float* __restrict__ emb,
                                 float* __restrict__ res, int H, float scale) {
    const int m = blockIdx.x;
    const float* row = emb + (long long)ids[m] * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) res[(long long)m * H + i] = row[i] * scale;
}

// res[m] = emb[ids[m]] * scale; out[m] = RMSNorm(res[m]) * w. inv_out: the fp16 kernel's argument
// (the shared layer loop passes it); fp32 mode folds no norm, so nothing reads it and it is not written.
extern "C" __global__ void embed_rmsnorm(const int* __restrict__ ids, const float* __restrict__ emb,
                                         const float* __restrict__ w, float* __restrict__ res,
                                         float* __restrict__ out, int H, float eps, float scale, float* inv_out) {
    __shared__ float red[32];
    const int m = blockIdx.x;
    const float* row = emb + (long long)ids[m] * H;
    float* r = res + (long long)m * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = row[i] * scale;
        r[i] = v;
        ss += v * v;
    }
    rmsnorm_row_f32(r, w, out + (long long)m * H, H, eps, ss, red);
}

// res[m] += x[m] (x may be null); out[m] = RMSNorm(res[m]) * w. inv_out: as embed_rmsnorm's (unused).
extern "C" __global__ void add_rmsnorm(float* __restrict__ res, const float* __restrict__ x,
                                       const float* __restrict__ w, float* __restrict__ out, int H, float eps,
                                       float* inv_out) {
    __shared__ float red[32];
    const int m = blockIdx.x;
    float* r = res + (long long)m * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = r[i];
        if (x) { v += x[(long long)m * H + i]; r[i] = v; }
        ss += v * v;
    }
    rmsnorm_row_f32(r, w, out + (long long)m * H, H, eps, ss, red);
}

// Sandwich norms: res[m] += RMSNorm(x[m]) * wx; out[m] = RMSNorm(res[m]) * w.
extern "C" __global__ void norm_add_rmsnorm(float* __restrict__ res, const float* __restrict__ x,
                                            const float* __restrict__ wx, const float* __restrict__ w,
                                            float* __restrict__ out, int H, float eps) {
    __shared__ float red[32];
    const long long base = (long long)blockIdx.x * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) ss += x[base + i] * x[base + i];
    ss = block_reduce(ss, red, false);
    const float inv_x = 1.f / sqrtf(ss / H + eps);
    float sr = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = res[base + i] + x[base + i] * inv_x * wx[i];
        res[base + i] = v;
        sr += v * v;
    }
    rmsnorm_row_f32(res + base, w, out + base, H, eps, sr, red);
}

// Per-head RMSNorm of q and k in place on the fused qkv rows (paired order, as wq / wk).
// Grid (M, Hq + Hkv), one warp each.
extern "C" __global__ void qk_rmsnorm(float* __restrict__ qkv, const float* __restrict__ wq,
                                      const float* __restrict__ wk, int Hq, int Hkv, int D, float eps) {
    const int m = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    float* x = qkv + (long long)m * (Hq + 2 * Hkv) * D + (long long)h * D;
    const float* w = h < Hq ? wq : wk;
    float ss = 0.f;
    for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(warp_sum(ss) / D + eps);
    for (int i = lane; i < D; i += 32) x[i] = x[i] * inv * w[i];
}

// RoPE on q and k of the fused qkv rows (pairs (i, i + D/2), stored adjacent per head); q to
// q_out [M, Hq*D] in HF order, rotated k and v into the paged cache at slots[m] (< 0: none).
// Grid (M, any), one (head, pair) or v element per thread.
extern "C" __global__ void rope_cache(const float* __restrict__ qkv, const int* __restrict__ pos,
                                      const int* __restrict__ slots, const float* __restrict__ cosb,
                                      const float* __restrict__ sinb, float* __restrict__ q_out,
                                      float* __restrict__ kc, float* __restrict__ vc, int Hq, int Hkv, int D) {
    const int m = blockIdx.x, half_d = D >> 1;
    const float* row = qkv + (long long)m * (Hq + 2 * Hkv) * D;
    const int p = pos[m], slot = slots[m], pairs = (Hq + Hkv) * half_d;
    for (int t = blockIdx.y * blockDim.x + threadIdx.x; t < pairs + Hkv * D; t += blockDim.x * gridDim.y) {
        if (t < pairs) {
            const int h = t / half_d, i = t % half_d;
            const float x1 = row[h * D + 2 * i], x2 = row[h * D + 2 * i + 1];
            const float c = cosb[(long long)p * half_d + i], s = sinb[(long long)p * half_d + i];
            const float o1 = x1 * c - x2 * s, o2 = x2 * c + x1 * s;
            if (h < Hq) {
                q_out[(long long)m * Hq * D + h * D + i] = o1;
                q_out[(long long)m * Hq * D + h * D + i + half_d] = o2;
            } else if (slot >= 0) {
                float* dst = kc + ((long long)slot * Hkv + (h - Hq)) * D;
                dst[i] = o1;
                dst[i + half_d] = o2;
            }
        } else if (slot >= 0) {
            const int j = t - pairs;
            vc[(long long)slot * Hkv * D + j] = row[(Hq + Hkv) * D + j];
        }
    }
}

// out[m, j] = act(gu[m, 2j]) * gu[m, 2j + 1] (gate / up interleaved), act SiLU or GeLU-tanh.
template <bool GELU>
__device__ __forceinline__ void glu_mul_f32(const float* __restrict__ gu, float* __restrict__ out, int M, int I) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)M * I) return;
    const float g = gu[2 * i], u = gu[2 * i + 1];
    const float a = GELU ? 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                         : g / (1.f + expf(-g));
    out[i] = a * u;
}

extern "C" __global__ void silu_mul(const float* __restrict__ gu, float* __restrict__ out, int M, int I) {
    glu_mul_f32<false>(gu, out, M, I);
}

extern "C" __global__ void gelu_tanh_mul(const float* __restrict__ gu, float* __restrict__ out, int M, int I) {
    glu_mul_f32<true>(gu, out, M, I);
}

// softmax(scores over the keys [lo, lo + n) of one query) . V for one (query, head): `key_slot(j)`
// gives key lo + j's cache slot. Shared memory: scores [n], q [D], red [32].
template <typename SlotOf>
__device__ __forceinline__ void attend_one_f32(const float* __restrict__ q, const float* __restrict__ kc,
                                               const float* __restrict__ vc, float* __restrict__ o, int n, int Hkv,
                                               int kvh, int D, float scale, float softcap, SlotOf key_slot, float* sm) {
    float* scores = sm;
    float* qs = sm + n;
    float* red = qs + D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = q[d];
    __syncthreads();
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float* k = kc + ((long long)key_slot(j) * Hkv + kvh) * D;
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += qs[d] * k[d];
        s = attn_softcap(s * scale, softcap);
        scores[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_reduce(mx, red, true);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(scores[j] - mx);
        scores[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, false);  // also the barrier before scores are read across threads
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < n; ++j) acc += scores[j] * vc[((long long)key_slot(j) * Hkv + kvh) * D + d];
        o[d] = acc / sum;
    }
}

// Decode attention over the paged cache: grid (Hq, B); row b has ctx[b] cached tokens (0: a
// padding row, zeros out), of which it reads [attn_window_start(L, window), L). Dynamic shared
// memory: (max_ctx + D + 32) floats.
extern "C" __global__ void paged_attn_f32(const float* __restrict__ q, const float* __restrict__ kc,
                                          const float* __restrict__ vc, const int* __restrict__ block_tables,
                                          const int* __restrict__ ctx, float* __restrict__ out, int Hq, int Hkv, int D,
                                          int BS, int max_blocks, float scale, int window, float softcap) {
    extern __shared__ float sm[];
    const int h = blockIdx.x, b = blockIdx.y, L = ctx[b];
    float* o = out + ((long long)b * Hq + h) * D;
    if (L <= 0) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = 0.f;
        return;
    }
    const int lo = attn_window_start(L, window);
    const int* bt = block_tables + (long long)b * max_blocks;
    auto slot = [=](int j) { const int t = lo + j; return bt[t / BS] * BS + t % BS; };
    attend_one_f32(q + ((long long)b * Hq + h) * D, kc, vc, o, L - lo, Hkv, h / (Hq / Hkv), D, scale, softcap, slot, sm);
}

// Prefill attention: grid (T, Hq); query i sits at position P + i and reads keys
// [attn_window_start(P + i + 1, window), P + i] of the sequence, key j at slots[j]. q, out
// [T, Hq*D]. Dynamic shared memory: (P + T + D + 32) floats.
extern "C" __global__ void prefill_attn_f32(const float* __restrict__ q, const float* __restrict__ kc,
                                            const float* __restrict__ vc, const int* __restrict__ slots,
                                            float* __restrict__ out, int T, int P, int Hq, int Hkv, int D,
                                            float scale, int window, float softcap) {
    extern __shared__ float sm[];
    const int i = blockIdx.x, h = blockIdx.y, L = P + i + 1;
    const int lo = attn_window_start(L, window);
    auto slot = [=](int j) { return slots[lo + j]; };
    const long long row = ((long long)i * Hq + h) * D;
    attend_one_f32(q + row, kc, vc, out + row, L - lo, Hkv, h / (Hq / Hkv), D, scale, softcap, slot, sm);
}
