"""The embedding engine at run time: an embedder bundle served by ONNX Runtime.

    texts --tokenizers (truncate to max_seq_length)--> ids
          --sort by length, cut into batches, pad each batch to its own longest--> [B, S] int32
          --model.onnx (encoder + pooling + L2)--> [B, dim] float32
          --restore input order--> [n, dim]

Sorting by length before batching means a batch of short queries never pays for one long
passage's padding. No torch, no transformers: numpy, tokenizers and onnxruntime only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edge.bundle import Bundle
from edge.errors import BackendError, BundleError, UsageError

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


# Attention scores are [B, heads, S, S]: a batch of 32 texts of 512 tokens holds ~400 MB per
# layer in flight (measured: the server's RSS went 377 MB -> 1.29 GB and stayed there). Batches
# are cut so that B * S * S stays under this (32 chunks of ~180 tokens; 4 texts of 512).
MAX_BATCH_CELLS = 1 << 20
ENCODE_PIECE = 32  # texts per tokenizer call


def length_buckets(lengths: list[int], batch_size: int, max_cells: int = MAX_BATCH_CELLS) -> list[np.ndarray]:
    """Indices of the inputs, grouped into batches of similar length (longest first), at most
    `batch_size` each and at most `max_cells` in B * S^2 (S = the batch's longest).
    Concatenating the batches gives a permutation of range(len(lengths))."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    out, i = [], 0
    while i < len(order):
        longest = max(1, int(lengths[order[i]]))  # sorted longest first: the batch's S
        b = max(1, min(batch_size, max_cells // (longest * longest)))
        out.append(order[i:i + b])
        i += b
    return out


def default_threads() -> int:
    """Physical-ish cores available to this process ($EDGE_RAG_THREADS overrides)."""
    env = os.environ.get("EDGE_RAG_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Embedder:
    """Sentence embeddings from an embedder bundle. Thread-safe for concurrent `embed` calls
    (onnxruntime sessions are; the tokenizer is only read)."""

    def __init__(self, bundle: Bundle, session: Any, tokenizer: Any):
        m = bundle.manifest
        model = m.model
        self.bundle = bundle
        self.session = session
        self.tokenizer = tokenizer  # tokenizers.Tokenizer, truncating to max_seq_length, no padding
        self.info = EmbedderInfo(
            name=model["name"], dim=int(model["dim"]), max_seq_length=int(model["max_seq_length"]),
            pooling=model["pooling"], normalize=bool(model["normalize"]),
            quant=m.quant.recipe, embedder_id=m.embedder_id,
        )
        self.pad_id = int(model.get("pad_token_id", 0))
        self._counter: Any = None  # an untruncated copy of the tokenizer, made on first count_tokens

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | Path, *, threads: int | None = None, verify: bool = True,
                    providers: list[str] | None = None, spin: bool = False) -> "Embedder":
        """Open an embedder bundle (checksums verified) and start an onnxruntime session.
        `threads`: intra-op threads (default: the cores this process may use). `spin`: let idle
        worker threads spin-wait (lower latency on a machine with cores to spare)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        bundle = Bundle.open(path, kind="embedder", verify=verify)
        if not bundle.manifest.embedder_id:
            raise BundleError(f"{bundle.path}: manifest lacks 'embedder_id'", fix="rebuild the embedder bundle")
        model = bundle.manifest.model
        tok = Tokenizer.from_file(str(bundle.file("tokenizer.json")))
        tok.no_padding()  # padding is per batch, below
        tok.enable_truncation(max_length=int(model["max_seq_length"]))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # NOTE: no spin-waiting between ops. The embedder shares a few cores with the generator
        # (EdgeRuntime hosts both); spinning threads of an idle session steal those cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            sess = ort.InferenceSession(str(bundle.file("model.onnx")), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{bundle.path}: onnxruntime cannot load model.onnx ({e})",
                               fix="rebuild the bundle with this onnxruntime version") from None
        return cls(bundle, sess, tok)

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
    def normalize(self) -> bool:
        return self.info.normalize

    # ---- tokens ----------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for `text`, [CLS]/[SEP] included, BEFORE truncation
        (so a chunker can tell whether a chunk fits max_seq_length)."""
        if self._counter is None:
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(self.tokenizer.to_str())
            self._counter.no_truncation()
        return len(self._counter.encode(text).ids)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # NOTE: in pieces: an Encoding keeps the truncated-off tokens (overflowing), strings and
        # offsets; 256 inputs of 2,000 characters at once grew the tokenizer threads' heaps for good
        out: list[list[int]] = []
        for i in range(0, len(texts), ENCODE_PIECE):
            out += [e.ids for e in self.tokenizer.encode_batch(texts[i:i + ENCODE_PIECE])]
        return out

    # ---- embedding -------------------------------------------------------------------
    def embed(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embeddings [len(texts), dim] float32, in input order (unit-norm when the model says so)."""
        return self.embed_counted(texts, batch_size, progress)[0]

    def embed_counted(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, int]:
        """embed(), and the number of tokens the model read (after truncation: an API's usage)."""
        if isinstance(texts, str):
            raise UsageError("embed() takes a list of strings", fix="use embed_query(text) for one string")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out, 0
        ids = self._encode(texts)
        batches = length_buckets([len(x) for x in ids], batch_size)
        for idx in _maybe_progress(batches, progress, len(texts)):
            out[idx] = self._run([ids[i] for i in idx])
        return out, sum(map(len, ids))

    def embed_query(self, text: str) -> np.ndarray:
        """One embedding [dim] float32."""
        return self._run(self._encode([text]))[0]

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        """Right-pad a batch to its longest member and run the graph: [B, S] -> [B, dim]."""
        n, seq = len(batch), max(len(x) for x in batch)
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


def _maybe_progress(batches: list[np.ndarray], progress: bool, total: int) -> Iterable[np.ndarray]:
    if not progress:
        yield from batches
        return
    from rich.progress import Progress

    with Progress(transient=True) as p:
        task = p.add_task("embedding", total=total)
        for b in batches:
            yield b
            p.advance(task, len(b))
