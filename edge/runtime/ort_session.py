"""ONNX Runtime decoder session (CPU, or CUDA EP where onnxruntime-gpu is installed).

Runs the bundle's `model.ort.onnx` (see edge.build.onnx_decoder). The KV cache is one float32
buffer per layer and K/V, [max_batch, kv_heads, max_context, head_dim], allocated once (calloc:
pages a sequence never reaches are never touched, so they cost no RSS). GroupQueryAttention
updates it in place: past_key_values.{i}.* and present.{i}.* are bound through IOBinding to
the same OrtValue over the same numpy memory, so no step copies the cache.

A sequence owns one batch slot (row of the buffers). A decode step over several sequences runs
one ORT call per run of consecutive slots (one call in the usual case, where a scheduler
admits sequences into the lowest free slots); each row carries its own length in seqlens_k.
"""

from __future__ import annotations

import functools
import mmap
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edge.errors import BackendError, ContextLengthError, UsageError
from edge.plan import KV_BLOCK_TOKENS
from edge.runtime.scheduler import piece_ctx_of
from edge.runtime.step import BackendCaps, StepBatch, StepOutput

# engine KV block (tokens): the prefix cache's granularity on this backend, the plan's block size.
# 16, not 32 as before: SmolLM2's chat template puts a 24-token system prompt before every question, so
# 32-token blocks never shared it; with 16 bench_serve's chats find 34-37% of their prompt tokens in
# the cache instead of 5% (a copied block costs ~0.3 ms, the 16 tokens' prefill ~15 ms)
KV_BLOCK = KV_BLOCK_TOKENS
MIXED_PREFILL = 32  # prompt tokens per step while other sequences decode: on 2 cores a decode step of
# 8 rows costs about as much as 32-48 prompt tokens, so a long prompt at most ~doubles their token gaps
PIECE_CTX_PER_PARAM = 0.28  # a prompt token's weight work over its attention work per past token, per
# (layer linear params / q width): SmolLM2-135M int4 on 2 cores, a 32-token piece costs 40 ms after no past and
# 110 ms after 3,000 tokens (ORT's CPU GroupQueryAttention), so a token costs twice as much after ~1,700
PREFILL_CHUNK = 128  # prompt tokens per ORT call: bounds activation memory (~0.1 MB per token
# for SmolLM2-135M) while keeping GEMMs large enough to run at full speed


def limit_malloc_caching() -> None:
    """glibc keeps freed blocks below a *dynamic* mmap threshold that grows up to 32 MB after
    ORT frees its load-time buffers (the parsed protobuf, pre-packed originals), and that memory
    stays resident. A fixed threshold returns large blocks to the OS: ~40 MB less peak RSS
    for SmolLM2-135M. No-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zeroed array whose pages become resident only when written (anonymous mmap).

    Not np.zeros: numpy madvises arrays of 4 MB and more to transparent huge pages, so the
    first write into any 2 MB stretch makes all of it resident. A KV buffer [B, kv, C, D] is
    written a row at a time per head plane; with SmolLM2's 8192-token context each plane is
    2 MB and a 200-token prompt made 250 MB of the 360 MB cache resident. Here huge pages are
    refused explicitly (Jetson kernels often run THP "always"), so a prompt touches ~its rows."""
    n = int(np.prod(shape))
    nbytes = max(n * np.dtype(dtype).itemsize, 1)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # kernel without THP support
            pass
    return np.frombuffer(mm, dtype=dtype, count=n).reshape(shape)  # the array keeps `mm` alive


