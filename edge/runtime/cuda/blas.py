"""cuBLAS GEMMs on the current stream, called through cublasGemmEx directly (fp16 and fp32 forms).

    gemm_f16(cp, x, w, y, m)   y[:m] = x[:m] @ w.T, fp16 in / out, fp32 compute (tensor cores)
    gemm_ex(cp, x, w, y, m, data_type, compute_type)   the one GemmEx call both forms use

cp.matmul does the same product with ~10x the host time per call, which a prefill of 64 GEMMs
felt (the GPU waited on Python).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def gemm_f16(cp: Any, x: Any, w: Any, y: Any, m: int) -> None:
    """y[:m] = x[:m] @ w.T through cuBLAS directly (fp16 in / out, fp32 compute, tensor cores), on
    the current stream. x [>= m, K] and y [>= m, N] with contiguous rows (any row stride), w [N, K]
    contiguous. cp.matmul does the same product with ~10x the host time per call, which a prefill
    of 64 GEMMs felt (the GPU waited on Python)."""
    n, k = w.shape
    if not (x.dtype == y.dtype == w.dtype == cp.float16 and x.strides[1] == 2 and y.strides[1] == 2
            and w.flags.c_contiguous and x.shape[1] == k and y.shape[1] == n):
        cp.matmul(x[:m], w.T, out=y[:m])
        return
    gemm_ex(cp, x, w, y, m, CUDA_R_16F, CUBLAS_COMPUTE_32F)


def gemm_ex(cp: Any, x: Any, w: Any, y: Any, m: int, data_type: int, compute_type: int) -> None:
    """y[:m] = x[:m] @ w.T by cublasGemmEx on the current stream, operands of one `data_type`
    already checked by the caller (contiguous rows of any stride, w [N, K] contiguous)."""
    from cupy_backends.cuda.libs import cublas

    n, k = w.shape
    elem = x.itemsize
    h = cp.cuda.device.get_cublas_handle()
    cublas.setStream(h, cp.cuda.get_current_stream().ptr)
    mode = cublas.getPointerMode(h)
    cublas.setPointerMode(h, cublas.CUBLAS_POINTER_MODE_HOST)
    try:  # column-major: y^T [n, m] = (w [k, n])^T . x^T [k, m]
        cublas.gemmEx(h, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, m, k, _ONE.ctypes.data, w.data.ptr, data_type, k,
                      x.data.ptr, data_type, x.strides[0] // elem, _ZERO.ctypes.data, y.data.ptr, data_type, y.strides[0] // elem,
                      compute_type, CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(h, mode)


CUDA_R_16F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT = 2, 68, -1
_ONE, _ZERO = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
