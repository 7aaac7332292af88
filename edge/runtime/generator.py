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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from edge.errors import BackendError, ContextLengthError
from edge.runtime.cuda import available as _cuda_available  # imports no cupy; never raises
from edge.runtime.sampler import SamplingParams
from edge.runtime.tokenizer import Tokenizer
from edge.textsafe import say

BACKENDS = ("auto", "onnxruntime", "native", "cuda", "tensorrt")


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
    """The DecoderSession for `backend` ("auto": resolve_backend's pick for this bundle; a native
    backend that `auto` picked but cannot build here falls back to onnxruntime, said on stderr)."""
    picked = resolve_backend(backend, bundle)
    if picked == "cuda":
        try:
            from edge.runtime.cuda import open_session as open_cuda_session
        except ImportError as e:
            raise BackendError(f"the cuda backend is not available ({e})", fix="pip install 'edge-rag[cuda]' on a machine with an NVIDIA GPU, or use --backend onnxruntime") from None
        return open_cuda_session(bundle, max_batch=max_batch, max_context=max_context)  # fp32 compute for an fp32 bundle
    if picked == "native":  # edge-rag's own CPU step (edge.runtime.cpu); compiled with cc at first use
        from edge.runtime.cpu.backend import NativeBackend

        try:
            return NativeBackend(bundle, max_batch=max_batch, max_context=max_context, threads=threads)
        except BackendError as e:
            if backend != "auto":
                raise
            say(f"the native CPU backend cannot run here ({e.args[0] if e.args else e}); using onnxruntime")
            bundle.verify(BACKEND_ARTIFACTS["onnxruntime"])  # what the fallback reads (native verified less)
    if picked == "tensorrt":  # untested here: see edge/runtime/trt_session.py
        from edge.runtime.seq_backend import SequenceBackend
        from edge.runtime.trt_session import TrtDecoderSession

        return SequenceBackend(TrtDecoderSession(bundle, max_batch=max_batch, max_context=max_context))
    from edge.runtime.ort_session import OrtDecoderSession

    return OrtDecoderSession(bundle, max_batch=max_batch, max_context=max_context, threads=threads)


# What each backend reads from a bundle (besides the tokenizer files): all it needs to verify.
BACKEND_ARTIFACTS = {
    "onnxruntime": ("model.ort.onnx", "weights.safetensors"),  # the graph reads the weights as external data
    "cuda": ("weights.safetensors",),
    "native": ("weights.safetensors",),
    "tensorrt": ("model.trt.onnx",),
}
TOKENIZER_ARTIFACTS = ("tokenizer.json", "tokenizer_config.json")


def resolve_backend(backend: str, bundle=None) -> str:
    """'auto' -> cuda when edge.runtime.cuda says a GPU is usable; else, for a generator bundle, native
    where edge.runtime.cpu.backend.auto_refusal finds nothing against it (an int4 / int8 llama-family
    bundle, an x86 CPU with AVX2, a C compiler); else onnxruntime. Without a bundle: cuda or onnxruntime."""
    from edge.errors import UsageError

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", fix=f"choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if _cuda_available():
            return "cuda"
        if bundle is not None:
            from edge.runtime.cpu.backend import auto_refusal

            if auto_refusal(bundle) is None:
                return "native"
        return "onnxruntime"
    return backend


class Generator:
    """Tokenizer + an Engine over one backend: a one-request client of the engine core.

    Any number of threads may call stream() / submit() at once: their requests are batched by
    the engine (edge.runtime.engine). `stats` is the last finished call's (per-call figures are
    on each RequestStream's request)."""

    def __init__(self, session, tokenizer: Tokenizer, bundle=None, *, prefix_cache: bool = True):
        from edge.runtime.engine import Engine

        self.session = session  # the engine's backend (edge.runtime.session.EngineBackend)
        self.tokenizer = tokenizer
        self.bundle = bundle
        self.stats = GenerationStats()
        self.engine = Engine(session, tokenizer, eos_ids=tokenizer.eos_token_ids, prefix_cache=prefix_cache)

    @classmethod
    def from_bundle(cls, path: str | Path, *, backend: str = "auto", threads: int | None = None,
                    max_context: int | None = None, max_batch: int | None = None) -> "Generator":
        from edge.bundle import Bundle

        bundle = Bundle.open(path, kind="generator", verify=False)
        bundle.verify(BACKEND_ARTIFACTS[resolve_backend(backend, bundle)] + TOKENIZER_ARTIFACTS)
        batch = int(max_batch or bundle.limits.max_batch)
        session = open_session(bundle, backend, max_batch=batch, max_context=max_context, threads=threads)
        return cls(session, Tokenizer.from_bundle(bundle), bundle)

    @property
    def max_context(self) -> int:
        return int(self.engine.max_context)

    @property
    def reuse_prefix(self) -> bool:
        return self.engine.kv.prefix_cache

    @reuse_prefix.setter
    def reuse_prefix(self, on: bool) -> None:
        self.engine.kv.prefix_cache = bool(on)

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
    def submit(self, prompt: str | list[dict], params: SamplingParams | None = None, *, truncate: bool = False):
        """Queue the prompt on the engine; returns its RequestStream (text deltas; the request's
        stats and finish_reason on `.request`; close() aborts it)."""
        params = params or SamplingParams()
        ids, dropped = self.prompt_ids(prompt, params, truncate=truncate)
        return self.engine.submit(ids, params, truncated=dropped)

    def stream(self, prompt: str | list[dict], params: SamplingParams | None = None, *, truncate: bool = False) -> Iterator[str]:
        """Text deltas as tokens are generated; stats in `self.stats` when the iterator ends.
        Leaving the loop early aborts the request (its KV blocks are freed)."""
        rs = self.submit(prompt, params, truncate=truncate)
        try:
            yield from rs
        finally:
            rs.close()
            self.stats = stats_of(rs.request)

    def generate(self, prompt: str | list[dict], params: SamplingParams | None = None, *, truncate: bool = False) -> str:
        """The whole completion as one string."""
        return "".join(self.stream(prompt, params, truncate=truncate))

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, truncate: bool = False) -> str:
        """The assistant's reply to `messages` (rendered with the model's chat template)."""
        return self.generate(list(messages), params, truncate=truncate)

    def reset(self) -> None:
        """Kept for callers of the one-sequence cache; the engine's prefix cache needs no reset."""

    def close(self) -> None:
        self.engine.close()

    def __del__(self):
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def stats_of(req) -> GenerationStats:
    """GenerationStats of a finished engine request."""
    st = req.stats
    reason = req.finish_reason if req.finish_reason in ("stop", "length", "context") else (req.finish_reason or "")
    return GenerationStats(n_prompt=st.n_prompt, n_generated=st.n_generated, ttft_s=st.ttft_s, prefill_s=st.prefill_s,
                           decode_s=st.decode_s, finish_reason=reason, truncated=st.truncated, cached_tokens=st.cached_tokens)


from edge.runtime.request import StopMatcher  # noqa: E402,F401  (re-export: its home is the request)
