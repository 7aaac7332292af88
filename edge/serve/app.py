"""The HTTP app (Starlette): OpenAI-compatible routes over the runtime's engines, plus `ask`.

    GET  /health                 {"status": "ok", "generator": id, "embedder": id, "collection": name}
    GET  /v1/models              the generator and the embedder
    POST /v1/chat/completions    {"messages": [...], "max_tokens", "temperature", "top_p", "top_k",
                                  "repetition_penalty", "seed", "stop", "stream"}; the model's chat template
    POST /v1/completions         {"prompt": "...", same sampling fields}; raw text, no template
    POST /v1/embeddings          {"input": "text" | ["text", ...]}
    POST /v1/ask                 {"question", "k", "mode", "max_tokens", "stream"}: retrieval over the
                                  collection, the answer and its numbered sources (`edge-rag ask --json`)
    GET  /metrics                Prometheus text: tokens, queue, KV blocks, memory, temperatures, power

`"stream": true` answers with server-sent events (`data: {...}` lines, then `data: [DONE]`), as
OpenAI's API does; a streamed `ask` sends `{"delta": ...}` events, then `{"answer": {...}}`.
Errors are JSON `{"error": {"message", "type", "code"}}`: 400 for a bad request (the message says
what to change), 401 without the API key, 404 for an unknown route, 413 for a body over the limit,
415 for a body that is not `application/json`, 500 for a failure of ours. Access, size limits and
field checks live in edge.serve.guard (limits defaulted from the plan, set by `edge-rag serve`).

Generation goes through the engine core (edge.runtime.engine): concurrent requests are batched
step by step, nothing holds a lock across a generation; a client that disconnects (streamed or
not) aborts its request, which frees its KV blocks before the next step. Retrieval and the
embedder (SQLite, FAISS, one ORT session) run one at a time under a short lock.
"""

from __future__ import annotations

import json
from contextlib import aclosing
import sys
import threading
import time
import traceback
import uuid
from typing import Any, AsyncIterator

from edge.errors import ContextLengthError, EdgeRagError, IndexError_, UsageError
from edge.serve import guard
from edge.serve.guard import BadRequest, Limits

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
ROLES = ("system", "user", "assistant")
FINISH = {"stop": "stop", "length": "length", "context": "length"}  # GenerationStats -> OpenAI


class _Cancelled(Exception):
    """Raised from a streamed answer's token callback once its client has gone."""


def _error(status: int, message: str, kind: str, code: str | None = None):
    from starlette.responses import JSONResponse

    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a client's lone surrogate, echoed
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _stream_error(e: Exception) -> dict:
    return {"error": {"message": str(e) if isinstance(e, EdgeRagError) else f"{type(e).__name__}: {e}", "type": "server_error"}}


async def _sse(batches: AsyncIterator[list[dict]]) -> AsyncIterator[str]:
    """Server-sent events: the payloads ready at once go out in one write, then [DONE]. Closing
    this stream (a client that left) closes `batches` at once, which stops its producer."""
    async with aclosing(batches):
        async for batch in batches:
            yield "".join(f"data: {json.dumps(p)}\n\n" for p in batch)
    yield "data: [DONE]\n\n"


def _cut(rs) -> bool:
    """The request ended without finishing on its own (aborted: client gone, deadline)."""
    return rs.request.finish_reason in (None, "abort")


def in_thread(fn, *args: Any, **kw: Any):
    """`fn(*args, **kw)` on a thread of its own, awaitable from the event loop. For waits as long
    as a generation: Starlette's shared worker pool (40 threads) must stay free for short work
    (the embedder, retrieval), or 40 slow answers would queue every embeddings request."""
    import asyncio

    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args, **kw), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed (server shutting down)
            pass

    threading.Thread(target=run, daemon=True).start()
    return fut


def _model_id(obj: Any, fallback: str) -> str:
    bundle = getattr(obj, "bundle", None)
    path = getattr(bundle, "path", None)
    return str(getattr(path, "name", "") or getattr(obj, "embedder_id", "") or fallback)


def sampling_params(body: dict, default_max_tokens: int = 256):
    """SamplingParams from an OpenAI-style body (absent fields keep edge-rag's defaults)."""
    from edge.runtime.sampler import SamplingParams

    args = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    args.setdefault("max_tokens", default_max_tokens)
    if isinstance(args.get("stop"), str):
        args["stop"] = [args["stop"]]
    return SamplingParams(**args)  # validates: UsageError names the bad field and the allowed values


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", fix='send [{"role": "user", "content": "..."}]')
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': text}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class ModelsRuntime:
    """The generator and the embedder without a collection, so `serve` works before any ingest:
    chat, completions and embeddings answer; `ask` says to ingest first (restart after ingesting)."""

    def __init__(self, embedder: Any, collection: str, generator: Any):
        self.embedder = embedder
        self.collection = collection
        self.generator = generator

    def search(self, *a: Any, **kw: Any) -> Any:
        from edge.errors import missing_collection

        raise missing_collection(self.collection, ", then restart `edge-rag serve`")

    ask = search


