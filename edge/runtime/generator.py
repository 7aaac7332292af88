"""Generator: prompt -> streamed text, over any DecoderSession (onnxruntime, cuda).

    gen = Generator.from_bundle("engines/gen")
    for delta in gen.stream([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64)):
        print(delta, end="", flush=True)
    gen.stats  # ttft_s, prefill / decode tokens per second, n_prompt, n_generated

A str prompt is raw text (no template); a list of messages goes through the model's chat
template. Generation ends at an EOS token, a stop string (not included in the output),
max_tokens, or the engine's context.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edge.errors import BackendError, ContextLengthError
from edge.runtime.sampler import Sampler, SamplingParams
from edge.runtime.tokenizer import Tokenizer

BACKENDS = ("auto", "onnxruntime", "cuda", "tensorrt")


@dataclass
class GenerationStats:
    """Timings of the last call. decode_tok_s counts the tokens after the first."""

    n_prompt: int = 0
    n_generated: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or stop string), "length" (max_tokens), "context"
    truncated: int = 0  # prompt tokens dropped from the front
    cached_tokens: int = 0  # prompt tokens reused from the previous call's KV cache (not prefilled)

    @property
    def prefill_tok_s(self) -> float:
        return (self.n_prompt - self.cached_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.n_generated - 1) / self.decode_s if self.decode_s > 0 and self.n_generated > 1 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


def open_session(bundle, backend: str = "auto", *, max_batch: int = 1, max_context: int | None = None, threads: int | None = None):
    """The DecoderSession for `backend` ("auto": cuda when edge.runtime.cuda says a GPU is usable)."""
    backend = resolve_backend(backend)
    if backend == "cuda":
        try:
            from edge.runtime.cuda.session import CudaDecoderSession
        except ImportError as e:
            raise BackendError(f"the cuda backend is not available ({e})", fix="pip install 'edge-rag[cuda]' on a machine with an NVIDIA GPU, or use --backend onnxruntime") from None
        return CudaDecoderSession(bundle, max_batch=max_batch, max_context=max_context)
    if backend == "tensorrt":  # untested here: see edge/runtime/trt_session.py
        from edge.runtime.trt_session import TrtDecoderSession

        return TrtDecoderSession(bundle, max_batch=max_batch, max_context=max_context)
    from edge.runtime.ort_session import OrtDecoderSession

    return OrtDecoderSession(bundle, max_batch=max_batch, max_context=max_context, threads=threads)


# What each backend reads from a bundle (besides the tokenizer files): all it needs to verify.
BACKEND_ARTIFACTS = {
    "onnxruntime": ("model.ort.onnx",),
    "cuda": ("weights.safetensors",),
    "tensorrt": ("model.trt.onnx",),
}
TOKENIZER_ARTIFACTS = ("tokenizer.json", "tokenizer_config.json")


def resolve_backend(backend: str) -> str:
    """'auto' -> cuda when edge.runtime.cuda says a GPU is usable, else onnxruntime."""
    from edge.errors import UsageError

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", fix=f"choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cuda" if _cuda_available() else "onnxruntime"
    return backend


def _cuda_available() -> bool:
    try:
        from edge.runtime import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.available())
    except Exception:  # noqa: BLE001 - a broken driver means "not available", not a crash
        return False


class Generator:
    """Tokenizer + DecoderSession + sampler. One sequence at a time (the scheduler batches)."""

    def __init__(self, session, tokenizer: Tokenizer, bundle=None):
        self.session = session
        self.tokenizer = tokenizer
        self.bundle = bundle
        self.stats = GenerationStats()
        self._seq = 0
        # The last call's sequence, kept live with its prompt's ids, so the next prompt that starts
        # the same way (a chat's history, a fixed system prompt, a repeated question) prefills
        # only what is new, as llama.cpp's server does. Only whole prefill chunks are reused
        # (the session's prefill_chunk, aligned to position 0): the reused rows and every row
        # computed after them are then the same computation as a fresh prefill, so greedy output
        # does not depend on what was asked before (int8-activation kernels give slightly
        # different numbers for a token computed alone or in a chunk). Sessions without
        # prefill_chunk / truncate (cuda, tensorrt) start every call afresh.
        self._cache: tuple[int, list[int]] | None = None
        self.reuse_prefix = True

    @classmethod
    def from_bundle(cls, path: str | Path, *, backend: str = "auto", threads: int | None = None, max_context: int | None = None) -> "Generator":
        from edge.build.bundle import Bundle

        backend = resolve_backend(backend)
        bundle = Bundle.open(path, kind="generator", verify=False)
        bundle.verify(BACKEND_ARTIFACTS[backend] + TOKENIZER_ARTIFACTS)
        session = open_session(bundle, backend, max_batch=1, max_context=max_context, threads=threads)
        return cls(session, Tokenizer.from_bundle(bundle), bundle)

    @property
    def max_context(self) -> int:
        return int(self.session.max_context)

    # ---- prompt ------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[dict], params: SamplingParams, *, truncate: bool = False) -> tuple[list[int], int]:
        """Token ids of the prompt (chat template for messages) and how many were truncated."""
        ids = self.tokenizer.encode_chat(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if not ids:
            from edge.errors import UsageError

            raise UsageError("the prompt is empty", fix="give some text")
        limit = self.max_context - 1  # room for at least one new token
        if len(ids) <= limit:
            return ids, 0
        if not truncate:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens but the engine's context is {self.max_context} tokens (prompt + output)",
                fix="shorten the prompt, pass --truncate (truncate=True) to keep its end, or build the engine with a larger context")
        keep = max(1, self.max_context - min(params.max_tokens, self.max_context // 2))
        return ids[-keep:], len(ids) - keep

    # ---- generation -----------------------------------------------------------------------------
    def stream(self, prompt: str | list[dict], params: SamplingParams | None = None, *, truncate: bool = False) -> Iterator[str]:
        """Text deltas as tokens are generated; stats in `self.stats` when the iterator ends."""
        params = params or SamplingParams()
        ids, dropped = self.prompt_ids(prompt, params, truncate=truncate)
        st = self.stats = GenerationStats(n_prompt=len(ids), truncated=dropped)
        sampler = Sampler(params)
        detok = self.tokenizer.detokenizer()
        stops = StopMatcher(params.stop)
        eos = set(self.tokenizer.eos_token_ids)
        seen = list(ids)
        seq, reused = self._open_sequence(ids)
        st.cached_tokens = reused
        keep = False
        tokens = None
        try:
            t0 = time.perf_counter()
            t_first = None
            st.finish_reason = "context"  # unless a stop, eos or max_tokens ends it first
            tokens = self._tokens(seq, ids[reused:], params, sampler, seen)
            for tok in tokens:
                if t_first is None:
                    t_first = time.perf_counter()
                    st.ttft_s = t_first - t0
                if tok in eos:
                    st.finish_reason = "stop"
                    break
                st.n_generated += 1
                seen.append(tok)
                text, hit = stops.feed(detok.push(tok))
                if text:
                    yield text
                if hit:
                    st.finish_reason = "stop"
                    break
                if st.n_generated >= params.max_tokens:
                    st.finish_reason = "length"
                    break
            tokens.close()  # a pipelined stream rolls back the step it had queued ahead
            keep = True
            st.decode_s = time.perf_counter() - t_first
            if st.finish_reason != "stop" or not stops.hit:
                tail, _ = stops.feed(detok.flush())
                tail += stops.flush()
                if tail:
                    yield tail
        finally:
            if tokens is not None:
                tokens.close()  # (again) before the sequence is kept or freed: a device stream rolls back first
            if keep and self._reusable():
                self._cache = (seq, list(ids))  # rows [0, len(ids)) came from prefill
            else:
                self.session.release(seq)

    def _reusable(self) -> bool:
        return self.reuse_prefix and hasattr(self.session, "truncate") and int(getattr(self.session, "prefill_chunk", 0) or 0) > 0

    def _open_sequence(self, ids: list[int]) -> tuple[int, int]:
        """A live sequence for `ids` and how many of its first tokens are already cached (the
        longest prefix shared with the last call's cache, leaving at least one to prefill)."""
        if self._cache is not None:
            seq, cached = self._cache
            self._cache = None
            n = 0
            limit = min(len(cached), len(ids) - 1)
            while n < limit and cached[n] == ids[n]:
                n += 1
            chunk = int(self.session.prefill_chunk)
            n -= n % chunk  # whole prefill chunks only (see __init__)
            if n > 0:
                self.session.truncate(seq, n)
                return seq, n
            self.session.release(seq)
        seq = self._seq = self._seq + 1
        self.session.add_sequence(seq)
        return seq, 0

    def reset(self) -> None:
        """Drop the cached prefix (frees its KV space)."""
        if self._cache is not None:
            self.session.release(self._cache[0])
            self._cache = None

    def _tokens(self, seq: int, ids: list[int], params: SamplingParams, sampler: Sampler, seen: list[int]) -> Iterator[int]:
        """Sampled token ids until the context is full (the caller stops on eos / stop / length).

        On a session that samples on the device (cuda): greedy without a repetition penalty runs
        as session.greedy_stream (argmax on the GPU, steps queued ahead); temperature / top-p
        without top-k or a penalty uses session.decode_sample. Either way only token ids cross to
        the host. Otherwise: float32 logits to the host sampler after every step."""
        prompt = np.asarray(ids, dtype=np.int64)
        if params.greedy and params.repetition_penalty == 1.0 and hasattr(self.session, "greedy_stream"):
            t0 = time.perf_counter()
            tok = int(self.session.prefill_greedy(seq, prompt))
            self.stats.prefill_s = time.perf_counter() - t0
            yield tok
            room = self.max_context - self.session.length(seq)
            yield from self.session.greedy_stream(seq, tok, min(params.max_tokens - 1, room))
            return
        t0 = time.perf_counter()
        logits = self.session.prefill(seq, prompt)
        self.stats.prefill_s = time.perf_counter() - t0
        # temperature / top-p without top-k or a penalty: sampled on the device (cuda), with one
        # uniform per step from this sampler's seeded RNG; the first token from the prefill logits
        on_device = (not params.greedy and params.top_k == 0 and params.repetition_penalty == 1.0
                     and hasattr(self.session, "decode_sample"))
        tok = sampler(logits, np.asarray(seen) if params.repetition_penalty != 1.0 else None)
        while True:
            yield tok
            if self.session.length(seq) >= self.max_context:
                return
            if on_device:
                u = sampler.rng.random(1, dtype=np.float32)
                tok = int(self.session.decode_sample([seq], np.array([tok]), temperature=params.temperature, top_p=params.top_p, u=u)[0])
                continue
            logits = self.session.decode([seq], np.array([tok], dtype=np.int64))[0]
            tok = sampler(logits, np.asarray(seen) if params.repetition_penalty != 1.0 else None)

    def generate(self, prompt: str | list[dict], params: SamplingParams | None = None, *, truncate: bool = False) -> str:
        """The whole completion as one string."""
        return "".join(self.stream(prompt, params, truncate=truncate))

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, truncate: bool = False) -> str:
        """The assistant's reply to `messages` (rendered with the model's chat template)."""
        return self.generate(list(messages), params, truncate=truncate)


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
