"""Engine: the loop that serves many requests on one backend (in-flight batching).

    engine = Engine(backend, tokenizer)          # starts its thread
    stream = engine.submit(ids, SamplingParams(max_tokens=64))
    for text in stream: print(text, end="")      # text deltas as tokens are sampled
    stream.request.finish_reason, stream.request.stats
    engine.abort(stream.request_id); engine.close()

One thread owns the scheduler, the KV block manager and the backend:

    inbox (submit / abort, any thread) --> scheduler.schedule() --> StepBatch
      --> backend.execute() --> host sampling of the rows the backend did not sample
      --> scheduler.advance() + commit() --> each request's text to its stream's queue

Async steps (a backend with caps.async_steps, the CUDA one): while step N runs on the device, the
engine thread plans step N+1, launches it behind N (its decode rows take N's sampled ids on the
device: StepBatch.prev_rows), and only then reads N's tokens back and delivers them; so the host's
work per step hides behind the device's. A request that N finishes (EOS, stop string, max_tokens)
has already been launched in N+1: that extra token is dropped, and the output is what the request
gives alone. Steps with host-sampled rows, and one greedy request left alone (run_greedy), run
one at a time.

Any number of threads may submit, iterate and abort at once; closing a stream (or dropping it
mid-iteration) aborts its request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
import queue
import threading
import time
from typing import Iterator

import numpy as np

from edge.errors import BackendError, ContextLengthError, UsageError
from edge.runtime.kv import BlockManager
from edge.runtime.request import Request
from edge.runtime.sampler import SamplingParams, sample
from edge.runtime.scheduler import ScheduledStep, Scheduler
from edge.runtime.step import StepOutput

TOKEN_BUDGET = 256  # tokens per step: decode rows first, prompt pieces in what is left
STREAM_STEPS = 32  # greedy_stream fast path: tokens per hand-off before the inbox is checked

_END = object()


class _Done:
    """The handle of a step that already ran (a backend without async steps)."""

    def __init__(self, out: StepOutput):
        self.out = out

    def result(self) -> StepOutput:
        return self.out


@dataclass
class _Flight:
    step: ScheduledStep
    handle: object  # .result() -> StepOutput


def _set_all(events: list) -> None:
    for ev in events:
        ev.set()


def _wake_loops(woken: dict) -> None:
    """One call_soon_threadsafe per event loop, setting every stream's event it holds."""
    for loop, events in woken.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # that event loop has closed: nobody is listening
            pass


