"""Scheduler: which requests compute how many tokens in the next step (pure Python, no backend).

Each step has a token budget. Running requests go first, oldest first: a decoding request takes
one token, one still in its prompt takes its next prompt piece. Waiting requests are then admitted
first come, first served while budget, sequence slots and KV blocks last; an admitted request first
takes what the prefix cache already holds. When a running request's next token finds no free KV
block, the newest running request is preempted: its blocks are freed (full ones stay in the prefix
cache) and it goes back to the front of the queue, to be recomputed from its tokens so far.

Prompt pieces: at most `prefill_chunk` tokens. While other requests decode in the same step, all
prompt pieces of the step share `mixed_prefill` tokens, and a piece with a long past gets fewer
(mixed_piece: a prompt token's attention grows with the tokens before it), so a long prompt
arriving costs each decoding request a bounded delay per token instead of a whole chunk's. Every
piece but a prompt's last ends on a multiple of `align` (the KV block size, or finer when pieces
are smaller), so where a prompt is cut depends little on what else runs.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge.runtime.kv import BlockManager
from edge.runtime.request import Request, Status
from edge.runtime.step import F32, I32, StepBatch


@dataclass
class ScheduledStep:
    rows: list[tuple[Request, int]]  # (request, tokens computed this step), in batch row order
    batch: StepBatch
    preempted: list[Request] = field(default_factory=list)


PIECE_ALIGN = 8  # smallest mixed piece, and the cut points' granularity when pieces shrink with their past


def piece_ctx_of(per_param: float, layer_linear_params: int, q_size: int) -> int:
    """BackendCaps.piece_ctx of a model: the past at which a prompt token's attention (~ past x q_size a layer)
    costs as much as its weights (~ the layer's linear params), scaled by a backend's measured `per_param`
    (its attention's speed against its linears')."""
    return int(per_param * layer_linear_params / q_size)


def mixed_piece(past: int, mixed: int, piece_ctx: int, align: int) -> int:
    """Prompt tokens for a piece after `past` cached tokens while others decode: about the cost of
    `mixed` tokens at context 0, when a token costs (1 + past / piece_ctx) of one there."""
    if piece_ctx <= 0:
        return mixed
    n = int(mixed * piece_ctx / (piece_ctx + past))
    return max(align, n - n % align)


def prompt_piece(req: Request, budget: int, chunk: int, align: int) -> int:
    """Tokens of the request's not-yet-computed known tokens to run now: at most `chunk` and
    `budget`, ending on a multiple of `align` unless it reaches the last known token (0 = wait)."""
    c = req.num_computed
    left = req.num_tokens - c
    if left == 1:  # a decode row
        return 1 if budget >= 1 else 0
    piece = min(left, chunk, budget)
    if piece < left:
        piece -= (c + piece) % align
    return max(piece, 0)


class Scheduler:
    def __init__(self, kv: BlockManager, *, max_seqs: int, token_budget: int, prefill_chunk: int,
                 mixed_prefill: int | None = None, piece_ctx: int = 0, piece_align: int = 0, device_sampling: bool = False):
        if token_budget < max_seqs + 1 or prefill_chunk < 1:
            raise ValueError("token_budget must exceed max_seqs and prefill_chunk be >= 1")
        self.kv = kv
        self.device_sampling = device_sampling  # draw each sampled row's uniform for the backend
        self.max_seqs = max_seqs
        self.token_budget = token_budget
        self.prefill_chunk = min(prefill_chunk, token_budget - max_seqs + 1)
        self.mixed_prefill = min(mixed_prefill or self.prefill_chunk, self.prefill_chunk)
        self.piece_ctx = piece_ctx
        # cut points on KV block boundaries (a prefix hit starts on one), or finer when a piece is smaller
        self.align = math.gcd(kv.block_size, self.mixed_prefill, self.prefill_chunk, (piece_align or PIECE_ALIGN) if piece_ctx else 0)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.failed: list[Request] = []  # finished here with an error (never fit); the engine ends their streams

    # ---- queue ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def abort(self, request_id: int) -> Request | None:
        """Remove a request wherever it is; its KV blocks are freed. None if unknown/finished."""
        for q in (self.running, self.waiting):
            for req in q:
                if req.request_id == request_id:
                    q.remove(req)
                    self._finish(req, "abort")
                    return req
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self, *, overlapped: bool = False) -> ScheduledStep | None:
        """The next step. overlapped: built while the previous step still runs (engine.py's async
        steps): no preemption (a request whose next token finds no KV block makes this return None,
        and the engine waits for the running step and schedules again)."""
        self.kv.compact()  # contiguous KV: live sequences in neighbouring regions (one call per step)
        budget = self.token_budget
        rows: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        decoding = any(r.num_tokens - r.num_computed == 1 for r in self.running)
        mixed_left = self.mixed_prefill if decoding else None  # prompt tokens left to this step's pieces

        def chunk_for(req: Request) -> int:
            if mixed_left is None:
                return self.prefill_chunk
            return min(mixed_left, mixed_piece(req.num_computed, self.mixed_prefill, self.piece_ctx, self.align))

        for req in list(self.running):
            if req not in self.running:  # preempted by an earlier row of this step
                continue
            n = prompt_piece(req, budget - (len(self.running) - len(rows) - 1), chunk_for(req), self.align)
            if n == 0:
                continue
            while not self.kv.grow(req.request_id, req.num_computed + n):
                if overlapped:
                    return None
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req in self.running:
                rows.append((req, n))
                budget -= n
                if mixed_left is not None and req.num_tokens - req.num_computed > 1:
                    mixed_left -= n
        while self.waiting and not preempted and len(self.running) < self.max_seqs and budget > 0:
            req = self.waiting[0]
            hit = self.kv.admit(req.request_id, req.block_hashes(self.kv.block_size), req.num_tokens,
                                req.tokens(0, req.num_tokens) if self.kv.partial else None)
            if hit is None:
                break
            req.num_computed = hit
            chunk = chunk_for(req) if mixed_left is not None or not rows else min(chunk_for(req), self.mixed_prefill)
            n = prompt_piece(req, budget, chunk, self.align)
            if n == 0 or not self.kv.grow(req.request_id, req.num_computed + n):
                self.kv.free(req.request_id)
                req.num_computed = 0
                if not self.running and n > 0:  # alone and still no room: it can never run
                    self.waiting.popleft()
                    self.failed.append(req)
                    self._finish(req, "error", MemoryError(
                        f"request needs more KV blocks than the engine has ({self.kv.num_blocks} of {self.kv.block_size} tokens)"))
                    continue
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.stats.cached_tokens = hit
            req.stats.first_scheduled = req.stats.first_scheduled or time.perf_counter()
            self.running.append(req)
            rows.append((req, n))
            budget -= n
            if mixed_left is not None:
                mixed_left -= n
        if not rows:
            return None
        return ScheduledStep(rows, self._batch(rows), preempted)

    def _preempt(self, req: Request) -> None:
        """Free the request's blocks and requeue it at the front (recompute later)."""
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.stats.preemptions += 1
        self.waiting.appendleft(req)

    def update(self, step: ScheduledStep, sampled: list[int | None]) -> tuple[list[tuple[Request, str]], list[Request]]:
        """advance() then commit(): the step ran and these are its sampled tokens."""
        self.advance(step)
        return self.commit(step, sampled)

    def advance(self, step: ScheduledStep) -> None:
        """The step's K/V as written (once it is launched): computed counts; each row that samples
        gets its token pending (Request.pending_row), so the next step can be planned before the
        token is known."""
        bs = self.kv.block_size
        for r, (req, n) in enumerate(step.rows):
            if req.finished:  # aborted, or finished by the step before (async steps: one step late)
                continue
            req.num_computed += n
            if req.num_computed % bs < n:  # a block filled up: findable by the next prompts
                self.kv.cache_full_blocks(req.request_id, req.block_hashes(bs), req.num_computed,
                                          req.tokens(0, req.num_computed) if self.kv.partial else None)
            if req.num_computed == req.num_tokens:  # the row's last known token ran: it samples
                req.pending_row = r

    def commit(self, step: ScheduledStep, sampled: list[int | None]) -> tuple[list[tuple[Request, str]], list[Request]]:
        """The advanced step's sampled tokens. Returns (request, text released) for each request
        that got a token, and the requests that finished. A request that finished in an earlier
        step (async steps ran it once more) or was aborted gets nothing."""
        out, done = [], []
        for r, ((req, _), tok) in enumerate(zip(step.rows, sampled)):
            if req.pending_row != r:  # a prompt piece that is not the last, or a finished request
                continue
            req.pending_row = -1
            if req.finished or tok is None:
                continue
            out.append((req, req.append(int(tok))))
            if req.finish_reason:
                self.running.remove(req)
                self._finish(req, req.finish_reason)
                done.append(req)
        return out, done

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        if req.request_id in self.kv:  # an aborted request's output is not kept findable (kv.free)
            self.kv.free(req.request_id, keep_tokens=len(req.prompt_ids) if reason == "abort" else None)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.stats.finished = time.perf_counter()

    # ---- the flat batch -------------------------------------------------------------------------
    def _batch(self, rows: list[tuple[Request, int]]) -> StepBatch:
        """The flat StepBatch of `rows` (block tables as wide as the longest row needs). Built
        from Python lists converted once per field: per-element numpy writes cost more than the
        step on a GPU at 64 rows."""
        bs = self.kv.block_size
        r = len(rows)
        tables = [self.kv.blocks_of(req.request_id) for req, _ in rows]
        ids, pos, slots, qs, lens = [], [], [], [0], []
        logits, temp, top_p, top_k, host, u = [], [], [], [], [], []
        prev = []
        for (req, n), table in zip(rows, tables):
            c = req.num_computed
            prev.append(req.pending_row)  # >= 0: the row's token is the previous step's, on the device
            if n == 1:
                ids.append(req.token(c))
                pos.append(c)
                slots.append(table[c // bs] * bs + c % bs)
            else:
                ids += req.tokens(c, c + n)
                pos += range(c, c + n)
                slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            qs.append(len(ids))
            lens.append(c + n)
            last = c + n == req.num_tokens
            sp = req.params
            hs = last and req.host_sampled
            logits.append(last)
            temp.append(sp.temperature if last else 0.0)
            top_p.append(sp.top_p if last else 1.0)
            top_k.append(sp.top_k if last else 0)
            host.append(hs)
            u.append(req.uniform() if last and self.device_sampling and not hs else 0.0)
        nb = [len(tb) for tb in tables]
        bt = np.full((r, max(nb)), -1, I32)
        bt[np.arange(bt.shape[1]) < np.asarray(nb)[:, None]] = list(itertools.chain.from_iterable(tables))
        copies = np.asarray(self.kv.copies(), I32).reshape(-1, 2)
        a = np.asarray
        prev_rows = a(prev, I32) if max(prev) >= 0 else np.zeros(0, I32)
        return StepBatch(bs, a(ids, I32), a(pos, I32), a(slots, I32), a(qs, I32), a(lens, I32), bt, a(logits, I32),
                         a(temp, F32), a(top_p, F32), a(top_k, I32), a(u, F32), a(host, I32), copies, prev_rows)
