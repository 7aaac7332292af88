// ---------------------------------------------------------------------------------------
// The sentence encoder (BERT family: post-LayerNorm, GELU, bidirectional attention) on the GPU.
// Compiled after common.cuh, gemm_tc.cu (mma_16816, h2_as_u32) and flash_prefill.cu (cp.async /
// ldmatrix helpers, FA_KB / FA_QB / FA_PAD); see edge/runtime/cuda/embedder.py.
//
// A batch is packed without padding: T token rows, sequence b at rows off[b] .. off[b] + len[b].
// The GEMMs (cuBLAS, fp16 in, fp32 accumulate) run over all T rows; attention keeps to each
// sequence, so a text's embedding does not depend on what else is in the batch.
//   h32  float [T, H]   residual stream (LayerNorm outputs, fp32)
//   h16  half  [T, H]   the same rows in fp16: the next GEMM's input
//   qkv  half  [T, 3H]  q | k | v of every head (head h at columns h*D of each third)
// ---------------------------------------------------------------------------------------
#define ENC_MAX_PER_LANE 32  // H <= 1024 (values of one row held per lane)

// LayerNorm of one row held in registers (v[i] = column lane + 32 i), one warp per row.
__device__ __forceinline__ void enc_row_layernorm(float* v, int H, const float* __restrict__ gamma, const float* __restrict__ beta,
                                                  float eps, half* __restrict__ out16, float* __restrict__ out32) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ENC_MAX_PER_LANE; ++i)
        if (lane + 32 * i < H) s += v[i];
    const float mean = warp_sum(s) / H;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < ENC_MAX_PER_LANE; ++i)
        if (lane + 32 * i < H) {
            const float d = v[i] - mean;
            q += d * d;
        }
    const float rstd = rsqrtf(warp_sum(q) / H + eps);
#pragma unroll
    for (int i = 0; i < ENC_MAX_PER_LANE; ++i) {
        const int j = lane + 32 * i;
        if (j < H) {
            const float y = (v[i] - mean) * rstd * gamma[j] + beta[j];
            out32[j] = y;
            out16[j] = __float2half(y);
        }
    }
}

// word[ids] + pos[positions] (token type 0 folded into pos) -> LayerNorm -> h32, h16.
// grid ceil(T / 8), 256 threads (one warp per token).
extern "C" __global__ void __launch_bounds__(256) enc_embed_layernorm(
    const int* __restrict__ ids, const int* __restrict__ positions, const half* __restrict__ word, const half* __restrict__ pos,
    const float* __restrict__ gamma, const float* __restrict__ beta, half* __restrict__ h16, float* __restrict__ h32,
    int T, int H, float eps) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= T) return;
    const half* w = word + (long long)ids[row] * H;
    const half* p = pos + (long long)positions[row] * H;
    float v[ENC_MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < ENC_MAX_PER_LANE; ++i) {
        const int j = lane + 32 * i;
        v[i] = j < H ? __half2float(w[j]) + __half2float(p[j]) : 0.f;
    }
    enc_row_layernorm(v, H, gamma, beta, eps, h16 + (long long)row * H, h32 + (long long)row * H);
}

// h = LayerNorm(y + bias + h32) (y: a linear's output without its bias) -> h32 (in place), h16.
// grid ceil(T / 8), 256 threads.
extern "C" __global__ void __launch_bounds__(256) enc_bias_residual_layernorm(
    const half* __restrict__ y, const float* __restrict__ bias, float* h32, const float* __restrict__ gamma,
    const float* __restrict__ beta, half* __restrict__ h16, int T, int H, float eps) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= T) return;
    const half* yr = y + (long long)row * H;
    float* r = h32 + (long long)row * H;
    float v[ENC_MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < ENC_MAX_PER_LANE; ++i) {
        const int j = lane + 32 * i;
        v[i] = j < H ? __half2float(yr[j]) + bias[j] + r[j] : 0.f;  // every read of the row before any write
    }
    enc_row_layernorm(v, H, gamma, beta, eps, h16 + (long long)row * H, r);
}

// x = gelu(x + bias) in place, the exact (erf) GELU of BERT. x half [T, I], I even. Grid-stride.
extern "C" __global__ void enc_bias_gelu(half2* x, const float* __restrict__ bias, long long n2, int I2) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n2; i += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(i % I2) * 2;
        float2 f = __half22float2(x[i]);
        const float a = f.x + bias[c], b = f.y + bias[c + 1];
        x[i] = __floats2half2_rn(0.5f * a * (1.f + erff(a * 0.70710678118654752f)), 0.5f * b * (1.f + erff(b * 0.70710678118654752f)));
    }
}

