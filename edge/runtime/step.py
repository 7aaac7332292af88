"""StepBatch / StepOutput: what the engine hands a backend for one step, and what comes back.

One declared layout, flat and C-shaped (every field a contiguous numpy array of a fixed dtype,
no Python objects), so that a C or CUDA consumer reads it as a struct of pointers and later
work (C API, speculative decoding, LoRA) extends it by adding arrays. R rows (sequences), T
tokens (all rows' new tokens, row-major), MB = max blocks per sequence.

    row r's tokens:   token_ids[query_start[r] : query_start[r + 1]]   (a decode row has 1,
                      a prefill chunk several)
    token t writes its K/V to slot_mapping[t] = block * block_size + offset and sits at
                      positions[t]; row r then attends over seq_lens[r] cached tokens whose
                      blocks are block_tables[r, : ceil(seq_lens[r] / block_size)]
    logits_rows[r]:   1 when row r's last token produces a next token (the last prompt chunk,
                      every decode row), 0 for a prompt chunk that is not the last
    block_copies:     [N, 2] (src block, dst block) to copy before the step (backends with a
                      contiguous KV layout copy a cached prefix into the row's own region)
    prev_rows:        [R] or empty (= all -1); only for backends with caps.async_steps. Row r's
                      last token id is the id the PREVIOUS step sampled for its row prev_rows[r]
                      (still on the device when this step was built): token_ids holds -1 there
                      and the backend takes the id on the device. -1: token_ids holds it.

Per-row sampling: temperature (0 = greedy), top_p, top_k, and one uniform u in [0, 1) drawn
from the request's own seeded RNG, so a backend that samples on the device reproduces the host
sampler's draw; `host_sample[r] = 1` asks the backend for the row's float32 logits instead
(repetition penalty, top-k or a backend without device sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

I32 = np.int32
F32 = np.float32


@dataclass
class StepBatch:
    block_size: int
    # per token [T]
    token_ids: np.ndarray  # int32
    positions: np.ndarray  # int32
    slot_mapping: np.ndarray  # int32
    # per row [R]
    query_start: np.ndarray  # int32 [R + 1]
    seq_lens: np.ndarray  # int32: cached + new tokens after the step
    block_tables: np.ndarray  # int32 [R, MB], -1 past the row's blocks
    logits_rows: np.ndarray  # int32 0/1
    temperature: np.ndarray  # float32
    top_p: np.ndarray  # float32
    top_k: np.ndarray  # int32
    uniform: np.ndarray  # float32
    host_sample: np.ndarray  # int32 0/1
    block_copies: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), I32))  # int32 [N, 2]
    prev_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, I32))  # int32 [R] or [0] (none)

    @property
    def has_prev_rows(self) -> bool:
        """Some row's input id is the previous step's sampled id, still on the device."""
        return bool(self.prev_rows.shape[0]) and bool((self.prev_rows >= 0).any())

    @property
    def num_rows(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def row_tokens(self, r: int) -> np.ndarray:
        return self.token_ids[self.query_start[r]:self.query_start[r + 1]]

    def num_new(self, r: int) -> int:
        return int(self.query_start[r + 1] - self.query_start[r])

    @property
    def is_decode_only(self) -> bool:
        """Every row appends exactly one token (the shape CUDA graphs are captured for)."""
        return self.num_tokens == self.num_rows

    def validate(self) -> None:
        """Shape and dtype checks (tests and backends in debug use; cheap)."""
        r, t = self.num_rows, self.num_tokens
        for name, n, dt in (("token_ids", t, I32), ("positions", t, I32), ("slot_mapping", t, I32),
                            ("query_start", r + 1, I32), ("seq_lens", r, I32), ("logits_rows", r, I32),
                            ("temperature", r, F32), ("top_p", r, F32), ("top_k", r, I32),
                            ("uniform", r, F32), ("host_sample", r, I32)):
            a = getattr(self, name)
            if a.shape[0] != n or a.dtype != dt or not a.flags.c_contiguous:
                raise ValueError(f"StepBatch.{name}: want {n} x {np.dtype(dt).name} contiguous, got {a.shape} {a.dtype}")
        if self.block_tables.shape[0] != r or self.block_tables.dtype != I32:
            raise ValueError(f"StepBatch.block_tables: want [{r}, MB] int32, got {self.block_tables.shape} {self.block_tables.dtype}")
        if self.prev_rows.shape[0] not in (0, r) or self.prev_rows.dtype != I32:
            raise ValueError(f"StepBatch.prev_rows: want [{r}] or [0] int32, got {self.prev_rows.shape} {self.prev_rows.dtype}")
        if int(self.query_start[-1]) != t or np.any(np.diff(self.query_start) < 1):
            raise ValueError("StepBatch.query_start must rise by at least 1 per row and end at num_tokens")


@dataclass
class StepOutput:
    """sampled[r]: the next token of row r (-1 where logits_rows is 0 or the row is host-sampled);
    logits: float32 [R, V] rows for host sampling (rows not asked for may hold anything), or None."""

    sampled: np.ndarray  # int32 [R]
    logits: np.ndarray | None = None


@dataclass(frozen=True)
class BackendCaps:
    """What a backend declares it can do; the engine reads these fields and never probes.

    kv_layout "paged": K/V live in one pool of blocks, a block may be shared by several rows
    (prefix cache hits cost nothing). "contiguous": each running sequence owns a region of
    blocks_per_seq consecutive blocks (region = block // blocks_per_seq, e.g. ONNX Runtime's
    GroupQueryAttention cache rows); a prefix hit from another region is copied
    (StepBatch.block_copies)."""

    num_blocks: int  # KV blocks the backend allocated (the plan's kv_blocks)
    block_size: int
    max_seqs: int  # rows per step (the plan's max_batch)
    max_context: int  # tokens per sequence
    vocab_size: int
    kv_layout: str = "paged"  # "paged" | "contiguous"
    device_sampling: bool = False  # samples greedy / temperature / top-p rows itself with `uniform`
    mixed_rows: bool = True  # prefill chunks and decode rows in one step
    greedy_stream: bool = False  # has run_greedy(): a host-free stream for one greedy sequence
    prefix_cache: bool = True  # can start a row after cached blocks (else every sequence starts at 0)
    prefill_chunk: int = 0  # largest prompt piece per row and step (0: the token budget)
    mixed_prefill: int = 0  # prompt tokens per step, all pieces together, while other rows decode (bounds their gaps)
    piece_ctx: int = 0  # past tokens at which a prompt token costs twice its cost at context 0 (attention
    # grows with the past): mixed pieces shrink with their past to cost about the same (0: they do not)
    piece_align: int = 0  # smallest mixed piece when pieces shrink with their past (0: the scheduler's PIECE_ALIGN)
    kv_dtype: str = "float32"
    kv_bytes: int = 0  # bytes the backend allocated for the KV cache (planned vs allocated)
    releases_kv: bool = False  # has release_kv(block ranges): gives the memory of dead rows back (contiguous)
    partial_prefix: bool = False  # paged + copies_blocks: a prefix hit may end inside a block (kv.py's partial
    # hits copy a cached block's rows into a new block; tested on this backend's block copies)
    backend: str = ""  # the backend's name (edge.runtime.generator.BACKENDS): what `auto` picked, for reports
    copies_blocks: bool = True  # executes StepBatch.block_copies (contiguous: sequences are moved down into
    # freed regions, so one call covers the batch); a backend that keeps its own sequences (TensorRT) cannot
    async_steps: bool = False  # has launch(batch) -> handle whose result() -> StepOutput: launch returns once
    # the step is queued (the GPU runs it while the host builds the next one), and takes StepBatch.prev_rows
    # (the previous launch's sampled ids, on the device); execute(batch) == launch(batch).result()

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.max_context // self.block_size)


def empty_batch(block_size: int, max_blocks: int) -> StepBatch:
    z = np.zeros(0, I32)
    return StepBatch(block_size, z, z.copy(), z.copy(), np.zeros(1, I32), z.copy(), np.zeros((0, max_blocks), I32),
                     z.copy(), np.zeros(0, F32), np.zeros(0, F32), z.copy(), np.zeros(0, F32), z.copy())
