"""The Python side of the C ABI (include/edge_rag.h): what libedgerag.so calls, with plain values.

Every entry point returns `(status, message, value)`: status is an er_status code (STATUS below),
message one line for er_last_error(), value only plain Python (str, int, float, list, dict), so
the C side converts and never classifies exceptions itself.

Thread safety. The C API lets several threads call one runtime at once. Generation goes through
the engine core (edge.runtime.engine, via Generator.submit): concurrent calls are batched there,
each with its own request, stats and stream. The retriever's SQLite/FAISS/embedder are not shared
across threads: searches and embeddings take the runtime's retrieval lock (as EdgeRuntime does),
so one call's retrieval overlaps others' generation. er_cancel() sets the call's flag and aborts
its engine request, so it stops at once even while it waits in the engine's queue.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from edge.errors import (BackendError, BundleError, ContextLengthError, EdgeRagError, IndexError_, ModelError,
                         PlanError, ProfileError, UsageError)

# er_status (include/edge_rag.h)
OK, INVALID_ARGUMENT, NOT_FOUND, NO_COLLECTION, CONTEXT_LENGTH, CANCELLED, BACKEND, PYTHON, INTERNAL = range(9)
LOCK_POLL_S = 0.05  # how often a call waiting for the retrieval lock checks er_cancel()


class Cancelled(EdgeRagError):
    """The caller cancelled the call (token callback returned non-zero, or er_cancel)."""


class NotInFlight(EdgeRagError):
    """er_cancel() named a request id that no call is running with."""


# exception class -> er_status (the first match along the class's MRO)
STATUS = {ContextLengthError: CONTEXT_LENGTH, UsageError: INVALID_ARGUMENT, ProfileError: INVALID_ARGUMENT,
          PlanError: INVALID_ARGUMENT, BundleError: NOT_FOUND, ModelError: NOT_FOUND, IndexError_: NO_COLLECTION,
          BackendError: BACKEND, NotInFlight: NOT_FOUND}


def _status(e: BaseException) -> tuple[int, str]:
    if isinstance(e, Cancelled):
        return CANCELLED, str(e)
    for cls in type(e).__mro__:
        if cls in STATUS:
            return STATUS[cls], str(e)
    if isinstance(e, EdgeRagError):
        return INTERNAL, str(e)
    return INTERNAL, f"internal error: {type(e).__name__}: {e}"


def guarded(fn: Callable[..., Any]) -> Callable[..., tuple[int, str, Any]]:
    def call(*a: Any, **kw: Any) -> tuple[int, str, Any]:
        try:
            return OK, "", fn(*a, **kw)
        except BaseException as e:  # noqa: BLE001 - nothing may unwind into C
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                return INTERNAL, f"interrupted ({type(e).__name__})", None
            return (*_status(e), None)

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def _acquire(lock: threading.Lock, cancel: "Call") -> None:
    while not lock.acquire(timeout=LOCK_POLL_S):
        if cancel.is_set():
            raise Cancelled("cancelled while waiting for the engines")
    if cancel.is_set():
        lock.release()
        raise Cancelled("cancelled")


class Runtime:
    """One er_runtime: the embedder and a collection's index (loaded at open), the generator
    (loaded at open or at the first generation), the locks that serialize them, and the calls
    in flight by request id."""

    def __init__(self, generator_bundle: str | None, embedder_bundle: str | None, collection: str,
                 backend: str, threads: int | None, load_generator: bool):
        from edge.cli.rag_cmd import _embedder  # the one rule for "which embedder": --embedder, the collection's, the default
        from edge.errors import missing_collection
        from edge.paths import collection_exists
        from rag.retrieve import Retriever

        if generator_bundle is not None:  # a wrong path fails at open, not at the first ask
            from edge.bundle import Bundle

            Bundle.open(generator_bundle, kind="generator", verify=False)
        if not collection_exists(collection):
            raise missing_collection(collection)
        self.collection = collection
        self.backend = backend
        self.threads = threads
        self._generator_path = generator_bundle
        self._generator = None
        self.embedder, self.embedder_path = _embedder(Path(embedder_bundle) if embedder_bundle else None, collection)
        self.retriever = Retriever(self.embedder, collection)
        self.retrieval_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._inflight: dict[int, Call] = {}
        self._inflight_lock = threading.Lock()
        if load_generator:
            self.generator()

    # -- parts
    def generator(self):
        with self._load_lock:
            if self._generator is None:
                from edge.runtime.generator import Generator

                path = self._generator_path
                if path is None:
                    from edge.engines import default_generator_bundle

                    path = default_generator_bundle(progress=False)
                self._generator = Generator.from_bundle(path, backend=self.backend, threads=self.threads)
        return self._generator

    # -- calls in flight
    def begin(self, request_id: int) -> "Call":
        call = Call()
        if request_id:
            with self._inflight_lock:
                if request_id in self._inflight:
                    raise UsageError(f"request id {request_id} is already in flight", fix="use a new id per call")
                self._inflight[request_id] = call
        return call

    def end(self, request_id: int) -> None:
        if request_id:
            with self._inflight_lock:
                self._inflight.pop(request_id, None)

    def cancel(self, request_id: int) -> None:
        with self._inflight_lock:
            call = self._inflight.get(request_id)
        if call is None:
            raise NotInFlight(f"no call with request id {request_id} is in flight")
        call.cancel()

    def close(self) -> None:
        with self.retrieval_lock:
            self.retriever.close()
        with self._load_lock:
            if self._generator is not None:
                self._generator.close()  # stops the engine's thread
                self._generator = None


class Call:
    """One C call in flight: its cancel flag and, once generating, its engine stream."""

    def __init__(self):
        self._flag = threading.Event()
        self._lock = threading.Lock()
        self._stream = None

    def is_set(self) -> bool:
        return self._flag.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._flag.set()
            stream = self._stream
        if stream is not None:
            stream.close()  # aborts the engine request: its stream ends at once, its KV blocks are freed

    def attach(self, stream) -> None:
        with self._lock:
            self._stream = stream
            cancelled = self._flag.is_set()
        if cancelled:
            stream.close()


class _SerialRetriever:
    """rag.ask's retriever: searches under the runtime's retrieval lock."""

    def __init__(self, rt: Runtime, call: Call):
        self.rt, self.call = rt, call

    def search(self, query: str, **kw: Any):
        _acquire(self.rt.retrieval_lock, self.call)
        try:
            return self.rt.retriever.search(query, **kw)
        finally:
            self.rt.retrieval_lock.release()


class _CallGenerator:
    """One call's view of the shared generator: its own engine request (Generator.submit), so its
    own stats; stops at the next token once cancelled (er_cancel also aborts the request)."""

    def __init__(self, rt: Runtime, call: Call):
        self.gen = rt.generator()
        self.call = call
        self.bundle = self.gen.bundle  # rag.ask picks the model's answer recipe from it
        self.tokenizer = self.gen.tokenizer
        self.max_context = self.gen.max_context
        self.stats = None

    def stream(self, prompt: Any, params: Any = None, **kw: Any) -> Iterator[str]:
        from edge.runtime.generator import stats_of

        if self.call.is_set():
            raise Cancelled("cancelled")
        rs = self.gen.submit(prompt, params, **kw)
        self.call.attach(rs)
        try:
            for piece in rs:
                if self.call.is_set():
                    break
                yield piece
        finally:
            rs.close()
            self.stats = stats_of(rs.request)
        if self.call.is_set():
            raise Cancelled("cancelled")


def _on_token(emit: Callable[[str], Any] | None, call: Call) -> Callable[[str], None] | None:
    """The C callback returns True to cancel: the call stops before its next token."""
    if emit is None:
        return None

    def on_token(piece: str) -> None:
        if emit(piece):
            call.cancel()

    return on_token


# ---- entry points (called from edge/capi/edge_rag.c) ------------------------------------------

@guarded
def open_runtime(generator_bundle: str | None, embedder_bundle: str | None, collection: str | None,
                 backend: str | None, threads: int, load_generator: int, home: str | None) -> Runtime:
    if home:
        import os

        os.environ["EDGE_RAG_HOME"] = home
    if threads < 0:
        raise UsageError(f"invalid threads {threads}", fix="use 0 (all cores) or a positive count")
    return Runtime(generator_bundle, embedder_bundle, collection or "default", backend or "auto",
                   threads or None, bool(load_generator))


@guarded
def ask(rt: Runtime, question: str, k: int, mode: str | None, max_tokens: int, request_id: int,
        emit: Callable[[str], Any] | None) -> tuple[dict, str]:
    """The answer as a dict (rag.ask.Answer) and as the JSON `edge-rag ask --json` prints."""
    import json

    from rag.ask import ask as rag_ask

    if not question.strip():
        raise UsageError("the question is empty", fix="give a question")
    if k < 0 or max_tokens < 0:
        raise UsageError(f"invalid k {k} / max_tokens {max_tokens}", fix="use 0 (the default) or a positive number")
    call = rt.begin(request_id)
    try:
        retriever = _SerialRetriever(rt, call)
        ans = rag_ask(question, retriever, lambda: _CallGenerator(rt, call), k=k or 5, mode=mode or "hybrid",
                      max_tokens=max_tokens or 256, on_token=_on_token(emit, call))
        if call.is_set():  # cancelled after the last token
            raise Cancelled("cancelled")
        d = ans.to_dict()
        return d, json.dumps(d, default=str)
    finally:
        rt.end(request_id)


@guarded
def search(rt: Runtime, query: str, k: int, mode: str | None) -> dict:
    if not query.strip():
        raise UsageError("the query is empty", fix="give some text")
    if k < 0:
        raise UsageError(f"invalid k {k}", fix="use 0 (the default, 5) or a positive number")
    r = _SerialRetriever(rt, Call()).search(query, k=k or 5, mode=mode or "hybrid")
    return {"relevant": bool(r.relevant), "hits": [h.to_dict() for h in r.hits]}


@guarded
def embedding_dim(rt: Runtime) -> int:
    return int(rt.embedder.dim)


@guarded
def embed(rt: Runtime, texts: list[str]) -> bytes:
    """Row-major float32 bytes, n * dim."""
    import numpy as np

    with rt.retrieval_lock:
        vecs = rt.embedder.embed(texts)
    return np.ascontiguousarray(vecs, dtype=np.float32).tobytes()


def _sampling(max_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int):
    from edge.runtime.sampler import SamplingParams

    return SamplingParams(max_tokens=max_tokens or 256, temperature=temperature, top_p=top_p or 1.0, top_k=top_k,
                          repetition_penalty=repetition_penalty or 1.0, seed=None if seed < 0 else seed)


@guarded
def generate(rt: Runtime, prompt: str | list[dict], max_tokens: int, temperature: float, top_p: float, top_k: int,
             repetition_penalty: float, seed: int, request_id: int, emit: Callable[[str], Any] | None) -> dict:
    """Raw completion (prompt a str) or chat (a list of {role, content})."""
    if isinstance(prompt, list):
        for i, m in enumerate(prompt):
            if m["role"] not in ("system", "user", "assistant"):
                raise UsageError(f"messages[{i}].role {m['role']!r} is not system, user or assistant")
    params = _sampling(max_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    call = rt.begin(request_id)
    try:
        gen = _CallGenerator(rt, call)
        on_token = _on_token(emit, call)
        parts = []
        for piece in gen.stream(prompt, params):
            parts.append(piece)
            if on_token:
                on_token(piece)
        st = gen.stats
        return {"text": "".join(parts), "finish": st.finish_reason, "n_prompt_tokens": st.n_prompt,
                "n_tokens": st.n_generated}
    finally:
        rt.end(request_id)


@guarded
def cancel(rt: Runtime, request_id: int) -> None:
    rt.cancel(request_id)


@guarded
def close(rt: Runtime) -> None:
    rt.close()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("edge-rag")
    except PackageNotFoundError:
        return "0+unknown"
