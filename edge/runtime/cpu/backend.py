"""NativeBackend: the engine's EngineBackend (edge.runtime.session) on edge-rag's own C step.

    backend = NativeBackend.open(bundle, threads=2)   # weights repacked, KV pool = the plan's
    out = backend.execute(step_batch)                 # one engine step -> StepOutput (logits)

One er_step() call (csrc/native.c) per engine step runs all T tokens of the step (decode rows and
prompt pieces mixed) through every layer: RMSNorm, the int4 x int8 linears, RoPE (edge.models.rope's
tables), K/V written at slot_mapping into a paged fp16 block pool, causal GQA attention of each
token over its row's blocks (block_tables), SwiGLU, residuals, and the final norm + head only for
rows with logits_rows = 1. Sampling stays on the host (the engine's sampler), so the logits of a
row are the same batched or alone and the engine's guarantees (same tokens batched or alone,
seeded sampling) hold.

KV: a true block pool ("paged"): a prefix-cache hit costs nothing, the engine's block table
points at the cached blocks. K and V are stored in the plan's KV dtype: fp16, or int8 with one
fp16 scale per token and KV head (edge.plan.kv_bytes_per_token's layout); the pool is the plan's
kv_blocks x kv_block_size tokens, so its bytes are the planned bytes. The pool is anonymous
memory whose pages become resident only when written (ort_session.lazy_zeros).

Architectures: llama-family decoders (Llama, SmolLM2, Qwen2 with its q/k/v biases, Mistral
without sliding layers); every other feature (qk-norm, sandwich norms, GeLU, soft-capping,
sliding windows, embedding scale) is refused with a one-line BackendError.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

import numpy as np

from edge.bundle import MappedWeights
from edge.errors import BackendError, UsageError
from edge.runtime.cpu import abi
from edge.runtime.cpu.weights import NativeLinear, pack_gate_up, pack_linear
from edge.runtime.scheduler import piece_ctx_of
from edge.runtime.step import I32, BackendCaps, StepBatch, StepOutput

KV_DTYPES = ("fp16", "int8")  # what this backend allocates (edge.plan.KV_DTYPES)
MIXED_PREFILL = 32  # prompt tokens per step while other rows decode (bounds their token gaps, as on ORT)
# edge.runtime.scheduler.piece_ctx_of's factor here: a prompt token's attention reads its whole past once (no
# reuse across a piece's tokens), so at a past of ~3,000 a SmolLM2-135M token cost ~6.8x one at a short past in
# bench_serve's prefill scenario (32-token pieces: 8 streams' p99 gap 36 -> 390 ms), twice its short-past cost at
# ~512 past tokens = 1/12 of its layer params / q width (ONNX Runtime's GroupQueryAttention: 0.28)
PIECE_CTX_PER_PARAM = 1 / 12
MIN_MIXED_PIECE = 4  # BackendCaps.piece_align: mixed pieces shrink to 4 tokens (the scheduler's default: 8)
PREFILL_CHUNK = 256  # largest prompt piece per row and step (activation memory ~ T x 9 KB for SmolLM2)


def unsupported_features(spec) -> list[str]:
    """Features of spec's decoder block this backend does not implement (empty: it runs)."""
    f = spec.features
    bad = []
    for name, on in (("qk_norm", f.qk_norm), ("sandwich_norms", f.sandwich_norms), ("activation " + f.activation, f.activation != "silu"),
                     ("embed_scale", f.embed_scale != 1.0), ("attn_softcap", f.attn_softcap is not None),
                     ("final_softcap", f.final_softcap is not None), ("sliding layers", any(f.sliding(i) for i in range(spec.n_layers))),
                     ("rope_local_theta", f.rope_local_theta is not None)):
        if on:
            bad.append(name)
    if spec.head_dim % 16:
        bad.append(f"head_dim {spec.head_dim} (needs a multiple of 16)")
    if spec.hidden_size % 32 or spec.intermediate_size % 32 or spec.q_size % 32:
        bad.append("hidden / intermediate / q sizes not multiples of 32")
    return bad


