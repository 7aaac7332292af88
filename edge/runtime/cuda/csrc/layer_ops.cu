// ---------------------------------------------------------------------------------------
// Embedding gather into the float residual stream: res[m, :] = emb[ids[m], :] * scale
// (scale: the architecture's embedding scale, Gemma's sqrt(H); 1 elsewhere; applied in float,
// so a tied table stays the head's weights as stored).
// ---------------------------------------------------------------------------------------
extern "C" __global__ void embed(const int* __restrict__ ids, const half* __restrict__ emb,
                                 float* __restrict__ res, int H, float scale) {
    const int m = blockIdx.x;
    const half* row = emb + (long long)ids[m] * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) res[(long long)m * H + i] = __half2float(row[i]) * scale;
}

// Embedding gather fused with the first layer's RMSNorm: res[m] = emb[ids[m]] * scale (float),
// out[m] = half(res[m] * rsqrt(mean(res[m]^2) + eps) * w). One block per row; the row is held
// in registers (H % 4 == 0 and H <= 32 blockDim), all loads issued at once. inv_out (may be
// null): row 0's 1 / rms, the scale the first folded norm's producer writes X' with (gemv_int4_bk_fold).
extern "C" __global__ void embed_rmsnorm(const int* __restrict__ ids, const half* __restrict__ emb,
                                         const half* __restrict__ w, float* __restrict__ res,
                                         half* __restrict__ out, int H, float eps, float scale, float* inv_out) {
    __shared__ float red[32];
    constexpr int MAXV = 8;
    pdl_wait();
    pdl_trigger();
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
            rv[j] = make_float4(a.x * scale, a.y * scale, b.x * scale, b.y * scale);
            reinterpret_cast<float4*>(res + (long long)m * H)[i] = rv[j];
        } else {
            rv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        ss += rv[j].x * rv[j].x + rv[j].y * rv[j].y + rv[j].z * rv[j].z + rv[j].w * rv[j].w;
    }
    ss = block_reduce(ss, red, false);
    const float inv = rsqrtf(ss / H + eps);
    if (inv_out && m == 0 && t == 0) *inv_out = inv;
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
// rsqrt(mean(res[m]^2) + eps) * w). One block per row. inv_out (may be null): row 0's 1 / rms, the
// scale of the next folded norm's X' (gemv_int4_bk_fold).
extern "C" __global__ void add_rmsnorm(float* __restrict__ res, const half* __restrict__ x,
                                       const half* __restrict__ w, half* __restrict__ out, int H, float eps,
                                       float* inv_out) {
    __shared__ float red[32];
    const int m = blockIdx.x;
    float* r = res + (long long)m * H;
    float ss = 0.f;
    constexpr int MAXV = 4;
    const int n4 = H >> 2, t = threadIdx.x;
    const bool fast = (H & 3) == 0 && n4 <= MAXV * (int)blockDim.x;
    // the norm weight (no kernel of the step writes it) before pdl_wait: off the critical path
    uint2 wpre[MAXV];
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
        const int i = t + j * blockDim.x;
        wpre[j] = fast && i < n4 ? reinterpret_cast<const uint2*>(w)[i] : make_uint2(0u, 0u);
    }
    pdl_wait();
    pdl_trigger();
    if (fast) {  // the row in registers: one round trip
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
        if (inv_out && m == 0 && t == 0) *inv_out = inv;
#pragma unroll
        for (int j = 0; j < MAXV; ++j) {
            const int i = t + j * blockDim.x;
            if (i < n4) {
                const uint2 wv = wpre[j];
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
    if (inv_out && m == 0 && threadIdx.x == 0) *inv_out = inv;
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

// Same, two rotation pairs (i, i + 1) a thread: 8-byte loads of x and of cos / sin, half2 stores;
// V copied 16 bytes a thread (a 2,048-token prefill's rope_cache ran at ~1 TB/s on 2-byte accesses).
// The same arithmetic per element: the same bits. Needs D % 8 == 0; grid (M, ceil(items / threads)).
extern "C" __global__ void rope_cache_x2(const half* __restrict__ qkv, const int* __restrict__ pos,
                                         const int* __restrict__ slots, const float* __restrict__ cosb,
                                         const float* __restrict__ sinb, half* __restrict__ q_out,
                                         half* __restrict__ kc, half* __restrict__ vc,
                                         int Hq, int Hkv, int D) {
    const int m = blockIdx.x;
    const int half_d = D >> 1, hp = half_d >> 1;  // pair-couples per head
    const half* row = qkv + (long long)m * (Hq + 2 * Hkv) * D;
    const int p = pos[m];
    const int slot = slots[m];
    const int items = (Hq + Hkv) * hp;
    for (int t = blockIdx.y * blockDim.x + threadIdx.x; t < items + Hkv * D / 8; t += blockDim.x * gridDim.y) {
        if (t < items) {
            const int h = t / hp, i = 2 * (t % hp);
            const uint2 xv = *reinterpret_cast<const uint2*>(row + h * D + 2 * i);  // (x_i, x_i+D/2, x_i+1, x_i+1+D/2)
            const half2 a = u32_as_h2(xv.x), b = u32_as_h2(xv.y);
            const float2 c = *reinterpret_cast<const float2*>(cosb + (long long)p * half_d + i);
            const float2 sn = *reinterpret_cast<const float2*>(sinb + (long long)p * half_d + i);
            const float a1 = __low2float(a), a2 = __high2float(a), b1 = __low2float(b), b2 = __high2float(b);
            const half2 lo = __halves2half2(__float2half(a1 * c.x - a2 * sn.x), __float2half(b1 * c.y - b2 * sn.y));
            const half2 hi = __halves2half2(__float2half(a2 * c.x + a1 * sn.x), __float2half(b2 * c.y + b1 * sn.y));
            half* dst;
            if (h < Hq) {
                dst = q_out + (long long)m * Hq * D + h * D;
            } else {
                if (slot < 0) continue;
                dst = kc + ((long long)slot * Hkv + (h - Hq)) * D;
            }
            *reinterpret_cast<half2*>(dst + i) = lo;
            *reinterpret_cast<half2*>(dst + i + half_d) = hi;
        } else if (slot >= 0) {
            const int j = t - items;  // 16-byte chunk of v [0, Hkv*D/8)
            reinterpret_cast<uint4*>(vc + (long long)slot * Hkv * D)[j] = reinterpret_cast<const uint4*>(row + (Hq + Hkv) * D)[j];
        }
    }
}

// Gated MLP activation: out[m, j] = act(gate) * up, gu: half [M, 2I] with gate and up columns
// interleaved (2j = gate_j, 2j + 1 = up_j: the session interleaves the fused weight's rows),
// out: half [M, I]. act: SiLU (SwiGLU) or GeLU with the tanh approximation (GeGLU, Gemma).
__device__ __forceinline__ float act_silu(float g) { return g / (1.f + __expf(-g)); }
__device__ __forceinline__ float act_gelu_tanh(float g) {
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

template <bool GELU>
__device__ __forceinline__ void glu_mul(const half* __restrict__ gu, half* __restrict__ out, int M, int I) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)M * I) return;
    const half2 p = reinterpret_cast<const half2*>(gu)[i];  // row m = i / I, pair j = i % I
    const float g = __low2float(p), u = __high2float(p);
    out[i] = __float2half((GELU ? act_gelu_tanh(g) : act_silu(g)) * u);
}

// Same, four (gate, up) pairs a thread: one 16-byte load, one 8-byte store (one half2 load and a
// 2-byte store a thread ran a 2,048-token prefill's 100 MB a layer at ~2 TB/s). The same
// arithmetic per element: the same bits. n4 = M * I / 4 (the session checks M * I % 4 == 0).
template <bool GELU>
__device__ __forceinline__ void glu_mul_x4(const half* __restrict__ gu, half* __restrict__ out, int n4) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    const uint4 p = reinterpret_cast<const uint4*>(gu)[i];
    const u32 pw[4] = {p.x, p.y, p.z, p.w};
    half r[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const half2 h = u32_as_h2(pw[j]);
        const float g = __low2float(h), u = __high2float(h);
        r[j] = __float2half((GELU ? act_gelu_tanh(g) : act_silu(g)) * u);
    }
    uint2 o;
    o.x = h2_bits(__halves2half2(r[0], r[1]));
    o.y = h2_bits(__halves2half2(r[2], r[3]));
    reinterpret_cast<uint2*>(out)[i] = o;
}