def create_app(runtime: Any, limits: Limits | None = None):
    """The Starlette app over `runtime` (an EdgeRuntime with its generator loaded, or anything with .generator, .embedder,
    .ask(question, k=, mode=, max_tokens=, on_token=) and .collection), behind the Guard with
    `limits` (default: from the generator's plan)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    # retrieval and the embedder (the runtime's own lock, which its ask() takes for retrieval);
    # generation runs on the engine without it
    lock = getattr(runtime, "lock", None) or threading.RLock()
    from edge.serve.metrics import ServeMetrics, metrics_route

    metrics = ServeMetrics(runtime)  # GET /metrics (edge/serve/metrics.py)
    done = object()

    def locked(fn, *a: Any, **kw: Any):
        """Run fn under the retrieval/embedder lock on a worker thread (the event loop stays free)."""
        from starlette.concurrency import run_in_threadpool

        def call():
            with lock:
                return fn(*a, **kw)

        return run_in_threadpool(call)

    limits = limits or Limits.for_generator(runtime.generator)

    def streamed(produce, deadline: float | None = None) -> AsyncIterator[list[Any]]:
        """Items that `produce(emit, cancelled)` emits on its own thread (`ask`: retrieval, then
        the answer), in lists of those ready at once, awaited on the event loop (no worker thread
        per item). A client that disconnects mid-stream, or the request's deadline, leaves a
        producer that stops at its next item (cancelled)."""
        import asyncio

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def cancelled() -> bool:
            return cancel.is_set() or (deadline is not None and time.monotonic() > deadline)

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody reads any more
                cancel.set()

        def work() -> None:
            try:
                produce(emit, cancelled)
            except Exception as e:  # reported in the stream: the 200 has gone out already
                emit(_stream_error(e))
            emit(done)

        async def items() -> AsyncIterator[list[Any]]:
            try:
                while True:
                    batch = [await q.get()]
                    while not q.empty():
                        batch.append(q.get_nowait())
                    end = any(x is done for x in batch)
                    batch = [x for x in batch if x is not done]
                    if batch:
                        yield batch
                    if end:
                        return
            finally:
                cancel.set()

        threading.Thread(target=work, daemon=True).start()
        return items()

    async def until_done_or_gone(request: Request, rs) -> tuple[str, bool]:
        """The whole text of a non-streamed request, and whether it was cut: aborted when the
        client disconnects or the request's deadline passes first."""
        import asyncio

        parts: list[str] = []

        async def collect() -> None:
            async with aclosing(rs.batches(_deadline(request))) as batches:
                async for batch in batches:
                    parts.extend(batch)

        task = asyncio.ensure_future(collect())
        while True:
            finished, _ = await asyncio.wait({task}, timeout=0.25)
            if finished:
                task.result()  # the request's own error, if it failed
                return "".join(parts), _cut(rs) or _expired(request)
            if await request.is_disconnected():
                task.cancel()  # batches() aborts the request: frees its KV blocks at the engine's next step
                await asyncio.gather(task, return_exceptions=True)
                return "".join(parts), True

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        except RecursionError:
            raise BadRequest("the request body nests too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        guard.check_text(body)
        return body

    def guarded(fn):
        """Map our errors to JSON responses: user mistakes 400, everything else 500 (logged)."""

        async def endpoint(request: Request):
            metrics.count(request.url.path)
            try:
                return await fn(request)
            except ContextLengthError as e:
                return _error(400, str(e), "invalid_request_error", "context_length_exceeded")
            except IndexError_ as e:  # no collection yet, or built with another embedder
                return _error(400, str(e), "invalid_request_error", "collection_unavailable")
            except UsageError as e:
                return _error(400, str(e), "invalid_request_error")
            except EdgeRagError as e:
                return _error(500, str(e), "server_error")
            except Exception as e:  # a bug of ours: say so, log the traceback, keep serving
                traceback.print_exc(file=sys.stderr)
                return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

        return endpoint

    async def generate(request: Request, prompt: Any, params, stream: bool, kind: str):
        """Chat (`kind` 'chat', prompt = messages) or text completion; whole or streamed."""
        gen = runtime.generator
        model = _model_id(gen, "generator")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish}

        from edge.runtime.generator import stats_of

        rs = gen.submit(prompt, params)  # a bad prompt raises here: a 400, not a broken stream
        if not stream:
            text, cut = await until_done_or_gone(request, rs)
            st = stats_of(rs.request)
            if rs.request.finish_reason == "error":
                raise rs.request.error
            finish = "length" if cut else FINISH.get(st.finish_reason, "stop")
            c = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if kind == "chat"
                 else {"index": 0, "text": text, "finish_reason": finish})
            usage = {"prompt_tokens": st.n_prompt, "completion_tokens": st.n_generated, "total_tokens": st.n_prompt + st.n_generated}
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": [c], "usage": usage})

        head = {"id": rid, "object": obj + ".chunk" if kind == "chat" else obj, "created": created, "model": model}

        async def chunks():
            """The engine's deltas as OpenAI chunks, every delta of a step in one list (one write)."""
            first = True
            try:
                async with aclosing(rs.batches(_deadline(request))) as batches:
                    async for batch in batches:
                        out = []
                        for piece in batch:
                            out.append(head | {"choices": [choice(piece, None, first)]})
                            first = False
                        yield out
            except Exception as e:  # reported in the stream: the 200 has gone out already
                yield [_stream_error(e)]
            else:
                if not _cut(rs):
                    yield [head | {"choices": [choice(None, FINISH.get(stats_of(rs.request).finish_reason, "stop"), first)]}]

        return StreamingResponse(_sse(chunks()), media_type="text/event-stream")

    async def chat_completions(request: Request):
        body = guard.check_sampling(await body_of(request), limits)
        guard.check_messages(body, limits)
        return await generate(request, chat_messages(body), sampling_params(body), bool(body.get("stream")), "chat")

    async def completions(request: Request):
        body = guard.check_sampling(await body_of(request), limits)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string")
        return await generate(request, prompt, sampling_params(body), bool(body.get("stream")), "text")

    async def embeddings(request: Request):
        body = await body_of(request)
        texts = guard.check_embed_input(body.get("input"), limits)
        emb = runtime.embedder
        vecs, n_tok = await locked(emb.embed_counted, texts)  # usage: the tokens the model read (truncated)
        data = [{"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vecs)]
        if sum(map(len, texts)) > 100_000:
            del vecs
            guard.trim_memory()  # a large batch's buffers go back to the OS
        return JSONResponse({"object": "list", "data": data, "model": _model_id(emb, "embedder"),
                             "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}})

    async def ask(request: Request):
        body = await body_of(request)
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise BadRequest("'question' must be a non-empty string")
        kw = guard.check_ask(body, limits)
        if not body.get("stream"):
            watch = guard.Watch(request)  # the deadline, or a client that gives up, stops generating

            def on_token(t: str) -> None:
                if watch.cancelled():
                    raise _Cancelled

            try:
                ans = await in_thread(runtime.ask, question, on_token=on_token, **kw)  # not a pool worker: see in_thread
            except _Cancelled:
                return _error(408 if watch.expired() else 499, "the request was cancelled (deadline or client gone)",
                              "timeout", "cancelled")
            finally:
                watch.close()
            return JSONResponse(ans.to_dict())
        await locked(runtime.search, question, k=kw["k"], mode=kw["mode"])  # bad k / mode / no collection: a 400 now

        def produce(emit, cancelled) -> None:
            def on_token(t: str) -> None:
                if cancelled():  # the client left: stop generating (the generator frees its sequence)
                    raise _Cancelled
                emit({"delta": t})

            try:
                ans = runtime.ask(question, on_token=on_token, **kw)
            except _Cancelled:
                return
            emit({"answer": ans.to_dict()})

        return StreamingResponse(_sse(streamed(produce, _deadline(request))), media_type="text/event-stream")

    # the runtime is handed over with its generator loaded (edge-rag serve loads it first)
    ids = {"generator": _model_id(runtime.generator, "generator"), "embedder": _model_id(runtime.embedder, "embedder")}

    async def models(request: Request):
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "edge-rag", "kind": k}
                                                        for k, i in ids.items()]})

    async def health(request: Request):
        engine = getattr(runtime.generator, "engine", None)
        return JSONResponse({"status": "ok", **ids, "collection": getattr(runtime, "collection", None),
                             "engine": engine.stats() if engine is not None else None})

    async def not_found(request: Request, exc: Exception):
        return _error(404, f"no route {request.method} {request.url.path}", "invalid_request_error", "not_found")

    async def method_not_allowed(request: Request, exc: Exception):
        return _error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error")

    routes = [
        Route("/health", guarded(health), methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
        Route("/v1/ask", guarded(ask), methods=["POST"]),
        metrics_route(metrics),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed},
                     middleware=[Middleware(guard.Guard, limits=limits)])


def _deadline(request: Any) -> float | None:
    return (request.scope.get("state") or {}).get("deadline")


def _expired(request: Any) -> bool:
    d = _deadline(request)
    return d is not None and time.monotonic() > d