def drop_pages(view: np.ndarray) -> int:
    """Give the whole pages inside a C-contiguous slice of a lazy_zeros buffer back to the OS
    (madvise MADV_DONTNEED: they read as zeros, and cost no RSS, until written again). Returns
    the bytes dropped; 0 where madvise is unavailable."""
    page = mmap.PAGESIZE
    start = view.ctypes.data
    first, stop = -(-start // page) * page, (start + view.nbytes) // page * page
    if stop <= first:
        return 0
    madvise = _madvise()
    if madvise is None or madvise(first, stop - first, 4) != 0:  # 4: MADV_DONTNEED (Linux, BSD, macOS)
        return 0
    return stop - first


@functools.lru_cache(maxsize=1)
def _madvise():
    try:
        import ctypes

        fn = ctypes.CDLL(None).madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return fn
    except (OSError, AttributeError):
        return None


@dataclass
class _Binding:
    """An IOBinding with the KV slices of slots [start, start + count) bound in place."""

    io: object
    logits: np.ndarray  # [count, vocab] output buffer
    keep: list = field(default_factory=list)  # OrtValues / arrays that must outlive the binding
    # decode inputs, updated in place each step (no per-step OrtValue creation)
    step_ids: np.ndarray | None = None  # int64 [count, 1]
    step_seqlens: np.ndarray | None = None  # int32 [count]
    step_total: np.ndarray | None = None  # int32 []
    step_values: tuple = ()


def idle_cores(window_s: float = 0.15) -> float | None:
    """CPUs idle right now, from two /proc/stat samples `window_s` apart (None off Linux)."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total (guest time is inside user)

    try:
        i0, t0 = sample()
        time.sleep(window_s)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (i1 - i0) / max(1, t1 - t0)


def should_spin(threads: int | None) -> bool:
    """Whether ORT's intra-op workers should busy-wait between ops.

    Spinning saves the wake-up latency of ~300 small ops per decode step: SmolLM2-135M int4 at
    2 threads on an idle 2-core machine decodes at ~295 tok/s spinning vs ~215 sleeping. But when
    other processes compete for the cores a spinning worker steals the CPU the op needs: under
    load ~6 it was 45 tok/s spinning vs 72 sleeping. So spin only when, right now, there is an
    idle core for each of our threads (measured over 150 ms at load; the 1-minute load average
    lags and counts our own recent work). EDGE_RAG_ORT_SPIN=0/1 overrides the guess."""
    forced = os.environ.get("EDGE_RAG_ORT_SPIN")
    if forced in ("0", "1"):
        return forced == "1"
    want = threads or os.cpu_count() or 1
    idle = idle_cores()
    if idle is None:
        try:
            idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        except OSError:
            return True
    return idle >= want - 0.3


def session_options(threads: int | None, spin: bool | None = None):
    """intra-op threads (default: all cores), one inter-op thread, every graph optimization."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    spin = should_spin(threads) if spin is None else spin
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or 0)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if os.environ.get("EDGE_RAG_ORT_ARENA") == "0":
        so.enable_cpu_mem_arena = False
    return so