extern "C" __global__ void silu_mul_x4(const half* __restrict__ gu, half* __restrict__ out, int n4) {
    glu_mul_x4<false>(gu, out, n4);
}

extern "C" __global__ void gelu_tanh_mul_x4(const half* __restrict__ gu, half* __restrict__ out, int n4) {
    glu_mul_x4<true>(gu, out, n4);
}

extern "C" __global__ void silu_mul(const half* __restrict__ gu, half* __restrict__ out, int M, int I) {
    glu_mul<false>(gu, out, M, I);
}

extern "C" __global__ void gelu_tanh_mul(const half* __restrict__ gu, half* __restrict__ out, int M, int I) {
    glu_mul<true>(gu, out, M, I);
}

// Sandwich norms (Gemma 2/3): the sublayer output is normed before the residual add, then the
// next norm is taken: res[m] += RMSNorm(x[m]) * wx; out[m] = half(RMSNorm(res[m]) * w).
// One block per row (two block reductions; x is read twice, from L2).
extern "C" __global__ void norm_add_rmsnorm(float* __restrict__ res, const half* __restrict__ x,
                                            const half* __restrict__ wx, const half* __restrict__ w,
                                            half* __restrict__ out, int H, float eps) {
    __shared__ float red[32];
    const long long base = (long long)blockIdx.x * H;
    float ss = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = __half2float(x[base + i]);
        ss += v * v;
    }
    ss = block_reduce(ss, red, false);
    const float inv_x = rsqrtf(ss / H + eps);
    float sr = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = res[base + i] + __half2float(x[base + i]) * inv_x * __half2float(wx[i]);
        res[base + i] = v;
        sr += v * v;
    }
    sr = block_reduce(sr, red, false);
    const float inv = rsqrtf(sr / H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        out[base + i] = __float2half(res[base + i] * inv * __half2float(w[i]));
}