class RequestStream:
    """Text deltas of one request, in order; ends when the request finishes. Iterating from
    one thread at a time (or `async for` over batches() on an event loop); close() (or garbage
    collection mid-way) aborts the request."""

    def __init__(self, engine: "Engine", req: Request):
        self.engine = engine
        self.request = req
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._done = False
        self._notify = None  # (event loop, asyncio.Event), set by batches(): woken after each step's items

    def _push(self, item, woken: dict | None = None) -> None:
        """Engine thread: hand over a text delta (or _END). woken: the step's pending wake-ups
        ({event loop: [events]}, sent by _wake_loops once per loop after the step's deliveries);
        None: wake the consumer now."""
        self._q.put(item)
        notify = self._notify
        if notify is None:
            return
        loop, ready = notify
        if woken is not None:
            woken.setdefault(loop, []).append(ready)
            return
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the consumer's event loop has closed: nobody is listening
            self._notify = None

    @property
    def request_id(self) -> int:
        return self.request.request_id

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        item = self._q.get()
        if item is _END:
            self._done = True
            if self.request.error is not None and self.request.finish_reason == "error":
                raise self.request.error
            raise StopIteration
        return item

    def text(self) -> str:
        """Wait for the whole output."""
        return "".join(self)

    async def batches(self, deadline: float | None = None):
        """For an asyncio consumer (the HTTP server): lists of the text deltas that arrived since
        the last list. The engine wakes the event loop through call_soon_threadsafe, so no thread
        blocks per request and one wake-up carries every token a step produced. Stops early (the
        request aborted) at `deadline` (time.monotonic()) or when the consumer stops iterating
        (a client that disconnected)."""
        import asyncio

        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._notify = (loop, ready)
        # NOTE: one timer for the deadline, not asyncio.wait_for per wake-up (a Task and a timer
        # handle per stream and step): the serving loop thread's CPU per token at 8 streams fell
        # from ~260 to ~170 us (perf samples of `edge-rag serve --backend native`)
        expired = []

        def expire() -> None:
            expired.append(True)
            ready.set()

        timer = loop.call_later(max(0.0, deadline - time.monotonic()), expire) if deadline is not None else None
        try:
            while not self._done:
                if expired or (deadline is not None and time.monotonic() >= deadline):
                    return
                ready.clear()
                out = []
                while True:
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        self._done = True
                        break
                    out.append(item)
                if out:
                    yield out
                if self._done:
                    if self.request.error is not None and self.request.finish_reason == "error":
                        raise self.request.error
                    return
                await ready.wait()
        finally:
            if timer is not None:
                timer.cancel()
            self._notify = None
            self.close()  # no-op once the request ended; else (deadline, consumer gone) abort it

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.engine.abort(self.request_id)

    def __del__(self):  # a dropped stream must not keep its KV blocks
        try:
            if not self._done and not self.request.finished:
                self.engine.abort(self.request_id)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Engine:
    """In-flight batching over one backend (edge.runtime.session.EngineBackend)."""

    def __init__(self, backend, tokenizer=None, *, eos_ids=None, max_seqs: int | None = None,
                 token_budget: int = TOKEN_BUDGET, prefill_chunk: int | None = None, mixed_prefill: int | None = None,
                 prefix_cache: bool = True, overlap: bool = True):
        caps = backend.caps
        self.backend = backend
        self.caps = caps
        self.overlap = overlap and caps.async_steps  # plan and launch step N+1 while step N runs
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids if eos_ids is not None else (tokenizer.eos_token_ids if tokenizer else ()))
        self.max_context = caps.max_context
        max_seqs = min(max_seqs or caps.max_seqs, caps.max_seqs)
        self.kv = BlockManager(caps.num_blocks, caps.block_size, max_context=caps.max_context,
                               layout=caps.kv_layout, max_seqs=max_seqs, prefix_cache=prefix_cache and caps.prefix_cache,
                               movable=caps.copies_blocks, partial=caps.partial_prefix)
        budget = max(token_budget, max_seqs + 1)
        self.scheduler = Scheduler(self.kv, max_seqs=max_seqs, token_budget=budget,
                                   prefill_chunk=prefill_chunk or caps.prefill_chunk or budget,
                                   mixed_prefill=mixed_prefill or caps.mixed_prefill or None, piece_ctx=caps.piece_ctx,
                                   piece_align=caps.piece_align,
                                   device_sampling=caps.device_sampling)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[str, object]] = []
        self._streams: dict[int, RequestStream] = {}
        self._closed = False
        self.steps = 0
        self.tokens_out = 0
        self.busy_s = 0.0
        self._counts = {"waiting": 0, "running": 0, "kv_blocks_used": 0}
        self._thread = threading.Thread(target=self._loop, name="edge-rag-engine", daemon=True)
        self._thread.start()

    # ---- any thread -------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, *, detokenize: bool = True,
               truncated: int = 0) -> RequestStream:
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise UsageError("the prompt is empty", fix="give some text")
        if len(ids) >= self.max_context:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens but the engine's context is {self.max_context} tokens (prompt + output)",
                fix="shorten the prompt, ask for truncation, or build the engine with a larger context")
        vocab = self.caps.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise UsageError(f"token id out of range [0, {vocab})")
        req = Request(next(self._ids), ids, params, self.eos_ids, self.max_context,
                      self.tokenizer.detokenizer() if detokenize and self.tokenizer else None)
        req.stats.truncated = truncated
        stream = RequestStream(self, req)
        with self._wake:
            if self._closed:
                raise BackendError("the engine is closed")
            self._streams[req.request_id] = stream
            self._inbox.append(("add", req))
            self._wake.notify()
        return stream

    def abort(self, request_id: int) -> None:
        with self._wake:
            self._inbox.append(("abort", request_id))
            self._wake.notify()

    def stats(self) -> dict:
        """Counters for /health and /metrics (a snapshot taken after the last step)."""
        c = dict(self._counts)
        return {**c, "kv_blocks_total": self.kv.num_blocks, "kv_block_size": self.kv.block_size,
                "max_seqs": self.scheduler.max_seqs, "steps": self.steps, "tokens_generated": self.tokens_out,
                "prefix_cache_hit_rate": round(self.kv.hits / self.kv.queries, 4) if self.kv.queries else 0.0,
                "busy_s": round(self.busy_s, 3)}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        sch = self.scheduler
        flight: _Flight | None = None  # a launched step whose tokens are not read back yet (async steps)
        while True:
            with self._wake:
                while not self._inbox and not sch.has_work and not self._closed and flight is None:
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                closed = self._closed
            for kind, arg in inbox:
                if kind == "add":
                    sch.add(arg)  # type: ignore[arg-type]
                else:
                    req = sch.abort(arg)  # type: ignore[arg-type]
                    if req is not None:
                        self._end(req)
            if closed:
                if flight is not None:
                    try:
                        flight.handle.result()  # nothing may still write the KV pool when the engine ends
                    except Exception:  # noqa: BLE001 - its requests end as aborted below
                        pass
                for req in list(sch.running) + list(sch.waiting):
                    sch.abort(req.request_id)
                    self._end(req)
                return
            if flight is None and not sch.has_work:
                self._release_kv()
                self._count()
                continue
            t0 = time.perf_counter()
            try:
                if flight is None:
                    step = sch.schedule()
                    if step is None:  # running requests waiting on the budget: never expected; do not spin
                        time.sleep(0.001)
                    elif self._greedy_stream_ok(step):
                        self._run_greedy_stream(step)
                    else:
                        flight = self._launch(step)
                else:
                    # async steps: plan and queue step N+1 while step N runs on the device, then read
                    # N's tokens back. N+1 takes N's sampled ids on the device (StepBatch.prev_rows);
                    # a request that N finishes has run once more in N+1, whose token is dropped.
                    nxt = sch.schedule(overlapped=True) if self._overlap_ok() else None
                    handle = self.backend.launch(nxt.batch) if nxt is not None else None
                    done, flight = flight, None
                    self._collect(done)
                    if nxt is not None:
                        sch.advance(nxt)
                        flight = _Flight(nxt, handle)
                if flight is not None and not self._overlappable(flight.step):
                    done, flight = flight, None
                    self._collect(done)
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the engine
                flight = None
                self._fail_all(e)
            self.busy_s += time.perf_counter() - t0
            self._reap_errors()
            self._count()
            if flight is None and not sch.has_work:
                self._release_kv()

    def _launch(self, step: ScheduledStep) -> "_Flight":
        """Start the step (async backends: queue it; others: run it) and advance the scheduler."""
        if self.caps.async_steps:
            handle = self.backend.launch(step.batch)
        else:
            handle = _Done(self.backend.execute(step.batch))
        self.scheduler.advance(step)
        return _Flight(step, handle)

    def _overlappable(self, step: ScheduledStep) -> bool:
        """Can the next step be launched before this one's tokens are read back? Only when every
        row that samples does so on the device (a host-sampled row's token exists only after its
        logits come back)."""
        return self.overlap and not step.batch.host_sample.any()

    def _overlap_ok(self) -> bool:
        """Plan the next step now? Not when one greedy request will be left alone: the backend's
        host-free stream (run_greedy) serves it faster, once the running step is read back."""
        sch = self.scheduler
        if not sch.running:
            return False
        alone = len(sch.running) == 1 and not sch.waiting and not self._inbox
        return not (alone and self.caps.greedy_stream and sch.running[0].params.greedy and not sch.running[0].host_sampled)

    def _collect(self, flight: "_Flight") -> None:
        """Wait for a launched step, sample the host-sampled rows, commit, deliver."""
        step = flight.step
        b = step.batch
        out = flight.handle.result()
        self.steps += 1
        sampled: list[int | None] = []
        dev = self.caps.device_sampling
        for r, (req, _) in enumerate(step.rows):
            if not b.logits_rows[r]:
                sampled.append(None)
            elif dev and not b.host_sample[r] and out.sampled[r] >= 0:
                sampled.append(int(out.sampled[r]))
            elif req.finished:  # aborted while the step ran: nothing to sample
                sampled.append(None)
            else:
                seen = req.seen()
                sampled.append(sample(out.logits[r], req.params, req.sampler.rng, np.asarray(seen) if seen else None))
        emitted, done = self.scheduler.commit(step, sampled)
        self._deliver(emitted, done)

    def _release_kv(self) -> None:
        """When idle: hand the backend the KV rows of free regions that hold nothing findable.
        NOTE: not between busy steps: madvise costs ~15 us per call here (180 per region on
        SmolLM2) and the rows are written again soon; measured 3-5% fewer tokens/s at 8 streams."""
        if self.caps.releases_kv:
            dead = self.kv.released()
            if dead:
                self.backend.release_kv(dead)

    def _run(self, step: ScheduledStep) -> None:
        """One step, start to end (no step left running)."""
        self._collect(self._launch(step))

    def _deliver(self, emitted, done) -> None:
        """Hand each stream its text and end the finished ones; then one wake-up per consumer
        event loop for the whole step. NOTE: not one per token: each call_soon_threadsafe writes
        the loop's self-pipe (a syscall that releases the GIL to the woken loop thread mid-step);
        at 8 streams that was 8 writes and GIL hand-offs a step (measured in the engine thread)."""
        woken: dict = {}
        for req, text in emitted:
            self.tokens_out += 1
            s = self._streams.get(req.request_id)
            if s is not None and text:
                s._push(text, woken)
        for req in done:
            self._end(req, woken)
        _wake_loops(woken)

    def _end(self, req: Request, woken: dict | None = None) -> None:
        self._count()  # before the stream ends: a client that reads /health right after sees it gone
        s = self._streams.pop(req.request_id, None)
        if s is not None:
            s._push(_END, woken)

    def _fail_all(self, e: Exception) -> None:
        sch = self.scheduler
        for req in list(sch.running):
            sch.abort(req.request_id)
            req.finish_reason, req.error = "error", e
            self._end(req)

    def _reap_errors(self) -> None:
        """Requests the scheduler finished on its own (one that can never fit the KV pool)."""
        failed, self.scheduler.failed = self.scheduler.failed, []
        for req in failed:
            self._end(req)

    def _count(self) -> None:
        sch = self.scheduler
        self._counts = {"waiting": len(sch.waiting), "running": len(sch.running), "kv_blocks_used": self.kv.num_used}

    # ---- the backend's host-free greedy stream (cuda) ----------------------------------------------
    def _greedy_stream_ok(self, step: ScheduledStep) -> bool:
        if not self.caps.greedy_stream or len(step.rows) != 1 or self.scheduler.waiting or self._inbox:
            return False
        req, n = step.rows[0]
        return n == 1 and req.num_computed + 1 == req.num_tokens and req.params.greedy and not req.host_sampled

    def _run_greedy_stream(self, step: ScheduledStep) -> None:
        """One greedy request alone in decode: let the backend run up to STREAM_STEPS steps on the
        device without the host in the loop; hand back as soon as anything else arrives."""
        req, _ = step.rows[0]
        rid = req.request_id
        room = min(STREAM_STEPS, req.params.max_tokens - req.stats.n_generated, self.max_context - req.num_tokens)
        if room <= 1 or not self.kv.grow(rid, req.num_computed + room):
            self._run(step)
            return
        batch = self.scheduler._batch([(req, 1)])  # slots of every stream step are reserved now
        # the block copies this step's schedule() planned (kv.copies() hands them out once): a
        # sequence moved down by compaction must be copied before the stream reads it
        batch.block_copies = step.batch.block_copies
        tokens = self.backend.run_greedy(batch, room)
        done = []
        try:
            for tok in tokens:
                self.steps += 1
                req.num_computed += 1
                text = req.append(int(tok))
                self._deliver([(req, text)], [])
                if req.finish_reason or self._inbox:
                    break
        finally:
            tokens.close()
        self.kv.truncate(rid, req.num_computed)
        self.kv.cache_full_blocks(rid, req.block_hashes(self.kv.block_size), req.num_computed)
        if req.finish_reason:
            self.scheduler.running.remove(req)
            self.scheduler._finish(req, req.finish_reason)
            done.append(req)
        self._deliver([], done)
