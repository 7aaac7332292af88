// Greedy sampling: out[b] = argmax_v logits[b, v] (lowest index on ties). One block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int* __restrict__ out, int V) {
    __shared__ float sv[1024];
    __shared__ int si[1024];
    const int b = blockIdx.x, tid = threadIdx.x;
    const float* row = logits + (long long)b * V;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int v = tid; v < V; v += blockDim.x) {
        float x = row[v];
        if (x > best) { best = x; bi = v; }
    }
    sv[tid] = best;
    si[tid] = bi;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (tid < s) {
            float o = sv[tid + s];
            int oi = si[tid + s];
            if (o > sv[tid] || (o == sv[tid] && oi < si[tid])) { sv[tid] = o; si[tid] = oi; }
        }
        __syncthreads();
    }
    if (tid == 0) out[b] = si[0];
}

__device__ __forceinline__ void argmax_pair(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
}

// Block-wide (value, index) argmax, lowest index on ties; result valid in thread 0.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) argmax_pair(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? sv[lane] : -INFINITY;
        i = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) argmax_pair(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    }
}

// Greedy sampling spread over gridDim.x blocks per row (grid (P, B)): each block reduces a
// slice into (pv, pi)[b, blockIdx.x]; the row's last block (ticket counter) reduces the P
// partials in order and writes out[b]. Same result as argmax_rows, several times faster on
// a 128k vocabulary (one block of 1024 threads was ~29 us of an 8B decode step).
// ids_out (may be null) also receives the ids: the next decode step's input slot, so a greedy
// stream can run steps back to back without the host in the loop (CudaDecoderSession.greedy_stream).
// hist (may be null) records the id at its position: hist[b, pos[b] + 1], so a stream's tokens
// can be read back without racing the steps queued behind it.
extern "C" __global__ void argmax_rows_mb(const float* __restrict__ logits, int* __restrict__ out,
                                          int* __restrict__ ids_out, int* __restrict__ hist,
                                          const int* __restrict__ pos, int hist_stride,
                                          float* pv, int* pi, unsigned* tickets, int V) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ bool last;
    pdl_wait();
    pdl_trigger();
    const int b = blockIdx.y, P = gridDim.x, tid = threadIdx.x;
    const int per = (V + P - 1) / P, v0 = blockIdx.x * per, v1 = min(V, v0 + per);
    const float* row = logits + (long long)b * V;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int v = v0 + tid; v < v1; v += blockDim.x) argmax_pair(best, bi, row[v], v);
    block_argmax(best, bi, sv, si);
    if (tid == 0) {
        pv[b * P + blockIdx.x] = best;
        pi[b * P + blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(tickets + b, 1u) == (unsigned)P - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    best = -INFINITY;
    bi = 0x7fffffff;
    for (int j = tid; j < P; j += blockDim.x) argmax_pair(best, bi, __ldcg(pv + b * P + j), __ldcg(pi + b * P + j));
    __syncthreads();
    block_argmax(best, bi, sv, si);
    if (tid == 0) {
        out[b] = bi;
        if (ids_out) ids_out[b] = bi;
        if (hist) {
            const int p = pos[b] + 1;
            if (p >= 0 && p < hist_stride) hist[(long long)b * hist_stride + p] = bi;
        }
        tickets[b] = 0u;
    }
}

// End of a decode step: move each live row's inputs to the next position (pos + 1, its slot
// from the block table, length + 1), so the next step can run with no host copy when its
// blocks are reserved ahead (CudaDecoderSession.greedy_stream). inp: ids[mb] pos[mb] slots[mb]
// ctx[mb] tables[mb, max_blocks]; rows with length 0 (padding) are left alone. A host-fed step
// overwrites all of it, so this is harmless there.
extern "C" __global__ void advance_inputs(int* inp, int mb, int max_blocks, int BS, int rows) {
    const int r = threadIdx.x;
    pdl_wait();
    pdl_trigger();
    if (r >= rows) return;
    int* pos = inp + mb;
    int* slots = inp + 2 * mb;
    int* ctx = inp + 3 * mb;
    const int* table = inp + 4 * mb + (long long)r * max_blocks;
    if (ctx[r] <= 0) return;
    const int p = pos[r] + 1;
    pos[r] = p;
    ctx[r] = p + 1;
    slots[r] = p / BS < max_blocks ? table[p / BS] * BS + p % BS : -1;
}
