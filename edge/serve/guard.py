"""What stands between the network and the engines: access, size limits and request validation.

    client --Guard (ASGI)--> [401 no/wrong key] [415 not JSON] [413 body too big] --> app routes
                               sets scope["state"]["deadline"] (monotonic seconds)
    route  --check_*-->      [400 naming the field] --> engines

`Limits` are defaulted from the generator bundle's plan (its context caps `max_tokens`) and
overridden by `edge-rag serve` options. The Guard is pure ASGI (no BaseHTTPMiddleware) so that
streamed responses pass through untouched, and it adds no CORS headers: a web page in the user's
browser cannot read answers, and cannot post either (a cross-site form or `no-cors` fetch can only
send `text/plain`, `multipart/form-data` or `application/x-www-form-urlencoded`, all refused here).
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import ipaddress
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from edge.errors import UsageError

ENV_API_KEY = "EDGE_RAG_API_KEY"


class BadRequest(UsageError):
    """A request the API cannot take (400)."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits of the HTTP API. `max_tokens` caps what a request may ask to generate
    (larger asks are cut to it, as the context would); the others are refused with 400/413."""

    max_body_bytes: int = 1 << 20  # 1 MiB: a long chat history is ~100 KB
    max_tokens: int = 4096  # generator context (from the plan) unless configured lower
    default_max_tokens: int = 256
    max_embed_inputs: int = 256
    max_embed_chars: int = 16_384  # per input (the embedder truncates to its max_seq_length anyway)
    max_messages: int = 256
    max_k: int = 50  # /v1/ask passages
    deadline_s: float = 300.0  # a request stops generating after this long (finish_reason "length")
    api_key: str | None = None

    @classmethod
    def for_generator(cls, generator: Any, **overrides: Any) -> "Limits":
        """Limits defaulted from the generator's plan (its context) with `overrides` applied
        (None values keep the default)."""
        ctx = getattr(generator, "max_context", None)
        base = {"max_tokens": int(ctx)} if isinstance(ctx, int) and ctx > 0 else {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        lim = cls(**base)
        lim.check()
        return lim

    def check(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "default_max_tokens", "max_embed_inputs", "max_embed_chars",
                     "max_messages", "max_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"serve limit {name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.deadline_s, (int, float)) and self.deadline_s > 0):
            raise UsageError(f"serve limit deadline_s must be > 0 seconds, got {self.deadline_s!r}")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable() or " " in self.api_key):
            raise UsageError("the API key must be printable text without spaces", fix="e.g. `openssl rand -hex 16`")


# --------------------------------------------------------------------------- binding


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; anything else (0.0.0.0, a LAN address, a name) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Refuse a non-loopback address without an API key unless `insecure`; returns a warning to
    print (or None)."""
    if is_loopback(host):
        return None
    if api_key:
        return f"listening on {host}: every client on the network must send `Authorization: Bearer <key>`"
    if not insecure:
        raise UsageError(f"--host {host} exposes the engines to the network without authentication",
                         fix=f"set --api-key KEY (or ${ENV_API_KEY}), or pass --insecure to allow it anyway")
    return f"WARNING: listening on {host} with no API key (--insecure): anyone who can reach this port can use it"


# --------------------------------------------------------------------------- the ASGI guard