# What `auto` needs of this CPU to pick the native backend: the AVX2 path's flags (build.ISA_NEEDS["avx2"]; every
# AVX-512 x86 has them). Elsewhere (ARM, an x86 without AVX2) the step runs the portable C, slower than ONNX
# Runtime's MLAS kernels, so auto keeps ORT.
AUTO_RECIPES = ("int4", "int8")  # fp16 / fp32 bundles would be requantized to int8 here: auto keeps them on ORT


def machine_refusal() -> str | None:
    """Why `--backend auto` does not pick the native backend on this machine, whatever the bundle (None: it may).
    Cheap: nothing is compiled (a compile that fails later falls back in edge.runtime.generator.open_session)."""
    from edge.cpu import cpu_flags, is_x86
    from edge.runtime.cpu.build import ISA_NEEDS, compiler

    if not is_x86():
        return "the native kernels have no SIMD path for this CPU"
    missing = [f for f in ISA_NEEDS["avx2"] if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    try:
        compiler()
    except BackendError:
        return "no C compiler (cc) to build its kernels"
    return None


def auto_refusal(bundle) -> str | None:
    """Why `--backend auto` does not pick the native backend for `bundle` on this machine (None: it does)."""
    why = machine_refusal()
    if why:
        return why
    recipe = bundle.manifest.quant.recipe
    if recipe not in AUTO_RECIPES:
        return f"the bundle is {recipe} (native runs int4 / int8 bundles)"
    bad = unsupported_features(bundle.spec)
    if bad:
        return f"{bundle.spec.arch} uses {', '.join(bad)}"
    return None


def kv_block_bytes(spec, block_size: int, kv_dtype: str = "fp16") -> int:
    """One block of every layer's K and V: the planner's one bytes-per-token rule."""
    from edge.plan import kv_bytes_per_token

    return kv_bytes_per_token(spec, kv_dtype) * block_size


def planned_kv_bytes(bundle) -> int:
    """The manifest's KV pool in bytes: kv_blocks x kv_block_size tokens in its kv_dtype."""
    from edge.plan import kv_bytes_per_token

    lim, spec = bundle.limits, bundle.spec
    per_token = int(spec.kv_bytes_per_token(4.0)) if lim.kv_dtype == "fp32" else kv_bytes_per_token(spec, lim.kv_dtype)
    return lim.kv_tokens * per_token


class NativeBackend:
    """EngineBackend over csrc/native.c. See the module docstring."""

    def __init__(self, bundle, *, max_batch: int | None = None, max_context: int | None = None, threads: int | None = None,
                 kv_tokens: int | None = None, prefill_chunk: int = PREFILL_CHUNK, build_flags: tuple[str, ...] = (),
                 kv_dtype: str | None = None):
        """kv_tokens: the engine's KV pool in tokens (None: the plan's KV bytes in kv_dtype blocks);
        kv_dtype: "fp16" | "int8" (None: the manifest's; an fp32 manifest gets fp16);
        build_flags: extra cc flags (tests build the portable C path with -march=x86-64);
        $EDGE_RAG_NATIVE_ISA (scalar, avx2, avxvnni, avx512, vnni) runs that kernel path (edge.runtime.cpu.build.forced_isa)."""
        from edge.models.rope import rope_tables
        from edge.runtime.cpu.build import forced_isa, load, tile_name
        from edge.runtime.cpu.kernels import set_isa
        from edge.runtime.ort_session import lazy_zeros, limit_malloc_caching

        limit_malloc_caching()  # the repacking's large temporaries go back to the OS, not glibc's cache
        self.bundle = bundle
        self.spec = spec = bundle.spec
        bad = unsupported_features(spec)
        if bad:
            raise BackendError(f"the native CPU backend does not run {spec.arch} ({', '.join(bad)})", fix="use --backend onnxruntime")
        isa, isa_flags = forced_isa()  # $EDGE_RAG_NATIVE_ISA (None: the best this CPU has)
        self.lib = load(tuple(build_flags) + isa_flags)
        # the GEMM tile's path (forced_isa checked the name and this CPU: kernels.set_isa maps it to the build's code)
        self.isa = set_isa(isa, self.lib) if isa is not None else tile_name(self.lib, self.lib.er_isa_max())
        lim = bundle.limits
        self.max_context = int(min(max_context or lim.max_context, spec.max_position))
        if self.max_context < 2:
            raise UsageError(f"max_context {self.max_context} is too small", fix="use at least 2")
        self.max_batch = int(max_batch or lim.max_batch)
        self.threads = int(threads or os.cpu_count() or 1)
        self.vocab_size = spec.vocab_size
        self.block_size = bs = int(lim.kv_block_size)
        self.kv_dtype = kv_dtype or (lim.kv_dtype if lim.kv_dtype in KV_DTYPES else "fp16")
        if self.kv_dtype not in KV_DTYPES:
            raise UsageError(f"kv_dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        bps = -(-self.max_context // bs)
        if kv_tokens is None:
            nb = planned_kv_bytes(bundle) // kv_block_bytes(spec, bs, self.kv_dtype)
        else:
            nb = -(-int(kv_tokens) // bs)
        self.num_blocks = int(max(bps, nb))
        self.prefill_chunk = int(prefill_chunk)

        # NOTE: tensors memory-mapped one at a time (MappedWeights), not the whole file read at once: each
        # linear's file pages leave with it once repacked, so the load's peak is ~the packed weights, not
        # file + copies (SmolLM2-135M int4: peak RSS 383 -> see docs/measurements.md "Per CPU", session 14)
        w = MappedWeights(bundle.file("weights.safetensors"))
        self._keep: list[object] = []
        # fp16 (or fp32) [V, H], gathered per step: read-only pages of the file, shared with the page cache
        self.embed = np.ascontiguousarray(w["model.embed_tokens.weight"])
        self.weight_bytes = 0
        self._layers = (abi.Layer * spec.n_layers)()
        for i in range(spec.n_layers):
            self._layers[i] = self._layer(w, i)
        self.norm = self._f32(w["model.norm.weight"])
        self.head = self._linear(w, ["lm_head"] if ("lm_head.qweight" in w or "lm_head.weight" in w) else None)
        cos, sin = rope_tables(spec, self.max_context)
        self.cos, self.sin = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
        # [layers, K/V, kv heads, blocks, one block] (K of a block transposed), resident only where written: fp16
        # [block_size, head_dim], or int8 [block_size x head_dim] values then block_size fp16 scales (native.c's kv_blk)
        if self.kv_dtype == "int8":
            self.kv = lazy_zeros((spec.n_layers, 2, spec.n_kv_heads, self.num_blocks, bs * (spec.head_dim + 2)), np.uint8)
        else:
            self.kv = lazy_zeros((spec.n_layers, 2, spec.n_kv_heads, self.num_blocks, bs, spec.head_dim), np.float16)
        f = spec.features
        scale = f.attn_scale if f.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim)
        self.model = abi.Model(spec.n_layers, spec.hidden_size, spec.n_heads, spec.n_kv_heads, spec.head_dim,
                               spec.intermediate_size, spec.vocab_size, bs, self.num_blocks, self.max_context, self.threads,
                               float(spec.rms_eps), float(scale), self._layers, self.norm.ctypes.data, self.head.struct,
                               self.cos.ctypes.data, self.sin.ctypes.data, self.kv.ctypes.data, int(self.kv_dtype == "int8"))
        self._logits = np.zeros((self.max_batch, self.vocab_size), np.float32)
        self._work = np.zeros(0, np.uint8)
        self._x = np.zeros((0, spec.hidden_size), np.float32)

    @classmethod
    def open(cls, bundle, **kw) -> "NativeBackend":
        from edge.bundle import Bundle

        b = bundle if not isinstance(bundle, (str, Path)) else Bundle.open(bundle, kind="generator", verify=True)
        return cls(b, **kw)

    # ---- weights ------------------------------------------------------------------------
    def _f32(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        self._keep.append(a)
        return a

    def _linear(self, w: dict, names: list[str] | None, biases: list[str] | None = None) -> NativeLinear:
        from edge.quant.format import BundleLinear, read_linear

        if names is None:  # tied head of a float bundle: the embedding table as a linear
            t = np.asarray(w["model.embed_tokens.weight"])
            lins = [BundleLinear("lm_head", "fp", t.shape[0], t.shape[1], weight=t)]
        else:
            lins = [read_linear(w, n) for n in names]
        bias = [w.get(b) for b in biases] if biases else None
        return self._hold(pack_linear(lins, bias))

    def _gate_up(self, w: dict, gate: str, up: str) -> NativeLinear:
        from edge.quant.format import read_linear

        return self._hold(pack_gate_up(read_linear(w, gate), read_linear(w, up)))  # rows interleaved by 16 (native.c's gate_up_act)

    def _hold(self, lin: NativeLinear) -> NativeLinear:
        self._keep.append(lin)
        self.weight_bytes += lin.nbytes
        return lin

    def _layer(self, w: dict, i: int) -> abi.Layer:
        from edge.models.arch import layer_norm_names

        p = f"model.layers.{i}."
        a = p + "self_attn."
        norms = layer_norm_names(self.spec.features)
        qkv = self._linear(w, [a + "q_proj", a + "k_proj", a + "v_proj"], [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"])
        o = self._linear(w, [a + "o_proj"])
        gu = self._gate_up(w, p + "mlp.gate_proj", p + "mlp.up_proj")
        down = self._linear(w, [p + "mlp.down_proj"])
        ln1, ln2 = self._f32(w[p + norms["attn_in"] + ".weight"]), self._f32(w[p + norms["mlp_in"] + ".weight"])
        return abi.Layer(ln1.ctypes.data, ln2.ctypes.data, qkv.struct, o.struct, gu.struct, down.struct)

    # ---- the engine's contract ----------------------------------------------------------
    @property
    def caps(self) -> BackendCaps:
        return BackendCaps(backend="native", num_blocks=self.num_blocks, block_size=self.block_size, max_seqs=self.max_batch,
                           max_context=self.max_context, vocab_size=self.vocab_size, kv_layout="paged",
                           device_sampling=False, mixed_rows=True, greedy_stream=False, prefix_cache=True,
                           prefill_chunk=self.prefill_chunk, mixed_prefill=MIXED_PREFILL, piece_ctx=piece_ctx_of(PIECE_CTX_PER_PARAM, self.spec.layer_linear_params, self.spec.q_size),
                           piece_align=MIN_MIXED_PIECE, kv_dtype=self.kv_dtype,
                           kv_bytes=int(self.kv.nbytes), copies_blocks=True, partial_prefix=True)

    def execute(self, batch: StepBatch) -> StepOutput:
        r, t = batch.num_rows, batch.num_tokens
        if r == 0:
            return StepOutput(np.zeros(0, I32))
        if r > self.max_batch:
            raise BackendError(f"{r} rows in one step exceed max_seqs {self.max_batch}")
        if len(batch.block_copies):
            for src, dst in np.asarray(batch.block_copies).reshape(-1, 2).tolist():
                self.kv[:, :, :, dst] = self.kv[:, :, :, src]
        if self._x.shape[0] < t:
            self._x = np.empty((t, self.spec.hidden_size), np.float32)
            self._work = np.empty(int(self.lib.er_work_bytes(ctypes.byref(self.model), t)), np.uint8)
        x = self._x[:t]
        x[...] = self.embed[batch.token_ids]  # fp16 rows -> the float32 residual stream
        tables = np.ascontiguousarray(batch.block_tables, dtype=I32)
        lr = np.ascontiguousarray(batch.logits_rows, dtype=I32)
        rc = self.lib.er_step(ctypes.byref(self.model), t, r, x.ctypes.data, batch.positions.ctypes.data,
                              batch.slot_mapping.ctypes.data, batch.query_start.ctypes.data, tables.ctypes.data,
                              int(tables.shape[1]), lr.ctypes.data, self._logits.ctypes.data, self._work.ctypes.data)
        if rc != 0:
            raise BackendError(f"the native step refused the batch (code {rc}: a position beyond the context {self.max_context})")
        # the logits rows are a view of the backend's buffer, valid until the next execute()
        return StepOutput(np.full(r, -1, I32), self._logits[:r])
