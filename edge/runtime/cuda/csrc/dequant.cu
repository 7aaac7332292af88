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

// Same, 4 words a thread: a block of 256 threads covers 1024 consecutive words, thread t words
// t, t + 256, t + 512, t + 768 (each load and store instruction coalesced across the warp; four
// loads in flight before the first store).
extern "C" __global__ void dequant_int4_x4(const u32* __restrict__ W, const half* __restrict__ S,
                                           half* __restrict__ out, int N, int K, int gshift) {
    const long long words = (long long)N * (K >> 3);
    const long long base = (long long)blockIdx.x * 1024 + threadIdx.x;
    u32 q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = base + 256 * j < words ? W[base + 256 * j] : 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const long long i = base + 256 * j;
        if (i >= words) return;
        const int n = (int)(i / (K >> 3));
        const int k0 = (int)(i % (K >> 3)) << 3;
        const half2 s = __half2half2(S[(long long)n * (K >> gshift) + (k0 >> gshift)]);
        half2 w[4];
        deq_int4_word(q[j], w);
        uint4 o;
        o.x = h2_bits(__hmul2(w[0], s));
        o.y = h2_bits(__hmul2(w[1], s));
        o.z = h2_bits(__hmul2(w[2], s));
        o.w = h2_bits(__hmul2(w[3], s));
        *reinterpret_cast<uint4*>(out + (long long)n * K + k0) = o;
    }
}

// Same, 4 consecutive words of one row a thread (one 16-byte load, 32 values, 64 bytes stored),
// 32-bit index math (N * K / 32 < 2^31 for every linear here). Needs K % 32 == 0.
extern "C" __global__ void dequant_int4_v4(const uint4* __restrict__ W, const half* __restrict__ S,
                                           half* __restrict__ out, int N, int K, int gshift) {
    const int per_row = K >> 5;  // 16-byte loads per weight row
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * per_row) return;
    const int n = i / per_row, k0 = (i - n * per_row) << 5;
    const uint4 q = W[i];
    const u32 qw[4] = {q.x, q.y, q.z, q.w};
    const half* srow = S + (long long)n * (K >> gshift);
    uint4* dst = reinterpret_cast<uint4*>(out + (long long)n * K + k0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const half2 s = __half2half2(srow[(k0 + 8 * j) >> gshift]);
        half2 w[4];
        deq_int4_word(qw[j], w);
        uint4 o;
        o.x = h2_bits(__hmul2(w[0], s));
        o.y = h2_bits(__hmul2(w[1], s));
        o.z = h2_bits(__hmul2(w[2], s));
        o.w = h2_bits(__hmul2(w[3], s));
        dst[j] = o;
    }
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

