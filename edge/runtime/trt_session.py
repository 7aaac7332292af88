"""TensorRT backend: a DecoderSession over the bundle's `model.plan` (built from model.trt.onnx
by edge.build.trt_plan on the device itself, into edge.runtime.trt_cache, never into the bundle), run with execute_async_v3 and CuPy buffers.

UNTESTED: TensorRT is not installable on our development machines or CI; this is written
against the TensorRT 10 Python API documentation and kept thin. What it relies on is tested
elsewhere: the graph's inputs/outputs and its numerics (model.trt.onnx runs in ONNX Runtime in
tests/test_onnx_decoder.py), and the optimization profiles (tests/test_trt_plan.py).

Shape of one step (the graph's Concat KV cache: present = past + new):
    input_ids, position_ids [1, S]; attention_mask [1, P + S]; past_key_values.i.* [1, Hkv, P, D]
    -> logits [1, V]; present.i.* [1, Hkv, P + S, D], which become the next step's past.
Profile 0 serves prefill (any S, P >= 0), profile 1 decode (S = 1, P >= 1); one execution
context per profile. Sequences are stepped one at a time (no cross-sequence batching here:
the CUDA backend is the batched GPU path).
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from edge.errors import BackendError, ContextLengthError


class TrtDecoderSession:
    """DecoderSession (edge.runtime.session) over a TensorRT engine."""

    def __init__(self, bundle, *, max_batch: int = 1, max_context: int | None = None):
        try:
            import cupy as cp
            import tensorrt as trt
        except ImportError as e:
            raise BackendError(f"the tensorrt backend needs TensorRT and CuPy ({e})",
                               fix="on a Jetson: JetPack 6 ships TensorRT; pip install 'edge-rag[cuda]'") from None
        from edge.runtime.trt_cache import ensure_plan

        self._cp = cp
        spec = bundle.spec
        self.max_batch = int(max_batch)
        self.max_context = int(max_context or bundle.limits.max_context)
        self.vocab_size = spec.vocab_size
        self._n_layers = spec.n_layers
        # The plan lives in a cache outside the read-only bundle (edge.runtime.trt_cache): built on
        # the first load for this TensorRT and GPU (minutes on a Jetson), checksummed, reused after.
        plan = ensure_plan(bundle, log=lambda m: print(f"edge-rag: {m}", file=sys.stderr))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise BackendError(f"{plan}: TensorRT could not load the plan (built by another TensorRT version or GPU?)",
                               fix=f"delete {plan.parent} to rebuild it here")
        self._stream = cp.cuda.Stream(non_blocking=True)
        self._ctx = []
        for profile in range(self._engine.num_optimization_profiles):
            ctx = self._engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self._stream.ptr)
            self._ctx.append(ctx)
        self._dummy = cp.empty(1, dtype=cp.float32)  # address for zero-size past tensors
        self._kv: dict[int, list] = {}
        self._len: dict[int, int] = {}

    # ---- DecoderSession -------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        if len(self._kv) >= self.max_batch:
            raise BackendError(f"{self.max_batch} sequences are already live", fix="release one first")
        self._kv[seq_id] = []
        self._len[seq_id] = 0

    def release(self, seq_id: int) -> None:
        self._kv.pop(seq_id, None)
        self._len.pop(seq_id, None)

    def length(self, seq_id: int) -> int:
        return self._len[seq_id]

    def prefill(self, seq_id: int, token_ids: np.ndarray) -> np.ndarray:
        return self._step(seq_id, np.asarray(token_ids, dtype=np.int64))

    def decode(self, seq_ids: Sequence[int], token_ids: np.ndarray) -> np.ndarray:
        return np.stack([self._step(s, np.asarray([t], dtype=np.int64)) for s, t in zip(seq_ids, token_ids)])

    # ---- one engine call ------------------------------------------------------------
    def _step(self, seq_id: int, ids: np.ndarray) -> np.ndarray:
        cp = self._cp
        past_len, n = self._len[seq_id], len(ids)
        if past_len + n > self.max_context:
            raise ContextLengthError(f"{past_len + n} tokens exceed the engine's context of {self.max_context}")
        ctx = self._ctx[1 if (n == 1 and past_len > 0 and len(self._ctx) > 1) else 0]
        feeds = {
            "input_ids": cp.asarray(ids.reshape(1, n)),
            "position_ids": cp.arange(past_len, past_len + n, dtype=cp.int64).reshape(1, n),
            "attention_mask": cp.ones((1, past_len + n), dtype=cp.int64),
        }
        past = self._kv[seq_id]
        for i in range(self._n_layers):
            for j, kind in enumerate(("key", "value")):
                name = f"past_key_values.{i}.{kind}"
                feeds[name] = past[2 * i + j] if past else None
        for name, arr in feeds.items():
            if arr is None:  # empty cache: shape [1, Hkv, 0, D]
                shape = list(self._engine.get_tensor_shape(name))
                shape[0], shape[2] = 1, 0
                ctx.set_input_shape(name, tuple(shape))
                ctx.set_tensor_address(name, self._dummy.data.ptr)
            else:
                ctx.set_input_shape(name, tuple(arr.shape))
                ctx.set_tensor_address(name, arr.data.ptr)
        outputs = {}
        for k in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(k)
            if name in feeds:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            outputs[name] = cp.empty(shape, dtype=cp.float32)
            ctx.set_tensor_address(name, outputs[name].data.ptr)
        if not ctx.execute_async_v3(self._stream.ptr):
            raise BackendError("TensorRT execution failed (see the log above)")
        self._stream.synchronize()
        self._kv[seq_id] = [outputs[f"present.{i}.{kind}"] for i in range(self._n_layers) for kind in ("key", "value")]
        self._len[seq_id] = past_len + n
        return cp.asnumpy(outputs["logits"])[0]
