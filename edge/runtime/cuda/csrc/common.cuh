
#include <cuda_fp16.h>

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
typedef unsigned int u32;
typedef unsigned char u8;

// Programmatic dependent launch (sm_90+; no-ops below, and when a kernel was launched without the
// attribute). A decode-step kernel launched with it (edge.runtime.cuda.pdl) may start while the
// kernel before it is still running: pdl_wait() blocks until that kernel has finished and its
// writes are visible, and pdl_trigger() lets the next kernel launch once every block of this
// one has called it. Every such kernel calls pdl_wait() then pdl_trigger(), so at most two
// kernels overlap: the running one and the next one's prologue. Before pdl_wait() a kernel may
// only read what no kernel of the step writes (weights, KV rows of earlier positions, the
// step's inputs) and may write nothing.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction (sum or max) through `red` (>= 32 floats of shared memory).
__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = (lane < nw) ? red[lane] : (is_max ? -INFINITY : 0.f);
    r = is_max ? warp_max(r) : warp_sum(r);
    return r;
}

// Attention masks and caps shared by every attention kernel (fp16 and fp32): the first key a
// query at length L reads on a sliding layer (window > 0: the last `window` keys), and score
// soft-capping (cap > 0: cap * tanh(s / cap)).
__device__ __forceinline__ int attn_window_start(int L, int window) { return window > 0 ? max(0, L - window) : 0; }

__device__ __forceinline__ float attn_softcap(float s, float cap) { return cap > 0.f ? cap * tanhf(s / cap) : s; }

// D[16x8] += A[16x16] B[16x8] on tensor cores (fp16 in, fp32 accumulate; sm_80+): the fragment
// layout of the PTX ISA's mma.m16n8k16 (row-major A, column-major B).
__device__ __forceinline__ void mma_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// cp.async (sm_80+): global -> shared copies that complete in the background, in commit groups.
// src_bytes < 16 zero-fills the rest (rows past the end); flash_prefill / the encoder order their
// stages with __syncthreads. The *_ordered forms carry a "memory" clobber, for a thread that
// refills a ring slot it has just read itself (no barrier between; gemm_tc's shared-memory ring).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
__device__ __forceinline__ void cp_async16_ordered(void* smem, const void* gmem) {
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async4_ordered(void* smem, const void* gmem) {
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit_ordered() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_ordered() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ u32 h2_as_u32(half2 v) { return *reinterpret_cast<u32*>(&v); }

__device__ __forceinline__ half2 u32_as_h2(u32 v) { return *reinterpret_cast<half2*>(&v); }
__device__ __forceinline__ u32 h2_bits(half2 v) { return *reinterpret_cast<u32*>(&v); }

// ---------------------------------------------------------------------------------------
// Weight dequantization to half2 (exact): the "magic number" trick. A nibble n OR'ed into
// the mantissa of 1024.0 (0x6400) gives the half 1024 + n; subtracting 1032 gives n - 8.
// Repacked int4 word: elements (e0,e1) at bits (0,16), (e2,e3) at (4,20), (e4,e5) at (8,24),
// (e6,e7) at (12,28), so each mask-and-or yields two consecutive elements as one half2.
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void deq_int4_word(u32 q, half2* w) {
    const u32 MAGIC = 0x64006400u;
    const half2 B = u32_as_h2(0x64086408u);  // 1032
    w[0] = __hsub2(u32_as_h2((q & 0x000F000Fu) | MAGIC), B);
    w[1] = __hsub2(u32_as_h2(((q >> 4) & 0x000F000Fu) | MAGIC), B);
    w[2] = __hsub2(u32_as_h2(((q >> 8) & 0x000F000Fu) | MAGIC), B);
    w[3] = __hsub2(u32_as_h2(((q >> 12) & 0x000F000Fu) | MAGIC), B);
}

// The same halves in fewer instructions (the M = 1 GEMVs, where dequantization is most of the
// ALU work): the mask-and-or as one lop3 (written as PTX: from C, NVRTC emits shift + and + or),
// and the nibble at bits 4-7 taken in place as 1024 + 16 n and brought to n - 8 by one exact
// hfma2 (x / 16 - 72): 4 lop3 + 1 shift + 4 half2 ops a word, was 3 shifts + 8 lop3 + 4 hsub2
// in SASS. Not used by the tensor-core GEMMs or the prefill dequantization: there it changed
// register allocation for the worse (gemm_int4_tc_kb4 128 -> 132 registers, one block an SM
// fewer: 1B gate|up at 16 rows 12.9 -> 16.0 us, session 10). EDGE_DEQ_PLAIN builds the plain
// form here too (bench_cuda.py's gemv_ab times the two).
template <u32 MASK, u32 BITS>
__device__ __forceinline__ u32 lop3_and_or(u32 a) {  // (a & MASK) | BITS
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(MASK), "n"(BITS));
    return r;
}

__device__ __forceinline__ void deq_int4_word_lop3(u32 q, half2* w) {
#ifdef EDGE_DEQ_PLAIN
    deq_int4_word(q, w);
#else
    const half2 B = u32_as_h2(0x64086408u);  // 1032
    const half2 SIXTEENTH = u32_as_h2(0x2C002C00u), M72 = u32_as_h2(0xD480D480u);  // 1/16, -72
    const u32 q8 = q >> 8;
    w[0] = __hsub2(u32_as_h2(lop3_and_or<0x000F000Fu, 0x64006400u>(q)), B);
    w[1] = __hfma2(u32_as_h2(lop3_and_or<0x00F000F0u, 0x64006400u>(q)), SIXTEENTH, M72);
    w[2] = __hsub2(u32_as_h2(lop3_and_or<0x000F000Fu, 0x64006400u>(q8)), B);
    w[3] = __hfma2(u32_as_h2(lop3_and_or<0x00F000F0u, 0x64006400u>(q8)), SIXTEENTH, M72);
#endif
}

// int8 word (4 signed bytes b0..b3) -> (b0,b1), (b2,b3) as half2: bias to unsigned, put each
// byte under 0x64 (1024 + u), subtract 1152.
__device__ __forceinline__ void deq_int8_word(u32 q, half2* w) {
    const half2 B = u32_as_h2(0x64806480u);  // 1152
    q ^= 0x80808080u;
    w[0] = __hsub2(u32_as_h2(__byte_perm(q, 0x64646464u, 0x4140)), B);
    w[1] = __hsub2(u32_as_h2(__byte_perm(q, 0x64646464u, 0x4342)), B);
}

__device__ __forceinline__ float h2sum(half2 a) {
    float2 f = __half22float2(a);
    return f.x + f.y;
}

