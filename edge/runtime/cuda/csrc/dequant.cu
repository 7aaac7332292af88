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