// K and V rows [kb, kb + FA_KB) of one head of one sequence into one shared-memory stage
// (rows past L zero-filled; masked below). k0: the sequence's first K row of the head; V is
// Hd columns further.
template <int D>
__device__ __forceinline__ void enc_load_tile(half* Ks, half* Vs, const half* __restrict__ k0, int ld, int Hd, int kb, int L) {
    constexpr int CH = D / 8, LDS = D + FA_PAD;
    for (int i = threadIdx.x; i < FA_KB * CH; i += blockDim.x) {
        const int r = i / CH, ch = i % CH, key = kb + r;
        const long long at = key < L ? (long long)key * ld + ch * 8 : 0;
        const int n = key < L ? 16 : 0;
        cp_async16(Ks + r * LDS + ch * 8, k0 + at, n);
        cp_async16(Vs + r * LDS + ch * 8, k0 + Hd + at, n);
    }
}

// Bidirectional attention of every token of a sequence over the same sequence, on tensor cores:
// flash_prefill's FA2 shape (4 warps x 16 queries, keys in tiles of 64 through two cp.async
// stages, S and P in registers) without the causal mask or the paged gather.
// Biases: q's is added to the Q fragments; k's is dropped, since q . (k + bk) = q . k + q . bk
// and q . bk is the same for every key of a query, which the softmax cancels; v's is added to the
// output (the probabilities sum to one). So the QKV GEMM needs no bias pass.
// grid (ceil(max_len / 64), heads, B), 128 threads, flash_prefill_smem(D) bytes of shared memory.
template <int D>
__device__ __forceinline__ void encoder_attention(const half* __restrict__ qkv, const half* __restrict__ bq,
                                                  const half* __restrict__ bv, const int* __restrict__ off,
                                                  const int* __restrict__ lens, half* __restrict__ out, int Hd, float scale_log2) {
    constexpr int DS = D / 16, DN = D / 8, LDS = D + FA_PAD, STAGE = FA_KB * LDS;
    extern __shared__ __align__(16) unsigned char enc_smem[];
    half* Kst = reinterpret_cast<half*>(enc_smem);  // [2][FA_KB][LDS]
    half* Vst = Kst + 2 * STAGE;                     // [2][FA_KB][LDS]
    const int b = blockIdx.z, h = blockIdx.y, L = lens[b], q0 = blockIdx.x * FA_QB;
    if (q0 >= L) return;  // the grid is sized for the batch's longest sequence
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int ld = 3 * Hd;
    const half* q = qkv + (long long)off[b] * ld + h * D;
    const half* k0 = q + Hd;
    const int ntiles = (L + FA_KB - 1) / FA_KB;
    enc_load_tile<D>(Kst, Vst, k0, ld, Hd, 0, L);
    cp_async_commit();
    u32 qa[DS][4];  // Q + bq fragments of this warp's 16 rows (rows past L read row L-1, never written)
    {
        const int r0 = min(q0 + warp * 16 + g, L - 1), r1 = min(q0 + warp * 16 + g + 8, L - 1);
        const half* q0p = q + (long long)r0 * ld;
        const half* q1p = q + (long long)r1 * ld;
        const half* bqh = bq + h * D;
#pragma unroll
        for (int s = 0; s < DS; ++s) {
            const half2 b0 = *reinterpret_cast<const half2*>(bqh + 16 * s + 2 * c);
            const half2 b1 = *reinterpret_cast<const half2*>(bqh + 16 * s + 2 * c + 8);
            qa[s][0] = h2_as_u32(__hadd2(*reinterpret_cast<const half2*>(q0p + 16 * s + 2 * c), b0));
            qa[s][1] = h2_as_u32(__hadd2(*reinterpret_cast<const half2*>(q1p + 16 * s + 2 * c), b0));
            qa[s][2] = h2_as_u32(__hadd2(*reinterpret_cast<const half2*>(q0p + 16 * s + 2 * c + 8), b1));
            qa[s][3] = h2_as_u32(__hadd2(*reinterpret_cast<const half2*>(q1p + 16 * s + 2 * c + 8), b1));
        }
    }
    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
    float mrow[2] = {-1e30f, -1e30f}, lrow[2] = {0.f, 0.f};
    const int k_row = lane & 7, k_col = 8 * (lane >> 3);
    const int v_row = (lane & 7) + 8 * ((lane >> 3) & 1), v_col = 8 * (lane >> 4);
    for (int it = 0; it < ntiles; ++it) {
        const int kb = it * FA_KB;
        if (it + 1 < ntiles) {
            enc_load_tile<D>(Kst + ((it + 1) & 1) * STAGE, Vst + ((it + 1) & 1) * STAGE, k0, ld, Hd, kb + FA_KB, L);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const half* Ks = Kst + (it & 1) * STAGE;
        const half* Vs = Vst + (it & 1) * STAGE;
        float sc[8][4];  // S = Q K^T: 16 rows x 64 keys
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[nt][e] = 0.f;
#pragma unroll
            for (int s = 0; s < DS; s += 2) {
                u32 b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, Ks + (nt * 8 + k_row) * LDS + 16 * s + k_col);
                mma_16816(sc[nt], qa[s][0], qa[s][1], qa[s][2], qa[s][3], b0, b1);
                mma_16816(sc[nt], qa[s + 1][0], qa[s + 1][1], qa[s + 1][2], qa[s + 1][3], b2, b3);
            }
        }
        const bool tail = kb + FA_KB > L;  // only the last tile holds keys past the sequence
        float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float v = sc[nt][e] * scale_log2;
                if (tail && kb + nt * 8 + 2 * c + (e & 1) >= L) v = -INFINITY;
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
            pa[nt >> 1][(nt & 1) * 2 + 0] = h2_as_u32(__floats2half2_rn(e0, e1));
            pa[nt >> 1][(nt & 1) * 2 + 1] = h2_as_u32(__floats2half2_rn(e2, e3));
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
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {  // O += P V
#pragma unroll
            for (int n = 0; n < DN; n += 2) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3, Vs + (kk * 16 + v_row) * LDS + n * 8 + v_col);
                mma_16816(o[n], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b0, b1);
                mma_16816(o[n + 1], pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], b2, b3);
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    const float inv0 = 1.f / lrow[0], inv1 = 1.f / lrow[1];
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    half* ob = out + (long long)off[b] * Hd + h * D;
#pragma unroll
    for (int n = 0; n < DN; ++n) {
        const int d = n * 8 + 2 * c;
        const float2 bb = __half22float2(*reinterpret_cast<const half2*>(bv + h * D + d));
        if (r0 < L) *reinterpret_cast<half2*>(ob + (long long)r0 * Hd + d) = __floats2half2_rn(o[n][0] * inv0 + bb.x, o[n][1] * inv0 + bb.y);
        if (r1 < L) *reinterpret_cast<half2*>(ob + (long long)r1 * Hd + d) = __floats2half2_rn(o[n][2] * inv1 + bb.x, o[n][3] * inv1 + bb.y);
    }
}