class OrtDecoderSession:
    """DecoderSession over ONNX Runtime. See edge.runtime.session.DecoderSession."""

    def __init__(self, bundle, *, max_batch: int = 1, max_context: int | None = None, threads: int | None = None,
                 providers: Sequence[str] | None = None, prefill_chunk: int = PREFILL_CHUNK, spin: bool | None = None,
                 kv_tokens: int | None = None):
        """kv_tokens: KV budget of the engine on this session (None: the plan's KV bytes from the
        manifest, in this backend's float32 rows)."""
        import onnxruntime as ort

        limit_malloc_caching()
        self.prefill_chunk = int(prefill_chunk)
        if not bundle.has("model.ort.onnx"):
            raise BackendError(f"{bundle.path}: bundle has no model.ort.onnx", fix="rebuild it with `edge-rag build`")
        self.bundle = bundle
        self.spec = spec = bundle.spec
        path = bundle.file("model.ort.onnx")
        try:
            self.sess = ort.InferenceSession(str(path), session_options(threads, spin), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(f"{path}: onnxruntime could not load the graph ({e})", fix="rebuild the bundle with this edge-rag / onnxruntime") from None
        meta = self.sess.get_modelmeta().custom_metadata_map
        warn_if_head_saturates(meta, path)
        graph_ctx = int(meta.get("max_context", spec.max_position))
        want = int(max_context or bundle.limits.max_context)
        if want < 2:
            raise UsageError(f"max_context {want} is too small", fix="use at least 2")
        self.max_context = min(want, graph_ctx, spec.max_position)
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise UsageError(f"max_batch {max_batch} must be >= 1")
        self.vocab_size = spec.vocab_size
        self.threads = threads
        shape = (self.max_batch, spec.n_kv_heads, self.max_context, spec.head_dim)
        # untouched pages stay virtual: only the rows written become resident (see lazy_zeros)
        self.kv_token_bytes = int(spec.kv_bytes_per_token(4.0))  # float32 K and V, all layers
        self.kv_budget_tokens = self._kv_budget(bundle, kv_tokens)
        self.k = [lazy_zeros(shape) for _ in range(spec.n_layers)]
        self.v = [lazy_zeros(shape) for _ in range(spec.n_layers)]
        self._logits = np.zeros((self.max_batch, self.vocab_size), np.float32)
        self._slot: dict[int, int] = {}  # seq_id -> slot
        self._len = np.zeros(self.max_batch, np.int64)  # tokens cached per slot
        self._bindings: dict[tuple[int, int], _Binding] = {}

    # ---- sequences --------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._slot:
            raise UsageError(f"sequence {seq_id} is already live")
        free = sorted(set(range(self.max_batch)) - set(self._slot.values()))
        if not free:
            raise UsageError(f"all {self.max_batch} batch slots are in use", fix="release a finished sequence first or raise max_batch")
        self._slot[seq_id] = free[0]
        self._len[free[0]] = 0

    def release(self, seq_id: int) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self._len[slot] = 0

    def length(self, seq_id: int) -> int:
        return int(self._len[self._slot_of(seq_id)])

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the sequence's tokens from `length` on (their KV rows are overwritten later:
        attention reads only the first seqlens_k + 1 rows)."""
        slot = self._slot_of(seq_id)
        if not 0 <= length <= self._len[slot]:
            raise UsageError(f"cannot truncate sequence {seq_id} of {int(self._len[slot])} tokens to {length}")
        self._len[slot] = length

    def _slot_of(self, seq_id: int) -> int:
        try:
            return self._slot[seq_id]
        except KeyError:
            raise UsageError(f"sequence {seq_id} is not live", fix="call add_sequence first") from None

    # ---- running ---------------------------------------------------------------------
    def _binding(self, start: int, count: int) -> _Binding:
        """Cached IOBinding for slots [start, start+count): past and present share memory."""
        key = (start, count)
        b = self._bindings.get(key)
        if b is not None:
            return b
        import onnxruntime as ort

        io = self.sess.io_binding()
        keep = []
        for i in range(self.spec.n_layers):
            for kind, buf in (("key", self.k[i]), ("value", self.v[i])):
                view = buf[start:start + count]  # contiguous rows of the [B, kv, C, D] buffer
                ov = ort.OrtValue.ortvalue_from_numpy(view)
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                io.bind_ortvalue_output(f"present.{i}.{kind}", ov)
                keep += [view, ov]
        logits = self._logits[start:start + count]
        lov = ort.OrtValue.ortvalue_from_numpy(logits)
        io.bind_ortvalue_output("logits", lov)
        keep.append(lov)
        b = _Binding(io, logits, keep)
        b.step_ids = np.zeros((count, 1), np.int64)
        b.step_seqlens = np.zeros(count, np.int32)
        b.step_total = np.zeros((), np.int32)
        b.step_values = tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in (b.step_ids, b.step_seqlens, b.step_total))
        self._bindings[key] = b
        return b

    def _run(self, start: int, ids: np.ndarray, new_lens: np.ndarray) -> np.ndarray:
        """ids int64 [count, S]; new_lens [count] = cached + S per row. Returns logits [count, V] (a view)."""
        count = ids.shape[0]
        b = self._binding(start, count)
        if ids.shape[1] == 1:  # decode: write into the bound buffers
            b.step_ids[:, 0] = ids[:, 0]
            b.step_seqlens[:] = new_lens - 1
            b.step_total[()] = new_lens.max()
            for name, v in zip(("input_ids", "seqlens_k", "total_sequence_length"), b.step_values):
                b.io.bind_ortvalue_input(name, v)
        else:
            b.io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
            b.io.bind_cpu_input("seqlens_k", (new_lens - 1).astype(np.int32))
            b.io.bind_cpu_input("total_sequence_length", np.array(int(new_lens.max()), dtype=np.int32))
        self.sess.run_with_iobinding(b.io)
        return b.logits

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UsageError(f"token id out of range [0, {self.vocab_size})")
        return ids.astype(np.int64)

    def prefill(self, seq_id: int, token_ids: np.ndarray) -> np.ndarray:
        slot = self._slot_of(seq_id)
        ids = self._check_ids(token_ids).reshape(-1)
        if ids.size == 0:
            raise UsageError("prefill needs at least one token")
        have = int(self._len[slot])
        if have + ids.size > self.max_context:
            raise ContextLengthError(
                f"{have} cached + {ids.size} new tokens exceed the engine's context of {self.max_context}",
                fix="shorten the prompt, ask for truncation, or build the engine with a larger context")
        logits = None
        for s in range(0, ids.size, self.prefill_chunk):
            chunk = ids[s:s + self.prefill_chunk]
            new_len = np.array([self._len[slot] + chunk.size])
            logits = self._run(slot, chunk[None, :], new_len)
            self._len[slot] = new_len[0]
        return logits[0].copy()

    def decode(self, seq_ids: Sequence[int], token_ids: np.ndarray) -> np.ndarray:
        ids = self._check_ids(token_ids).reshape(-1)
        if len(seq_ids) != ids.size:
            raise UsageError(f"{len(seq_ids)} sequences but {ids.size} tokens")
        slots = np.array([self._slot_of(s) for s in seq_ids], dtype=np.int64)
        if len(set(slots.tolist())) != len(slots):
            raise UsageError("a sequence appears twice in one decode step")
        full = [s for s, sl in zip(seq_ids, slots) if self._len[sl] + 1 > self.max_context]
        if full:
            raise ContextLengthError(f"sequence {full[0]} is at the engine's context of {self.max_context} tokens",
                                     fix="stop generating or build the engine with a larger context")
        out = np.empty((len(seq_ids), self.vocab_size), np.float32)
        order = np.argsort(slots, kind="stable")
        # runs of consecutive slots -> one call each
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and slots[order[j + 1]] == slots[order[j]] + 1:
                j += 1
            idx = order[i:j + 1]
            start = int(slots[idx[0]])
            new_lens = self._len[slots[idx]] + 1
            out[idx] = self._run(start, ids[idx][:, None], new_lens)
            self._len[slots[idx]] = new_lens
            i = j + 1
        return out


    # ---- the engine's backend (edge.runtime.session.EngineBackend) ---------------------------
    def _kv_budget(self, bundle, kv_tokens: int | None) -> int:
        """KV tokens the engine may keep resident: the plan's KV bytes (manifest limits: its pool of
        kv_blocks x kv_block_size tokens in kv_dtype) over this backend's float32 bytes per token,
        between one sequence and every slot full."""
        whole = self.max_batch * self.max_context
        if kv_tokens is None:
            lim = bundle.limits
            elem = {"fp32": 4.0, "fp16": 2.0}.get(lim.kv_dtype)
            if elem is None:
                from edge.plan import kv_bytes_per_token

                planned = lim.kv_tokens * kv_bytes_per_token(self.spec, lim.kv_dtype)
            else:
                planned = lim.kv_tokens * int(self.spec.kv_bytes_per_token(elem))
            kv_tokens = planned // self.kv_token_bytes
        return int(max(self.max_context, min(whole, kv_tokens)))

    @property
    def caps(self) -> BackendCaps:
        """Contiguous KV: batch slot r holds a sequence's rows [0, max_context) (GroupQueryAttention
        reads a sequence's past as one run of rows), so the engine gives sequence r the blocks
        r * blocks_per_seq + j. The rows are virtual memory (lazy_zeros) until written; the engine's
        block budget (num_blocks, from the plan's KV bytes) bounds what becomes resident, and
        kv_bytes is that budget in this backend's float32 rows."""
        bps = -(-self.max_context // KV_BLOCK)
        nb = min(self.max_batch * bps, max(bps, self.kv_budget_tokens // KV_BLOCK))
        kv_bytes = nb * KV_BLOCK * self.kv_token_bytes
        return BackendCaps(backend="onnxruntime", num_blocks=nb, block_size=KV_BLOCK, max_seqs=self.max_batch,
                           max_context=self.max_context, vocab_size=self.vocab_size, kv_layout="contiguous",
                           device_sampling=False, mixed_rows=True, greedy_stream=False,
                           prefill_chunk=self.prefill_chunk, mixed_prefill=min(self.prefill_chunk, MIXED_PREFILL),
                           piece_ctx=piece_ctx_of(PIECE_CTX_PER_PARAM, self.spec.layer_linear_params, self.spec.q_size),
                           kv_dtype=str(self.k[0].dtype), kv_bytes=kv_bytes, releases_kv=True)

    def release_kv(self, blocks: list[tuple[int, int]]) -> int:
        """Drop the memory of the cache rows of engine blocks [first, stop), each range within one
        slot, that hold nothing live or findable (BlockManager.released()): a long request's rows
        would otherwise stay resident after it ends. Returns the bytes dropped."""
        dropped = 0
        for first, stop in blocks:
            slot, r0 = self._row_of(first)
            r1 = min(self.max_context, r0 + (stop - first) * KV_BLOCK)
            for buf in (*self.k, *self.v):  # [B, kv, C, D]: one run of rows per head
                for h in range(buf.shape[1]):
                    dropped += drop_pages(buf[slot, h, r0:r1])
        return dropped

    def _row_of(self, block: int) -> tuple[int, int]:
        """(batch slot, first cache row) of an engine block in the contiguous layout."""
        bps = -(-self.max_context // KV_BLOCK)
        return block // bps, (block % bps) * KV_BLOCK

    def execute(self, batch: StepBatch) -> StepOutput:
        """One engine step. Prefix blocks found in another slot are copied first; then rows of
        consecutive slots run as one ORT call when GroupQueryAttention allows it: every decode row
        (each carries its own cached length in seqlens_k), and first prompt pieces of equal length
        (the block-aligned first pieces of prompts that arrive together). Any other prompt piece
        is a call of its own (one new-token count per call; several only without a past)."""
        for src, dst in batch.block_copies.tolist():
            (ss, sr), (ds, dr) = self._row_of(src), self._row_of(dst)
            n = min(KV_BLOCK, self.max_context - sr)
            for buf in (*self.k, *self.v):  # [B, kv, C, D]
                buf[ds, :, dr:dr + n] = buf[ss, :, sr:sr + n]
        r_n = batch.num_rows
        slot = batch.block_tables[:, 0] // (-(-self.max_context // KV_BLOCK))
        qs = batch.query_start
        width = np.diff(qs)

        def call_key(r: int) -> int:  # rows of equal keys in consecutive slots share one call
            if width[r] == 1:
                return 0  # decode rows
            if batch.seq_lens[r] == width[r]:
                return int(width[r])  # first pieces of equal length (nothing cached)
            return -1 - r  # a piece with a past: a call of its own (GroupQueryAttention refuses several)

        key = [call_key(r) for r in range(r_n)]
        order = sorted(range(r_n), key=lambda r: (key[r], slot[r]))
        i = 0
        while i < r_n:  # runs of one key over consecutive slots -> one call each
            j = i
            while j + 1 < r_n and key[order[j + 1]] == key[order[i]] and slot[order[j + 1]] == slot[order[j]] + 1:
                j += 1
            rows = order[i:j + 1]
            w = int(width[rows[0]])
            ids = np.stack([batch.token_ids[qs[r]:qs[r] + w] for r in rows]).astype(np.int64)
            self._run(int(slot[rows[0]]), ids, batch.seq_lens[rows].astype(np.int64))
            i = j + 1
        # Every call wrote its rows' logits into self._logits[slot] (its binding's rows). Rows in
        # consecutive slots (the usual step) are handed over as a view, not copied: 8 rows of
        # SmolLM2 are 1.5 MB, and a fresh np.empty of that size is mmap'ed and page-faulted each
        # step (~1 ms of Python per step at 8 rows). The view is valid until the next execute().
        s0 = int(slot[0]) if r_n else 0
        if r_n and np.array_equal(slot, np.arange(s0, s0 + r_n)):
            out = self._logits[s0:s0 + r_n]
        else:
            out = self._logits[slot]
        return StepOutput(np.full(r_n, -1, np.int32), out)


def warn_if_head_saturates(meta: dict, path) -> str | None:
    """A graph built on a CPU with VNNI uses the u8 x s8 int8 LM head, which saturates on x86
    without VNNI (edge.cpu: relative logit error 0.276 vs 0.018): say so on stderr, with the fix."""
    from edge.cpu import u8s8_exact

    if meta.get("int8_head") != "DynamicQuantizeMatMul" or u8s8_exact():
        return None
    msg = (f"warning: {path} was built for a CPU with VNNI; its int8 output layer loses accuracy on this CPU "
           f"(no VNNI). Rebuild the engine here (`edge-rag build ...`) for exact logits.")
    import sys

    print(msg, file=sys.stderr)
    return msg


def default_threads() -> int:
    """Physical-ish core count for intra-op parallelism (ORT's own default when 0)."""
    return max(1, (os.cpu_count() or 1))
