"""The CUDA backend's fp32 compute mode: activations, KV cache and GEMMs in float32.

    resolve_precision(recipe, precision) -> "fp16" | "fp32"
    Fp32DecoderSession(bundle, ...)      a CudaDecoderSession that computes in fp32

The fast engine (CudaDecoderSession) keeps activations and the KV cache in fp16, which holds
logits to ~3e-3 of transformers' fp32 ones. A bundle whose weights are fp32 (`--quant fp32`) asks
for the model's own numbers, so by default (precision "auto") it runs here, within ~1e-6;
precision="fp32" runs any bundle here (int4 / int8 weights dequantized to fp32 at load: the GPU
form of the numpy reference on the bundle's weights), precision="fp16" the fast engine.

Same session, same layer loop (CudaDecoderSession._layers): only the pieces with a dtype change.
The layer ops are csrc/fp32.cu (the fp16 kernels' names and arguments with float, compiled
without --use_fast_math, as their own module: the fp16 kernels and their cache are untouched),
the linears cuBLAS SGEMM (CUBLAS_COMPUTE_32F_PEDANTIC: never TF32), attention one plain
kernel for decode and one for prefill. No CUDA graphs (steps run eagerly) and no batch
invariance: this is the reference path, not the fast one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge.errors import BackendError
from edge.runtime.cuda.kernels_src import CSRC
from edge.runtime.cuda.layout import Linear
from edge.runtime.cuda.blas import gemm_ex
from edge.runtime.cuda.decode import ATTN_THREADS
from edge.runtime.cuda.session import CudaDecoderSession

PRECISIONS = ("auto", "fp16", "fp32")
SOURCE_FILES = ("common.cuh", "fp32.cu")
KERNEL_NAMES = ("embed", "embed_rmsnorm", "add_rmsnorm", "norm_add_rmsnorm", "qk_rmsnorm", "rope_cache", "silu_mul",
                "gelu_tanh_mul", "paged_attn_f32", "prefill_attn_f32")
# fp16-module kernels with no half activations (float logits, int32 inputs): shared by both modes
SHARED_KERNELS = ("softcap_f32", "argmax_rows", "argmax_rows_mb", "advance_inputs")
CUDA_R_32F, CUBLAS_COMPUTE_32F_PEDANTIC = 0, 69


def resolve_precision(recipe: str, precision: str = "auto") -> str:
    """The compute precision of a bundle of quant `recipe`: "auto" is fp32 for fp32 weights,
    fp16 otherwise; "fp16" / "fp32" as asked."""
    if precision not in PRECISIONS:
        raise BackendError(f"cuda precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                           fix="use auto (fp32 for an fp32 bundle, else fp16), fp16 or fp32")
    if precision == "auto":
        return "fp32" if recipe == "fp32" else "fp16"
    return precision


class _Kernels:
    """The fp32 module's kernels by name, and the few dtype-free ones of the fp16 module; any
    other name is an fp16 kernel that must not run on float buffers (a bug: raised)."""

    def __init__(self, own: dict[str, Any], base: Any):
        self.own, self.base = own, base

    def __getitem__(self, name: str) -> Any:
        if name in self.own:
            return self.own[name]
        if name in SHARED_KERNELS:
            return self.base[name]
        raise BackendError(f"kernel {name} has no fp32 form (the fp32 session launched an fp16 kernel)")


_CACHE: dict[int, dict[str, Any]] = {}


def source() -> str:
    return "".join((CSRC / name).read_text() for name in SOURCE_FILES)


def compile_options(cc: int) -> tuple[str, ...]:
    """NVRTC options of the fp32 module: the fp16 module's without --use_fast_math (precise
    expf / tanhf / division / sqrt, denormals kept)."""
    return ("-std=c++17", f"--gpu-architecture=sm_{cc}")


def load_kernels(device_id: int, cc: int) -> dict[str, Any]:
    """Compile (or load from the disk cache, as kernels.load) the fp32 module for device_id."""
    if device_id not in _CACHE:
        import cupy

        try:
            with cupy.cuda.Device(device_id):
                mod = cupy.RawModule(code=source(), options=compile_options(cc))
                _CACHE[device_id] = {name: mod.get_function(name) for name in KERNEL_NAMES}
        except Exception as e:  # CompileException, CUDADriverError
            raise BackendError(f"the cuda backend's fp32 kernels failed to compile: {e}", fix="report this with `edge-rag doctor` output") from e
    return _CACHE[device_id]


def sgemm(cp: Any, x: Any, w: Any, y: Any, m: int) -> None:
    """y[:m] = x[:m] @ w.T in fp32 through cuBLAS (pedantic fp32: no TF32), on the current
    stream; x [>= m, K], y [>= m, N] with contiguous rows (any row stride), w [N, K] contiguous."""
    n, k = w.shape
    if not (x.dtype == y.dtype == w.dtype == cp.float32 and x.strides[1] == 4 and y.strides[1] == 4
            and w.flags.c_contiguous and x.shape[1] == k and y.shape[1] == n):
        raise BackendError(f"sgemm: unexpected operands x{x.shape} {x.dtype} w{w.shape} y{y.shape} {y.dtype}")
    gemm_ex(cp, x, w, y, m, CUDA_R_32F, CUBLAS_COMPUTE_32F_PEDANTIC)


def _i32(v: int) -> np.int32:
    return np.int32(v)


class Fp32DecoderSession(CudaDecoderSession):
    """CudaDecoderSession computing in fp32: float32 weights (quantized ones dequantized at
    load, edge.runtime.cuda.weights), activations and KV cache; SGEMM linears; csrc/fp32.cu."""

    act_dtype = "float32"
    use_pdl = False  # its kernels (csrc/fp32.cu) do not wait for the kernel before: plain launches

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.k = _Kernels(load_kernels(self.device.id, self.k.cc), self.k)
        s = self.spec
        # attention's dynamic shared memory: scores of up to max_context keys, q, reduction
        self._attn_smem = 4 * (self.max_context + s.head_dim + 32)
        if self._attn_smem > 48 * 1024:
            limit = int(self.cp.cuda.runtime.deviceGetAttribute(97, self.device.id))  # cudaDevAttrMaxSharedMemoryPerBlockOptin
            if self._attn_smem > limit:
                raise BackendError(f"fp32 attention over {self.max_context} tokens needs {self._attn_smem} bytes of shared memory; the GPU has {limit}",
                                   fix=f"use a context of at most {limit // 4 - s.head_dim - 32} tokens, or precision fp16")
            for name in ("paged_attn_f32", "prefill_attn_f32"):
                self.k[name].max_dynamic_shared_size_bytes = self._attn_smem

    def linear(self, lin: Linear, x: Any, m: int, y: Any, out_f32: bool = False) -> None:
        """y[:m] = x[:m] @ W.T (+ bias), all float32 (out_f32 is what every output is here)."""
        sgemm(self.cp, x, lin.q, y, m)
        if lin.bias is not None:
            y[:m] += lin.bias

    def _path(self, lin: Linear, m: int) -> str:
        return "sgemm"

    def _graph_safe(self, bsz: int) -> bool:
        return False  # steps run eagerly (the reference path; cuBLAS and the bias add are not captured)

    def set_batch_invariant(self, on: bool = True) -> None:
        if on:
            raise BackendError("batch_invariant is a mode of the fp16 engine (its tensor-core GEMM)", fix="open the bundle with precision fp16")

    def decode_attention(self, q: Any, kc: Any, vc: Any, bt: Any, ctx: Any, out: Any, rows: int, *, layer: int) -> None:
        s = self.spec
        self.k["paged_attn_f32"](
            (s.n_heads, rows), (ATTN_THREADS,),
            (q, kc, vc, bt, ctx, out, _i32(s.n_heads), _i32(s.n_kv_heads), _i32(s.head_dim), _i32(self.block_size),
             _i32(self.max_blocks), self.attn_scale, self.layers[layer]["window"], self.attn_softcap),
            shared_mem=self._attn_smem)

    def _prefill_attention(self, q: Any, kc: Any, vc: Any, all_slots: Any, t: int, p0: int, out: Any, *, layer: int) -> None:
        s = self.spec
        self.k["prefill_attn_f32"](
            (t, s.n_heads), (ATTN_THREADS,),
            (q, kc, vc, all_slots, out, _i32(t), _i32(p0), _i32(s.n_heads), _i32(s.n_kv_heads), _i32(s.head_dim),
             self.attn_scale, self.layers[layer]["window"], self.attn_softcap),
            shared_mem=self._attn_smem)