#define ENCODER_ATTENTION_INSTANCE(NAME, D)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) NAME(const half* qkv, const half* bq, const half* bv,  \
                                                           const int* off, const int* lens, half* out, int Hd, \
                                                           float scale_log2) {                               \
        encoder_attention<D>(qkv, bq, bv, off, lens, out, Hd, scale_log2);                                   \
    }
ENCODER_ATTENTION_INSTANCE(enc_attention_d32, 32)
ENCODER_ATTENTION_INSTANCE(enc_attention_d64, 64)

// Pooling over each sequence's rows of h32 (mode 0 mean, 1 cls, 2 max), then L2 normalisation
// when `normalize`. out float [B, H]. grid B, 256 threads.
extern "C" __global__ void __launch_bounds__(256) enc_pool(const float* __restrict__ h32, const int* __restrict__ off,
                                                           const int* __restrict__ lens, float* __restrict__ out, int H,
                                                           int mode, int normalize) {
    __shared__ float red[32];
    const int b = blockIdx.x, L = lens[b];
    const float* x = h32 + (long long)off[b] * H;
    float ss = 0.f;
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        float v;
        if (mode == 1) {
            v = x[j];
        } else if (mode == 2) {
            v = -INFINITY;
            for (int r = 0; r < L; ++r) v = fmaxf(v, x[(long long)r * H + j]);
        } else {
            v = 0.f;
            for (int r = 0; r < L; ++r) v += x[(long long)r * H + j];
            v /= (float)L;
        }
        out[(long long)b * H + j] = v;
        ss += v * v;
    }
    if (!normalize) return;
    const float tot = block_reduce(ss, red, false);
    const float inv = 1.f / fmaxf(sqrtf(tot), 1e-12f);  // torch.nn.functional.normalize's eps
    for (int j = threadIdx.x; j < H; j += blockDim.x) out[(long long)b * H + j] *= inv;
}