def _error_body(status: int, message: str, kind: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


async def _respond(send, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _error_body(status, message, kind, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: Bearer auth, `Content-Type: application/json` on POST, a body size limit
    (by Content-Length before reading, and while reading for chunked bodies), and a per-request
    deadline in `scope["state"]["deadline"]`."""

    def __init__(self, app: Callable, limits: Limits):
        self.app = app
        self.limits = limits
        self._key = limits.api_key.encode() if limits.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        if self._key is not None:
            got = headers.get(b"authorization", b"")
            if not got:
                return await _respond(send, 401, "missing API key: send `Authorization: Bearer <key>`",
                                      code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
            scheme, _, token = got.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return await _respond(send, 401, "wrong API key", code="invalid_api_key",
                                      headers=[(b"www-authenticate", b"Bearer")])
        state = scope.setdefault("state", {})
        state["deadline"] = time.monotonic() + self.limits.deadline_s
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)

        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            shown = ctype.decode("latin-1") or "none"
            return await _respond(send, 415, f"Content-Type must be application/json (got {shown}; "
                                  f"with curl: -H 'Content-Type: application/json')",
                                  code="unsupported_media_type")
        limit = self.limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await _respond(send, 400, "invalid Content-Length header")
            if int(declared) > limit:
                return await _respond(send, 413, f"request body of {int(declared)} bytes exceeds the limit of "
                                      f"{limit} bytes (edge-rag serve --max-body)", code="request_too_large")
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > limit:
                return await _respond(send, 413, f"request body exceeds the limit of {limit} bytes "
                                      f"(edge-rag serve --max-body)", code="request_too_large")
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the client's disconnect, whenever it comes

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------- cancellation


class Watch:
    """Cancellation for work that runs on a worker thread: the request's deadline passed, or its
    client disconnected (an asyncio task waits for `http.disconnect`). `cancelled()` is thread-safe."""

    def __init__(self, request: Any):
        self.deadline = (getattr(request, "scope", {}).get("state") or {}).get("deadline")
        self.gone = threading.Event()
        self._task: asyncio.Task | None = None
        receive = getattr(request, "receive", None)
        if receive is not None:
            async def wait_disconnect() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        self.gone.set()
                        return

            self._task = asyncio.get_running_loop().create_task(wait_disconnect())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def cancelled(self) -> bool:
        return self.gone.is_set() or self.expired()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


# --------------------------------------------------------------------------- validation


# NOTE: a body nesting deeper than this is refused: nothing the API takes nests past 4 levels, and a walk (or a
# json.dumps in an error message) over thousands of levels hits Python's recursion limit. Python 3.12's json parser
# takes 5,000 levels that 3.11's refuses, so without the limit the same body was a 400 on one and a 500 on the other.
MAX_NESTING = 32


def _walk_strings(value: Any, where: str):
    """(path, string) of every string and key in `value`, depth first; a BadRequest past MAX_NESTING levels.
    Iterative: its depth is the body's, not Python's stack."""
    stack = [(where, value, 0)]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, str):
            yield where, value
            continue
        if depth >= MAX_NESTING and isinstance(value, (dict, list)) and value:
            raise BadRequest(f"the request body nests more than {MAX_NESTING} levels deep", fix="send a flatter body")
        if isinstance(value, dict):
            for k, v in reversed(value.items()):
                path = f"{where}.{k}" if where else str(k)
                stack.append((path, v, depth + 1))
                stack.append((path, k, depth + 1))
        elif isinstance(value, list):
            for i in range(len(value) - 1, -1, -1):
                stack.append((f"{where}[{i}]", value[i], depth + 1))


def check_text(body: dict) -> None:
    """Every string of the body encodes as UTF-8: a lone surrogate (`"\\ud800"`, valid JSON but not
    text) is refused with the field it is in."""
    for where, s in _walk_strings(body, ""):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            where = where.encode("utf-8", "backslashreplace").decode("utf-8")
            raise BadRequest(f"'{where}' holds a lone surrogate (\\ud800-\\udfff), which is not text",
                             fix="send valid UTF-8 text") from None


def _int(body: dict, name: str, default: int, lo: int, hi: int | None = None) -> int:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise BadRequest(f"'{name}' must be an integer {rng}, got {json.dumps(v)[:40]}")
    return v


def check_sampling(body: dict, limits: Limits) -> dict:
    """The sampling fields of an OpenAI-style body with their types checked (SamplingParams checks
    the ranges) and `max_tokens` cut to the server's limit. Returns a copy of the body."""
    body = dict(body)
    mt = body.get("max_tokens")
    if mt is None and body.get("max_completion_tokens") is not None:  # newer OpenAI clients
        mt = body["max_completion_tokens"]
    if mt is not None:
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise BadRequest(f"'max_tokens' must be an integer >= 1, got {json.dumps(mt)[:40]}")
        body["max_tokens"] = min(mt, limits.max_tokens)
    else:
        body["max_tokens"] = min(limits.default_max_tokens, limits.max_tokens)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s and len(s) <= 256 for s in stop):
            raise BadRequest("'stop' must be a string or a list of at most 16 non-empty strings (<= 256 chars each)")
        body["stop"] = stop
    for name in ("temperature", "top_p", "repetition_penalty"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise BadRequest(f"'{name}' must be a number, got {json.dumps(v)[:40]}")
    for name in ("top_k", "seed"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2 ** 63):
            raise BadRequest(f"'{name}' must be an integer from 0 to 2^63-1, got {json.dumps(v)[:40]}")
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("'n' must be 1 (one choice per request)")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be true or false")
    return body


def check_messages(body: dict, limits: Limits) -> None:
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > limits.max_messages:
        raise BadRequest(f"'messages' holds {len(msgs)} messages, the limit is {limits.max_messages}")


def check_embed_input(texts: Any, limits: Limits) -> list[str]:
    """`input` of /v1/embeddings: a non-empty string or list of them, within the limits."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise BadRequest("'input' must be a non-empty string or a list of them",
                         fix="token-id inputs are not supported: send text")
    if len(texts) > limits.max_embed_inputs:
        raise BadRequest(f"'input' holds {len(texts)} texts, the limit is {limits.max_embed_inputs}",
                         fix="split the request (edge-rag serve --max-embed-inputs)")
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    if len(texts[longest]) > limits.max_embed_chars:
        raise BadRequest(f"input[{longest}] has {len(texts[longest])} characters, the limit is {limits.max_embed_chars}",
                         fix="split the text (edge-rag serve --max-embed-chars)")
    return texts


def check_ask(body: dict, limits: Limits) -> dict:
    """{'k', 'mode', 'max_tokens'} for /v1/ask, checked (max_tokens cut to the limit)."""
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be true or false")
    mode = body.get("mode", "hybrid")
    if not isinstance(mode, str):
        raise BadRequest("'mode' must be one of hybrid, vector, keyword")
    k = _int(body, "k", 5, 1, limits.max_k)
    mt = _int(body, "max_tokens", limits.default_max_tokens, 1)
    return {"k": k, "mode": mode, "max_tokens": min(mt, limits.max_tokens)}


# --------------------------------------------------------------------------- memory


def trim_memory() -> None:
    """Give freed heap pages back to the OS (glibc malloc_trim) after a large request; a no-op
    where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
