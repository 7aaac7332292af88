"""The sentence encoder (BERT family, e.g. all-MiniLM-L6-v2) on the GPU: cuBLAS fp16 GEMMs on
tensor cores, our own kernels for the rest (csrc/encoder.cu). No PyTorch.

    token ids of B texts --pack, no padding--> ids/positions [T], off/lens [B]      (one upload)
      --enc_embed_layernorm--> h32 float [T, H], h16 half [T, H]
      --per layer:  qkv = h16 @ Wqkv^T                       (cuBLAS, [T, 3H], biases: see below)
                    ctx = enc_attention_d{32,64}(qkv)         (tensor cores, per sequence, + bq, + bv)
                    h = LN(ctx @ Wo^T + bo + h)               (cuBLAS, enc_bias_residual_layernorm)
                    u = gelu(h16 @ W1^T + b1)                 (cuBLAS, enc_bias_gelu)
                    h = LN(u @ W2^T + b2 + h)
      --enc_pool (mean | cls | max, then L2)--> float [B, dim]

Packing without padding makes the work proportional to the tokens (a batch of one long and 63
short texts costs what its tokens cost) and makes a text's vector independent of the rest of
its batch (attention never leaves its sequence; GEMM rows are computed independently).

Weights: the fp32 safetensors of the model folder the bundle was built from (manifest
`source.path`), checked against the manifest's `source.weights_sha256`, uploaded as fp16 (LayerNorm
parameters and biases stay fp32). The embedder bundle itself holds the ONNX graph (int8 by default),
which the GPU path does not read.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BackendError
from edge.runtime.cuda.kernels_src import CSRC

# common.cuh: reductions, mma_16816; flash_prefill.cu: cp.async / ldmatrix helpers and tile sizes
ENCODER_SOURCE_FILES = ("common.cuh", "flash_prefill.cu", "encoder.cu")
ENCODER_KERNELS = ("enc_embed_layernorm", "enc_bias_residual_layernorm", "enc_bias_gelu", "enc_attention_d32",
                   "enc_attention_d64", "enc_pool")
HEAD_DIMS = (32, 64)  # enc_attention_d* instances
MAX_HIDDEN = 1024  # ENC_MAX_PER_LANE * 32 in encoder.cu
POOL_MODE = {"mean": 0, "cls": 1, "max": 2}
LOG2E = 1.4426950408889634
# Tokens per launch at most: the activations of a launch take ~T * (10 H + 2 I) bytes
# (all-MiniLM-L6-v2: 7 KB a token, 230 MB at 32,768 tokens).
MAX_LAUNCH_TOKENS = 32768


def encoder_source() -> str:
    return "".join((CSRC / name).read_text() for name in ENCODER_SOURCE_FILES)


def unsupported(spec: Any) -> str | None:
    """Why this encoder cannot run on the GPU path, or None."""
    hd = spec.hidden_size // spec.n_heads
    if hd not in HEAD_DIMS:
        return f"head_dim {hd} (the GPU encoder has attention kernels for {', '.join(map(str, HEAD_DIMS))})"
    if spec.hidden_size > MAX_HIDDEN or spec.intermediate_size % 2:
        return f"hidden size {spec.hidden_size} / intermediate size {spec.intermediate_size} (at most {MAX_HIDDEN}, even)"
    if spec.pooling not in POOL_MODE:
        return f"pooling {spec.pooling!r}"
    if spec.hidden_act not in ("gelu", "gelu_python"):  # gelu_new is the tanh form
        return f"activation {spec.hidden_act!r} (the GPU encoder has the erf GELU)"
    return None


def pack(batch: list[list[int]]) -> tuple[np.ndarray, int, int]:
    """One int32 array [ids (T) | positions (T) | off (B) | lens (B)] for a single upload, T, B."""
    lens = np.fromiter(map(len, batch), dtype=np.int32, count=len(batch))
    n, t = len(batch), int(lens.sum())
    off = np.zeros(n, dtype=np.int32)
    np.cumsum(lens[:-1], out=off[1:])
    host = np.empty(2 * t + 2 * n, dtype=np.int32)
    host[:t] = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int32, count=t)
    host[t:2 * t] = np.arange(t, dtype=np.int32) - np.repeat(off, lens)
    host[2 * t:2 * t + n] = off
    host[2 * t + n:] = lens
    return host, t, n


def load_source_weights(bundle: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """(EncoderSpec, fp32 weights) from the model folder the bundle was built from, sha-checked."""
    from edge.models.bert import load_bert_weights, read_bert_folder

    src = bundle.manifest.source or {}
    path, sha = src.get("path"), src.get("weights_sha256")
    if not path or not Path(path).is_dir():
        raise BackendError(f"{bundle.path}: the cuda embedder reads the weights of the model folder the bundle was built "
                           f"from ({path or 'not recorded'}), which is not on this machine",
                           fix="rebuild the embedder bundle here, or use --backend onnxruntime")
    folder = read_bert_folder(path)
    if sha and folder.weights_sha256() != sha:
        raise BackendError(f"{folder.weights_path}: the weights changed since the bundle was built",
                           fix="rebuild the embedder bundle, or use --backend onnxruntime")
    return folder.spec, load_bert_weights(folder)


class CudaEncoder:
    """An encoder's weights on the GPU and the launches of one forward. `launch(batch)` queues a
    batch and returns its device output; `run(batch)` waits for it."""

    def __init__(self, spec: Any, weights: dict[str, np.ndarray], device_id: int = 0):
        import cupy as cp

        from edge.runtime.cuda.kernels import compile_options, kernel_cache_dir

        why = unsupported(spec)
        if why:
            raise BackendError(f"the cuda embedder does not support {spec.name}: {why}", fix="use --backend onnxruntime")
        self.cp, self.spec = cp, spec
        self.H, self.I, self.heads = spec.hidden_size, spec.intermediate_size, spec.n_heads
        self.head_dim = self.H // self.heads
        self.eps = np.float32(spec.layer_norm_eps)
        self.scale_log2 = np.float32(LOG2E / np.sqrt(self.head_dim))
        os.environ.setdefault("CUPY_CACHE_DIR", kernel_cache_dir())
        self.device = cp.cuda.Device(device_id)
        with self.device:
            cc = int(self.device.compute_capability)
            if cc < 80:
                raise BackendError(f"GPU {device_id} has compute capability {cc / 10:.1f}; the cuda embedder needs 8.0 or newer",
                                   fix="use --backend onnxruntime")
            t0 = time.perf_counter()
            try:
                mod = cp.RawModule(code=encoder_source(), options=compile_options(cc))
                self.k = {name: mod.get_function(name) for name in ENCODER_KERNELS}
            except Exception as e:  # CompileException, CUDADriverError
                raise BackendError(f"the cuda embedder's kernels failed to compile: {e}",
                                   fix="report this with `edge-rag doctor` output") from e
            self.compile_s = time.perf_counter() - t0
            self._upload(weights)
        self.attn = self.k[f"enc_attention_d{self.head_dim}"]
        self.attn_smem = 2 * 2 * 64 * (self.head_dim + 8) * 2  # flash_prefill_smem(D): two stages of K and V tiles

    def _upload(self, w: dict[str, np.ndarray]) -> None:
        cp = self.cp

        def h(a: np.ndarray) -> Any:
            return cp.asarray(np.ascontiguousarray(a, dtype=np.float16))

        def f(a: np.ndarray) -> Any:
            return cp.asarray(np.ascontiguousarray(a, dtype=np.float32))

        pos = w["embeddings.position_embeddings.weight"]
        if "embeddings.token_type_embeddings.weight" in w:  # single-segment inputs: type 0 folded into positions
            pos = pos + w["embeddings.token_type_embeddings.weight"][0][None, :]
        self.word, self.pos = h(w["embeddings.word_embeddings.weight"]), h(pos)
        self.emb_ln = (f(w["embeddings.LayerNorm.weight"]), f(w["embeddings.LayerNorm.bias"]))
        self.layers = []
        for i in range(self.spec.n_layers):
            p = f"encoder.layer.{i}."
            a = p + "attention.self."
            self.layers.append({
                "wqkv": h(np.concatenate([w[a + n + ".weight"] for n in ("query", "key", "value")])),  # [3H, H]
                "bq": h(w[a + "query.bias"]), "bv": h(w[a + "value.bias"]),  # k's bias cancels (encoder.cu)
                "wo": h(w[p + "attention.output.dense.weight"]), "bo": f(w[p + "attention.output.dense.bias"]),
                "ln1": (f(w[p + "attention.output.LayerNorm.weight"]), f(w[p + "attention.output.LayerNorm.bias"])),
                "w1": h(w[p + "intermediate.dense.weight"]), "b1": f(w[p + "intermediate.dense.bias"]),
                "w2": h(w[p + "output.dense.weight"]), "b2": f(w[p + "output.dense.bias"]),
                "ln2": (f(w[p + "output.LayerNorm.weight"]), f(w[p + "output.LayerNorm.bias"])),
            })

    @property
    def weight_bytes(self) -> int:
        arrays = [self.word, self.pos, *self.emb_ln] + [a for layer in self.layers for v in layer.values()
                                                         for a in (v if isinstance(v, tuple) else (v,))]
        return int(sum(a.nbytes for a in arrays))

    def launch(self, batch: list[list[int]]) -> Any:
        """Queue the forward of `batch` (token id lists, each 1..max_position long) on the current
        stream; float32 [B, dim] on the device."""
        from edge.runtime.cuda.blas import gemm_f16

        cp, H, I = self.cp, self.H, self.I
        host, t, n = pack(batch)
        i32 = np.int32
        with self.device:
            dev = cp.asarray(host)
            ids, positions, off, lens = dev[:t], dev[t:2 * t], dev[2 * t:2 * t + n], dev[2 * t + n:]
            h32 = cp.empty((t, H), dtype=cp.float32)
            h16 = cp.empty((t, H), dtype=cp.float16)
            qkv = cp.empty((t, 3 * H), dtype=cp.float16)
            ctx = cp.empty((t, H), dtype=cp.float16)
            y = cp.empty((t, H), dtype=cp.float16)
            u = cp.empty((t, I), dtype=cp.float16)
            out = cp.empty((n, H), dtype=cp.float32)
            rows = (-(-t // 8),)
            self.k["enc_embed_layernorm"](rows, (256,), (ids, positions, self.word, self.pos, *self.emb_ln, h16, h32,
                                                         i32(t), i32(H), self.eps))
            qblocks = -(-max(map(len, batch)) // 64)
            n2 = t * I // 2
            gelu_grid = (min(-(-n2 // 256), 132 * 16),)
            for L in self.layers:
                gemm_f16(cp, h16, L["wqkv"], qkv, t)
                self.attn((qblocks, self.heads, n), (128,), (qkv, L["bq"], L["bv"], off, lens, ctx, i32(H), self.scale_log2),
                          shared_mem=self.attn_smem)
                gemm_f16(cp, ctx, L["wo"], y, t)
                self.k["enc_bias_residual_layernorm"](rows, (256,), (y, L["bo"], h32, *L["ln1"], h16, i32(t), i32(H), self.eps))
                gemm_f16(cp, h16, L["w1"], u, t)
                self.k["enc_bias_gelu"](gelu_grid, (256,), (u, L["b1"], np.int64(n2), i32(I // 2)))
                gemm_f16(cp, u, L["w2"], y, t)
                self.k["enc_bias_residual_layernorm"](rows, (256,), (y, L["b2"], h32, *L["ln2"], h16, i32(t), i32(H), self.eps))
            self.k["enc_pool"]((n,), (256,), (h32, off, lens, out, i32(H), i32(POOL_MODE[self.spec.pooling]),
                                             i32(1 if self.spec.normalize else 0)))
        return out

    def run(self, batch: list[list[int]]) -> np.ndarray:
        """The embeddings of `batch`, float32 [B, dim] on the host."""
        with self.device:
            return self.launch(batch).get()


class Pending:
    """A launched batch whose result is being copied to pinned host memory; `result()` waits for
    that copy alone (not for batches launched after it)."""

    def __init__(self, cp: Any, dev: Any):
        import cupyx

        self.host = cupyx.empty_pinned(dev.shape, dtype=dev.dtype)
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(self.host.ctypes.data, dev.data.ptr, dev.nbytes,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        self.event = cp.cuda.Event(block=False, disable_timing=True)
        self.event.record(stream)
        self._dev = dev  # keep the device buffer alive until the copy is done

    def result(self) -> np.ndarray:
        self.event.synchronize()
        self._dev = None
        return self.host
