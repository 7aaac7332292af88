"""Request: one generation's state inside the engine (tokens, sampling, text, stats, status).

The scheduler reads `num_tokens`, `num_computed` and `block_hashes`; the engine calls
`append(token)` with each sampled id, which runs the detokenizer and the stop strings and
decides whether the request is finished. Nothing here touches a backend.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field

from edge.runtime.kv import block_hashes
from edge.runtime.sampler import Sampler, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestStats:
    """Times are time.perf_counter() values; derived figures are properties."""

    arrival: float = 0.0
    first_scheduled: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    n_prompt: int = 0
    n_generated: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at (last) admission
    preemptions: int = 0
    truncated: int = 0  # prompt tokens dropped from the front before submission

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.arrival if self.first_token else 0.0

    @property
    def queue_s(self) -> float:
        return self.first_scheduled - self.arrival if self.first_scheduled else 0.0

    @property
    def prefill_s(self) -> float:
        return self.first_token - self.first_scheduled if self.first_token else 0.0

    @property
    def decode_s(self) -> float:
        return self.finished - self.first_token if self.finished and self.first_token else 0.0


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return delta, False
        self.pending += delta
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(eq=False)  # identity: the scheduler's `in` / remove() must not compare every field
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int] = frozenset()
    max_context: int = 1 << 30
    detok: object | None = None  # IncrementalDetokenizer (None: no text, token ids only)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "context" | "abort" | "error"
    error: BaseException | None = None
    stats: RequestStats = field(default_factory=RequestStats)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self.stops = StopMatcher(self.params.stop)
        self.stats.n_prompt = len(self.prompt_ids)
        self.stats.arrival = self.stats.arrival or time.perf_counter()
        self._hashes: list[int] = []
        self._seen: set[int] | None = set(self.prompt_ids) if self.params.repetition_penalty != 1.0 else None
        # NOTE: async steps (engine.py): the row of the launched step whose sampled id is this request's
        # next token, not yet read back (-1: none). That token counts in num_tokens (the scheduler plans
        # the next step around it) and reads as -1 in token(); commit() with the id clears it.
        self.pending_row = -1

    # ---- what the scheduler reads --------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + (self.pending_row >= 0)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        if i < n:
            return self.prompt_ids[i]
        return self.output_ids[i - n] if i - n < len(self.output_ids) else -1  # -1: the pending id

    def tokens(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:  # decode rows: no copy of the prompt
            return self.output_ids[start - n:stop - n]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]

    def block_hashes(self, block_size: int) -> list[int]:
        """Hashes of the full blocks of prompt + output (extended incrementally)."""
        if len(self._hashes) < (len(self.prompt_ids) + len(self.output_ids)) // block_size:
            self._hashes = block_hashes(self.prompt_ids + self.output_ids, block_size, self._hashes)
        return self._hashes

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def host_sampled(self) -> bool:
        """Needs the logits on the host (a repetition penalty or top-k: the device samplers do
        greedy and temperature / top-p)."""
        return self.params.repetition_penalty != 1.0 or (not self.params.greedy and self.params.top_k > 0)

    def seen(self) -> list[int] | None:
        return sorted(self._seen) if self._seen is not None else None

    def uniform(self) -> float:
        """One draw from the request's own RNG for a device-side sampler (same stream as the
        host sampler's, so a seeded request gives the same tokens alone or batched)."""
        return float(self.sampler.rng.random(dtype="float32")) if not self.params.greedy else 0.0

    # ---- what the engine calls -----------------------------------------------------------
    def append(self, tok: int) -> str:
        """Take one sampled token; returns the text it releases. Sets finish_reason when the
        request is done (EOS, a stop string, max_tokens, the context)."""
        now = time.perf_counter()
        if not self.stats.first_token:
            self.stats.first_token = now
        if tok in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush(stop_hit=False)
        self.output_ids.append(tok)
        self.stats.n_generated += 1
        if self._seen is not None:
            self._seen.add(tok)
        text = self.detok.push(tok) if self.detok is not None else ""
        text, hit = self.stops.feed(text)
        if hit:
            self.finish_reason = "stop"
            return text
        if self.stats.n_generated >= self.params.max_tokens:
            self.finish_reason = "length"
        elif self.num_tokens >= self.max_context:
            self.finish_reason = "context"
        if self.finish_reason:
            text += self._flush(stop_hit=False)
        return text

    def _flush(self, stop_hit: bool) -> str:
        if self.detok is None or stop_hit:
            return ""
        tail, _ = self.stops.feed(self.detok.flush())
        return tail + self.stops.flush()

    def to_dict(self) -> dict:
        st = self.stats
        return {**asdict(st), "ttft_s": st.ttft_s, "queue_s": st.queue_s, "prefill_s": st.prefill_s,
                "decode_s": st.decode_s, "finish_reason": self.finish_reason}
