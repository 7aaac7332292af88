"""The embedding engine at run time: an embedder bundle served by ONNX Runtime (CPU) or by the
GPU encoder (edge.runtime.cuda.embedder, `backend="cuda"`).

    texts --tokenizers (truncate to max_seq_length)--> ids
          --sort by length, cut into batches, pad each batch to its own longest--> [B, S] int32
          --model.onnx (encoder + pooling + L2)--> [B, dim] float32
          --restore input order--> [n, dim]

Sorting by length before batching means a batch of short queries never pays for one long
passage's padding. The cuda backend packs each batch without padding instead, so it keeps the
input order and overlaps tokenizing the next batch with the GPU's work on this one.
No torch, no transformers: numpy, tokenizers and onnxruntime (or cupy) only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edge.bundle import Bundle
from edge.errors import BackendError, BundleError, EdgeRagError, UsageError
from edge.runtime.cuda import available as _cuda_available  # imports no cupy; never raises

BACKENDS = ("auto", "cpu", "onnxruntime", "cuda")
# EDGE_RAG_NATIVE_ENCODER=0: the "cpu" backend runs onnxruntime even where the native encoder could run;
# =1: the native encoder on an ARM CPU with dot products too (its NEON kernels, checked under qemu, not yet timed on a chip)
NATIVE_ENV = "EDGE_RAG_NATIVE_ENCODER"
INPUTS = ("input_ids", "attention_mask")  # must match edge.build.encoder.INPUTS
OUTPUT = "sentence_embedding"


@dataclass(frozen=True)
class EmbedderInfo:
    """What the manifest says about the model (see edge.models.bert.EncoderSpec)."""

    name: str
    dim: int
    max_seq_length: int
    pooling: str
    normalize: bool
    quant: str
    embedder_id: str
    backend: str = "onnxruntime"  # "native": edge.runtime.cpu.encoder; "cuda": fp16 on the GPU, from the source weights


# Attention scores are [B, heads, S, S]: a batch of 32 texts of 512 tokens holds ~400 MB per
# layer in flight (measured: the server's RSS went 377 MB -> 1.29 GB and stayed there). Batches
# are cut so that B * S * S stays under this (32 chunks of ~180 tokens; 4 texts of 512).
MAX_BATCH_CELLS = 1 << 20
# NOTE: on CPU (ONNX Runtime) a batch is also cut to MAX_BATCH_TOKENS tokens (B * S), whatever the
# caller's batch_size: small batches keep every activation ([B, S, 1536] after FFN up, [B, 12, S, S]
# scores) in the cores' caches, and the int8 GEMMs still get S rows each. Measured (int8 MiniLM,
# 256 real scale-corpus chunks of ~190 tokens, 2 threads, sizes alternated in one locked job on the
# 2-core EPYC, texts/s median of 3): batch 1 / 2 / 3 / 4 / 6 / 32: 50.1 / 47.9 / 49.4 / 44.1 / 39.9 /
# 32.5 at load 3.4; batch 4 / 8 / 16 / 32 / 64: 85.8 / 75.7 / 65.0 / 63.8 / 61.7 at load 1.8-2.2.
# The vectors do not change: the int8 graph scales each token's activations on its own
# (edge.build.encoder.quantize_linears_per_row), so a text's vector does not depend on its batch.
MAX_BATCH_TOKENS = 512
# STREAMS_NOTE: on CPU, `threads` cores run `threads` graph calls at once, each on one thread, rather
# than one call at a time on `threads` threads: a call is ~150 small ops, and every op's fork/join
# across threads costs. Measured (int8 MiniLM, 256 real scale-corpus chunks of ~190 tokens in calls of
# <= 512 tokens, 2 cores, alternated in one locked job, texts/s median of 3, load 2.7): one call at a
# time on 2 threads 77.9, two calls at once on 1 thread each 92.5 (1.19x), two calls at once on a
# 2-thread session 87.3. A single short query now runs on one thread (bench_embed's latency rows).
ENCODE_PIECE = 32  # texts per tokenizer call
log = logging.getLogger(__name__)


def length_buckets(lengths: list[int], batch_size: int, max_cells: int = MAX_BATCH_CELLS,
                   max_tokens: int | None = None, exact: bool = False) -> list[np.ndarray]:
    """Indices of the inputs, grouped into batches of similar length (longest first), at most
    `batch_size` each, at most `max_cells` in B * S^2 and `max_tokens` in B * S (S = the batch's
    longest; a batch holds at least one text); `exact`: of one length each (no padding). Concatenating
    the batches gives a permutation of range(len(lengths))."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    neg_sorted = -lengths[order]  # ascending
    out, i = [], 0
    while i < len(order):
        longest = max(1, int(lengths[order[i]]))  # sorted longest first: the batch's S
        b = min(batch_size, max_cells // (longest * longest), (max_tokens or 1 << 62) // longest)
        b = max(1, b)
        if exact:  # up to the first shorter text
            b = min(b, int(np.searchsorted(neg_sorted, neg_sorted[i], side="right")) - i)
        out.append(order[i:i + b])
        i += b
    return out


def resolve_backend(backend: str) -> str:
    """"auto" -> "cuda" when a GPU of compute capability 8.0+ and cupy are usable, else "cpu": the
    native encoder (edge.runtime.cpu.encoder) where it runs this bundle on this CPU, else onnxruntime.
    The generator's names are accepted too: "tensorrt" has no embedder of its own and means "auto"
    here; "native" (the generator's own CPU step) means "cpu". "onnxruntime" is onnxruntime only."""
    if backend == "tensorrt":
        backend = "auto"
    if backend == "native":
        backend = "cpu"
    if backend not in BACKENDS:
        raise UsageError(f"unknown embedder backend {backend!r}", fix=f"choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cuda" if _cuda_available() else "cpu"
    return backend


def _cuda_unavailable_reason() -> str:
    from edge.runtime import cuda

    return cuda.gpu_disabled() or str(cuda.probe(compile=False).get("reason") or "no usable NVIDIA GPU")


def built_for_exact_int8(manifest) -> bool:
    """Whether an int8 embedder bundle holds int8 weights (built where u8 x s8 products are exact) rather than
    onnxruntime's uint8 ones for x86 without VNNI (or, older, 7-bit int8)."""
    return bool(manifest.quant.details.get("u8s8_exact", "reduce_range" not in str(manifest.quant.details.get("weights", ""))))


def isa_mismatch(manifest, onnxruntime: bool = False) -> str | None:
    """Why an int8 embedder bundle loses accuracy on this CPU, or None. Built on a CPU with exact
    u8 x s8 GEMMs (VNNI, ARM), its MatMulInteger weights are int8; on x86 without VNNI the int16
    pair sums of u8 x s8 saturate in onnxruntime (edge.cpu), not in the native encoder's AVX2 kernels
    (edge.runtime.cpu.encoder.int8_exact). Built where neither runs, they are uint8 (u8 x u8, exact
    everywhere; older builds: 7-bit int8). Measured under qemu -cpu Haswell: docs/measurements.md."""
    from edge.cpu import u8s8_exact
    from edge.runtime.cpu.encoder import int8_exact

    if manifest.quant.recipe != "int8":
        return None
    # onnxruntime: the bundle runs on onnxruntime's CPU kernels here, not on the native encoder
    if built_for_exact_int8(manifest) and not (u8s8_exact() if onnxruntime else int8_exact()):
        if onnxruntime and int8_exact():
            return ("its full-range int8 weights saturate in onnxruntime on this CPU (x86 without VNNI); the default cpu "
                    "backend (the native encoder) computes them exactly")
        return "its full-range int8 weights saturate on this CPU (x86 without VNNI); rebuild it on this machine for full accuracy"
    return None


def default_threads() -> int:
    """Physical-ish cores available to this process ($EDGE_RAG_THREADS overrides)."""
    env = os.environ.get("EDGE_RAG_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# NOTE: graphs built since the Add + LayerNormalization change (edge.build.encoder._add_layer_norm)
# must not be re-fused into com.microsoft.SkipLayerNormalization, 4.7x slower on CPU (ONNX Runtime
# 1.32; measured in that function's note). Older graphs hold SkipLayerNormalization nodes themselves
# and are unaffected.
ORT_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def open_ort_session(path: str | Path, *, threads: int | None = None, spin: bool = False,
                     providers: list[str] | None = None) -> Any:
    """The onnxruntime session of an embedder graph, as the runtime and the build's calibration run it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # NOTE: no spin-waiting between ops by default. The embedder shares a few cores with the
    # generator (EdgeRuntime hosts both); spinning threads of an idle session steal those cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))


class Embedder:
    """Sentence embeddings from an embedder bundle. Thread-safe for concurrent `embed` calls
    (onnxruntime sessions are; the tokenizer is only read)."""

    def __init__(self, bundle: Bundle, session: Any, tokenizer: Any, backend: str = "onnxruntime", streams: int = 1):
        m = bundle.manifest
        model = m.model
        self.bundle = bundle
        self.session = session  # onnxruntime.InferenceSession, or edge.runtime.cuda.embedder.CudaEncoder
        self.backend = backend
        self.tokenizer = tokenizer  # tokenizers.Tokenizer, truncating to max_seq_length, no padding
        # NOTE: the cuda backend computes the same model in fp16 from the bundle's source weights and
        # keeps the bundle's embedder_id, so a collection can be ingested on one backend and queried on
        # the other (all-MiniLM-L6-v2: cosine >= 0.999 to fp32; the int8 graph's is >= 0.992)
        self.info = EmbedderInfo(
            name=model["name"], dim=int(model["dim"]), max_seq_length=int(model["max_seq_length"]),
            pooling=model["pooling"], normalize=bool(model["normalize"]),
            quant="fp16" if backend == "cuda" else m.quant.recipe, embedder_id=m.embedder_id, backend=backend,
        )
        self.pad_id = int(model.get("pad_token_id", 0))
        self._counter: Any = None  # an untruncated copy of the tokenizer, made on first count_tokens
        # "none": the graph reads no padding mask (edge.build.encoder PADDING): a call's rows have one length
        self.unpadded = backend == "onnxruntime" and (m.graph or {}).get("padding") == "none"
        self.streams = streams  # graph calls embed() runs at once (onnxruntime: STREAMS_NOTE)

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | Path, *, threads: int | None = None, verify: bool = True,
                    providers: list[str] | None = None, spin: bool = False, backend: str = "cpu") -> "Embedder":
        """Open an embedder bundle (checksums verified) and start an onnxruntime session, or the
        GPU encoder (`backend` "cuda", or "auto" where a GPU is usable). `threads`: the cores to use
        (default: the cores this process may use): on CPU, embed() runs that many graph calls at once,
        one thread each (STREAMS_NOTE). `spin`: let idle worker threads spin-wait (lower latency on a
        machine with cores to spare)."""
        from tokenizers import Tokenizer

        asked = backend
        backend = resolve_backend(backend)
        if asked == "cuda" and backend == "cuda" and not _cuda_available():
            raise BackendError(f"--backend cuda: the cuda embedder is not available ({_cuda_unavailable_reason()})",
                               fix="pip install 'edge-rag[cuda]' on a machine with an NVIDIA GPU (compute capability 8.0+), "
                                   "or use --backend onnxruntime")
        bundle = Bundle.open(path, kind="embedder", verify=verify)
        if not bundle.manifest.embedder_id:
            raise BundleError(f"{bundle.path}: manifest lacks 'embedder_id'", fix="rebuild the embedder bundle")
        model = bundle.manifest.model
        tok = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
        tok.no_padding()  # padding is per batch, below
        tok.enable_truncation(max_length=int(model["max_seq_length"]))
        if backend == "cuda":
            try:
                return cls(bundle, _open_cuda_encoder(bundle), tok, backend="cuda")
            except EdgeRagError as e:  # no source weights here, an unsupported architecture...
                if asked == "cuda":
                    raise
                log.warning("the GPU embedder cannot run this bundle (%s); using onnxruntime", e)
        cores = threads or default_threads()
        gpu_provider = any(p != "CPUExecutionProvider" for p in providers or [])
        if backend == "cpu" and not gpu_provider:
            enc = _open_native_encoder(bundle)
            if enc is not None:
                return cls(bundle, enc, tok, backend="native", streams=cores)
        why = isa_mismatch(bundle.manifest, onnxruntime=not gpu_provider)  # the native encoder is exact on every CPU it runs on
        if why:
            import sys

            print(f"warning: {bundle.path}: {why}", file=sys.stderr)
        streams = 1 if gpu_provider else cores
        try:
            sess = open_ort_session(bundle.file("model.onnx"), threads=cores // streams, spin=spin, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{bundle.path}: onnxruntime cannot load model.onnx ({e})",
                               fix="rebuild the bundle with this onnxruntime version") from None
        return cls(bundle, sess, tok, streams=streams)

    # ---- properties ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def embedder_id(self) -> str:
        return self.info.embedder_id

    @property
    def max_seq_length(self) -> int:
        return self.info.max_seq_length

    @property
    def relevance_gate(self) -> dict | None:
        """Thresholds of the relevance gate calibrated for this embedder at build (None: built before)."""
        return self.bundle.manifest.relevance_gate

    @property
    def normalize(self) -> bool:
        return self.info.normalize

    # ---- tokens ----------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for `text`, [CLS]/[SEP] included, BEFORE truncation
        (so a chunker can tell whether a chunk fits max_seq_length)."""
        return len(self._token_counter().encode(text).ids)

    def count_tokens_many(self, texts: list[str]) -> list[int]:
        """count_tokens of each text, the tokenizer's batch call (its threads) doing the work."""
        counter, out = self._token_counter(), []
        for i in range(0, len(texts), ENCODE_PIECE):
            out += [len(e.ids) for e in counter.encode_batch(texts[i:i + ENCODE_PIECE])]
        return out

    def _token_counter(self):
        if self._counter is None:
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(self.tokenizer.to_str())
            self._counter.no_truncation()
            self._counter.no_padding()  # a batch's counts are each text's own
        return self._counter

    def _encode(self, texts: list[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of each text, truncated to max_seq_length, or to `max_tokens` when smaller: the
        first max_tokens - 1 ids and the last ([SEP]), as the tokenizer's own truncation would cut."""
        # NOTE: in pieces: an Encoding keeps the truncated-off tokens (overflowing), strings and
        # offsets; 256 inputs of 2,000 characters at once grew the tokenizer threads' heaps for good
        out: list[list[int]] = []
        for i in range(0, len(texts), ENCODE_PIECE):
            out += [e.ids for e in self.tokenizer.encode_batch(texts[i:i + ENCODE_PIECE])]
        if max_tokens is not None and max_tokens < self.max_seq_length:
            if max_tokens < 2:
                raise UsageError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
            out = [x if len(x) <= max_tokens else x[:max_tokens - 1] + x[-1:] for x in out]
        return out

    # ---- embedding -------------------------------------------------------------------
    def embed(self, texts: list[str], batch_size: int = 32, progress: bool = False,
              max_tokens: int | None = None) -> np.ndarray:
        """Embeddings [len(texts), dim] float32, in input order (unit-norm when the model says so).
        `max_tokens`: read at most that many tokens of each text (default max_seq_length; _encode)."""
        return self.embed_counted(texts, batch_size, progress, max_tokens)[0]

    def embed_counted(self, texts: list[str], batch_size: int = 32, progress: bool = False,
                      max_tokens: int | None = None) -> tuple[np.ndarray, int]:
        """embed(), and the number of tokens the model read (after truncation: an API's usage)."""
        if isinstance(texts, str):
            raise UsageError("embed() takes a list of strings", fix="use embed_query(text) for one string")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out, 0
        if self.backend == "cuda":
            return out, self._embed_cuda(texts, batch_size, progress, out, max_tokens)
        ids = self._encode(texts, max_tokens)
        batches = length_buckets([len(x) for x in ids], batch_size, max_tokens=MAX_BATCH_TOKENS, exact=self.unpadded)
        if self.streams > 1 and len(batches) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # `streams` calls of the graph at once, each on one thread (ORT lets go of the GIL in
            # run): STREAMS_NOTE
            with ThreadPoolExecutor(self.streams, thread_name_prefix="embed") as pool:
                done = pool.map(lambda idx: self._run([ids[i] for i in idx]), batches)
                for idx, v in zip(_maybe_progress(batches, progress, len(texts)), done):
                    out[idx] = v
        else:
            for idx in _maybe_progress(batches, progress, len(texts)):
                out[idx] = self._run([ids[i] for i in idx])
        return out, sum(map(len, ids))

    def embed_query(self, text: str) -> np.ndarray:
        """One embedding [dim] float32."""
        return self._run(self._encode([text]))[0]

    def _embed_cuda(self, texts: list[str], batch_size: int, progress: bool, out: np.ndarray,
                    max_tokens: int | None = None) -> int:
        """The GPU path of embed_counted: batches in input order (packed, so unsorted batches cost no
        padding). Three stages overlap: a thread tokenizes batch i+1 (tokenizers lets go of the GIL)
        while this thread queues batch i's kernels and the GPU runs batch i-1. Returns the tokens read."""
        from concurrent.futures import ThreadPoolExecutor

        from edge.runtime.cuda.embedder import MAX_LAUNCH_TOKENS, Pending

        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        per = max(1, min(batch_size, MAX_LAUNCH_TOKENS // self.max_seq_length))
        starts = list(range(0, len(texts), per))
        tokens, pending = 0, None
        # NOTE: H200, all-MiniLM-L6-v2, 64 texts of 200 tokens a batch: tokenizing 3.2 ms, queueing
        # the kernels 1.8 ms of Python, the GPU 2.25 ms. Without the thread 5.5 ms a batch, with it
        # 5.4 (11,681 -> 11,933 texts/s, inside the rounds' spread): the ids become Python lists
        # under the GIL, which the queueing thread needs too.
        with ThreadPoolExecutor(1, thread_name_prefix="embed-tokenize") as pool:
            nxt = pool.submit(self._encode, texts[:per], max_tokens)
            for k in _maybe_progress(range(len(starts)), progress, len(texts), step=per):
                ids = nxt.result()
                if k + 1 < len(starts):
                    nxt = pool.submit(self._encode, texts[starts[k + 1]:starts[k + 1] + per], max_tokens)
                tokens += sum(map(len, ids))
                launched = (starts[k], len(ids), Pending(self.session.cp, self.session.launch(ids)))
                if pending is not None:
                    j, n, p = pending
                    out[j:j + n] = p.result()
                pending = launched
        if pending is not None:
            j, n, p = pending
            out[j:j + n] = p.result()
        return tokens

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        """Right-pad a batch to its longest member and run the graph: [B, S] -> [B, dim]."""
        if self.backend in ("cuda", "native"):
            return self.session.run(batch)
        n, seq = len(batch), max(len(x) for x in batch)
        if self.unpadded and min(len(x) for x in batch) != seq:
            raise BackendError(f"{self.bundle.path}: its graph reads no padding mask; a call's texts must have one length")
        ids = np.full((n, seq), self.pad_id, dtype=np.int32)
        mask = np.zeros((n, seq), dtype=np.int32)
        for r, x in enumerate(batch):
            ids[r, :len(x)] = x
            mask[r, :len(x)] = 1
        opts = None
        if n * seq * seq >= MAX_BATCH_CELLS // 2:
            # a large batch: give the arena's extra chunks back when the run ends, so that one
            # big request does not keep the process hundreds of MB larger
            import onnxruntime as ort

            opts = ort.RunOptions()
            opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return self.session.run([OUTPUT], {INPUTS[0]: ids, INPUTS[1]: mask}, opts)[0]


def _open_native_encoder(bundle: Bundle) -> Any:
    """The native encoder of `bundle` where it runs on this CPU with its vector kernels (AVX-512 VNNI or AVX2), else
    None (the reason logged): onnxruntime then embeds, with vectors within cosine 0.999 of these (0.99949 the lowest
    measured, all-MiniLM-L6-v2 on 200 varied texts)."""
    if os.environ.get(NATIVE_ENV, "").strip() == "0":
        return None
    from edge.runtime.cpu.encoder import NativeEncoder, vector_isa

    try:
        if vector_isa() is None:
            log.info("the native encoder has no vector kernels for this CPU; using onnxruntime")
            return None
        return NativeEncoder.open(bundle)
    except EdgeRagError as e:  # not an int8 per-row graph, no onnx package, no C compiler
        log.info("the native encoder cannot run %s (%s); using onnxruntime", bundle.path, e)
        return None


def _open_cuda_encoder(bundle: Bundle) -> Any:
    from edge.runtime.cuda.embedder import CudaEncoder, load_source_weights

    spec, weights = load_source_weights(bundle)
    return CudaEncoder(spec, weights)


def _maybe_progress(batches: Any, progress: bool, total: int, step: int | None = None) -> Iterable[Any]:
    """Yield `batches`, advancing a progress bar by each one's length (or by `step` texts)."""
    if not progress:
        yield from batches
        return
    from rich.progress import Progress

    with Progress(transient=True) as p:
        task = p.add_task("embedding", total=total)
        for b in batches:
            yield b
            p.advance(task, step if step is not None else len(b))