// Per-head RMSNorm of q and k (Qwen3, Gemma 3), in place on the fused qkv rows before RoPE:
// head h < Hq + Hkv of row m is normed over its D values. The rows are in the session's paired
// order (2i = x_i, 2i + 1 = x_{i+D/2}) and so are wq / wk [D] (permuted the same way at load:
// the sum of squares does not depend on the order). Grid (M, Hq + Hkv), one warp each.
extern "C" __global__ void qk_rmsnorm(half* __restrict__ qkv, const half* __restrict__ wq,
                                      const half* __restrict__ wk, int Hq, int Hkv, int D, float eps) {
    const int m = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    half* x = qkv + (long long)m * (Hq + 2 * Hkv) * D + (long long)h * D;
    const half* w = h < Hq ? wq : wk;
    float ss = 0.f;
    for (int i = lane; i < D; i += 32) {
        const float v = __half2float(x[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(warp_sum(ss) / D + eps);
    for (int i = lane; i < D; i += 32) x[i] = __float2half(__half2float(x[i]) * inv * __half2float(w[i]));
}

// Soft-capping of float logits in place: x = cap * tanh(x / cap) (Gemma's final_logit_softcapping).
extern "C" __global__ void softcap_f32(float* __restrict__ x, long long n, float cap) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}
