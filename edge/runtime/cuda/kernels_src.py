"""CUDA C sources of the CUDA backend's kernels (compiled with NVRTC by edge.runtime.cuda.kernels).

The source lives in csrc/, one file per stage, concatenated in SOURCE_FILES order into one
translation unit (each file uses what common.cuh and the files before it define):
  common.cuh    reductions, half2 helpers, int4/int8 word dequantization
  dequant.cu    int4 repack at load, dequantization to fp16 (prefill GEMMs)
  gemv.cu       fused-dequant GEMV / small-batch GEMM: warp-per-row and block-K with epilogues
  gemm_tc.cu    M = 2..64 GEMM on tensor cores (mma.sync), int4 / int8 dequantized in registers
  layer_ops.cu  embedding (x scale), RMSNorm (+ residual, + sandwich norm), q/k head RMSNorm,
                RoPE + KV write, SiLU.mul / GeLU-tanh.mul, logit soft-capping
  attention.cu  paged decode attention (one block / split sequence), prefill causal softmax
                (sliding window and score soft-capping as arguments, off at 0)
  flash_prefill.cu  prefill attention on tensor cores (causal, GQA, paged KV; S in registers)
  sampling.cu   argmax (one block / multi-block), the decode step's input advance

Plain CUDA C++ for sm_80 and newer (Ampere, Orin's sm_87, Hopper): half2 arithmetic, 16-byte
loads, warp shuffles. No Hopper-only instruction (wgmma, TMA) on this path.

Layouts (row-major, HF orientation: a linear weight is W [N, K], y = x @ W.T):
  int4  qweight uint32 [N, K/8] *repacked on load* (see repack_int4) + scales half [N, K/g]
  int8  qweight int8   [N, K]   + scales half [N]
  fp16  weight  half   [N, K]
  activations half [M, K]; residual stream float [M, H]
  KV cache half [num_slots, Hkv, D], slot = block * block_size + offset
"""

from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCE_FILES = ("common.cuh", "dequant.cu", "gemv.cu", "gemm_tc.cu", "layer_ops.cu", "attention.cu", "flash_prefill.cu", "sampling.cu")
SOURCE = "".join((CSRC / name).read_text() for name in SOURCE_FILES)


BK_VARIANTS = (  # block-K int4 GEMV instances (rows R, threads NT, unroll U), as BK_INSTANCES in gemv.cu
    (2, 64, 2), (4, 64, 2), (2, 128, 2), (4, 128, 2), (8, 128, 1), (2, 256, 2), (4, 256, 2), (8, 256, 1),
    (2, 64, 4), (2, 128, 4), (4, 128, 4), (16, 64, 1), (16, 128, 1), (16, 256, 1),
)
BK_PIPE_VARIANTS = (  # pipelined block-K instances (rows R, threads NT, ring U, rows a stage P, blocks an SM B), as BK_PIPE_INSTANCES
    (16, 128, 2, 2, 4), (16, 128, 2, 2, 6), (16, 128, 2, 4, 4), (16, 256, 2, 4, 2), (16, 64, 2, 4, 8), (8, 256, 2, 2, 3),
    (8, 128, 2, 2, 6), (16, 256, 2, 2, 3), (8, 128, 4, 2, 5), (8, 128, 4, 1, 6), (8, 128, 2, 1, 8), (16, 128, 4, 2, 4),
    (16, 256, 4, 2, 2), (8, 256, 4, 1, 3), (8, 448, 2, 1, 2), (4, 128, 2, 1, 8), (8, 64, 2, 2, 12),
    (16, 224, 2, 4, 2),  # 7 warps: K = 14,336 (448 chunks: Llama-3-8B's down) in exactly 2 iterations, none idle
)
BK_EPILOGUES = ("st", "glu", "res", "rope", "fold", "gluf", "ropef")  # fold / gluf / ropef: the folded RMSNorm's producer and consumers


def bk_bases() -> tuple[tuple[str, int, int], ...]:
    """Every block-K int4 GEMV as (kernel name less its epilogue, rows a block, threads a block)."""
    return (*((f"gemv_int4_bk_r{r}_t{nt}_u{u}", r, nt) for r, nt, u in BK_VARIANTS),
            *((f"gemv_int4_bk_r{r}_t{nt}_u{u}_p{p}_b{b}", r, nt) for r, nt, u, p, b in BK_PIPE_VARIANTS))


KERNEL_NAMES = (
    "repack_int4",
    "dequant_int4",
    "dequant_int8",
    *(f"gemv_{k}_m{m}" for k in ("int4", "int8", "fp16") for m in (1, 2, 4, 8, 16)),
    "gemv_int4_m1_r2",
    "gemv_int4_m1_r4",
    *(f"gemm_{k}_tc_m{mt}" for k in ("int4", "int8") for mt in (1, 2, 4)),
    *(f"gemm_{k}_tc_m1_d4" for k in ("int4", "int8")),
    *(f"gemm_{k}_tc_m1_a{s}" for k in ("int4", "int8") for s in (4, 8)),
    *(f"gemm_{k}_tc_kb{nt}" for k in ("int4", "int8") for nt in (2, 4)),
    *(f"{base}_{epi}" for base, _, _ in bk_bases() for epi in BK_EPILOGUES),
    "embed",
    "embed_rmsnorm",
    "add_rmsnorm",
    "rope_cache",
    "rope_cache_x2",
    "silu_mul",
    "gelu_tanh_mul",
    "silu_mul_x4",
    "gelu_tanh_mul_x4",
    "norm_add_rmsnorm",
    "qk_rmsnorm",
    "softcap_f32",
    "paged_attn_decode",
    "paged_attn_decode_d64",
    "paged_attn_decode_d128",
    "paged_attn_split_d64",
    "paged_attn_split_d128",
    "paged_attn_split_tk_d64",
    "paged_attn_split_tk_d128",
    "paged_attn_split_tk0_d64",
    "paged_attn_split_tk0_d128",
    "paged_attn_split_tk1_d64",
    "paged_attn_split_tk1_d128",
    "paged_attn_lr_d128",
    "paged_attn_lc8_d128",
    "pdl_nop",
    *(f"paged_attn_gqa{gm}_d{d}" for gm in (4, 8) for d in (64, 128)),
    "causal_softmax",
    "flash_prefill_d64",
    "flash_prefill_d128",
    "flash_prefill_cap_d64",
    "flash_prefill_cap_d128",
    "flash_prefill_w8_d64",
    "flash_prefill_w8_d128",
    "argmax_rows",
    "argmax_rows_mb",
    "advance_inputs",
)
