"""The MQTT bridge: questions in on `<prefix>/ask`, streamed answers out (`edge-rag mqtt`).

    request   topic <prefix>/ask, JSON {"question": str, "k": int, "max_tokens": int, "mode": str, "id": str}
              (only "question" is required). MQTT 5: set the Response Topic and Correlation Data
              properties; without a response topic, give "id" and read <prefix>/answer/<id>.
    replies   on the response topic, each carrying the request's correlation data, in order:
              {"type": "token", "id", "seq": 0, 1, ..., "text": delta}   as the answer streams
              {"type": "answer", "id", "answer": {...}}                  `edge-rag ask --json`'s answer
              or {"type": "error", "id", "error": {"message", "code"}}  a bad payload or a failed answer
    status    <prefix>/status, retained: {"state": "online"} while connected, {"state": "offline"}
              (the broker's will) when the bridge is gone.

A request with neither a response topic nor an id (so nowhere to answer) is reported on
<prefix>/error. Questions are answered by `workers` threads at once; the runtime batches their
generation in its engine. A full backlog (`max_pending`) is answered with an error, not queued.
The client reconnects by itself (1 s, doubling to 30 s) and subscribes again on every connect,
so a broker restart costs the questions sent while it was down, nothing else.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from edge.errors import EdgeRagError, IndexError_, UsageError

log = logging.getLogger("edge.mqtt")

MODES = ("hybrid", "vector", "keyword")
MAX_ID_LEN = 128


@dataclass
class TlsOptions:
    """TLS to the broker: `cafile` None uses the system's CAs; certfile/keyfile for client certs;
    `insecure` skips the host-name check (self-signed brokers on a robot's LAN)."""

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False


@dataclass
class Request:
    question: str
    k: int
    max_tokens: int
    mode: str
    id: str


class BadPayload(UsageError):
    """A request the bridge cannot take; answered on the response topic, never raised further."""


def parse_request(payload: bytes) -> Request:
    """Validate a request payload; BadPayload names the field and the fix."""
    try:
        body = json.loads(payload.decode("utf-8"))
    except RecursionError:  # json nesting past the parser's limit (1,000s of levels): a payload, not a crash of the loop
        raise BadPayload("the payload nests too deeply", fix='send {"question": "..."}') from None
    except (UnicodeDecodeError, ValueError):
        raise BadPayload("the payload is not JSON",
                         fix='send {"question": "...", "k": 5, "max_tokens": 256}') from None
    if not isinstance(body, dict):
        raise BadPayload("the payload must be a JSON object", fix='send {"question": "..."}')
    q = body.get("question")
    if not isinstance(q, str) or not q.strip():
        raise BadPayload("'question' must be a non-empty string")
    out = {}
    for key, default in (("k", 5), ("max_tokens", 256)):
        v = body.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadPayload(f"'{key}' must be an integer >= 1", fix=f"omit it for {default}")
        out[key] = v
    mode = body.get("mode", "hybrid")
    if mode not in MODES:
        raise BadPayload(f"'mode' must be one of {list(MODES)}")
    rid = body.get("id", "")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or len(rid) > MAX_ID_LEN or any(c in rid for c in "/+#\0"):
        raise BadPayload(f"'id' must be a string of at most {MAX_ID_LEN} characters without / + # (it becomes a topic level)")
    return Request(q, out["k"], out["max_tokens"], mode, rid)


def _request_id(payload: bytes) -> str:
    """The "id" of a payload that failed validation, when one can still be read (to route the error)."""
    try:
        rid = json.loads(payload.decode("utf-8")).get("id", "")
    except Exception:  # noqa: BLE001 - any malformed payload
        return ""
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else ""
    return rid if rid and len(rid) <= MAX_ID_LEN and not any(c in rid for c in "/+#\0") else ""


class MqttBridge:
    """Serves `runtime.ask` (EdgeRuntime, or anything with ask(question, k=, mode=, max_tokens=,
    on_token=) returning an object with to_dict()) over an MQTT broker."""

    def __init__(self, runtime: Any, host: str, port: int = 1883, *, prefix: str = "edge-rag",
                 username: str | None = None, password: str | None = None, tls: TlsOptions | None = None,
                 client_id: str | None = None, workers: int = 4, max_pending: int = 64, qos: int = 1,
                 keepalive: int = 30):
        import paho.mqtt.client as mqtt
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes

        if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
            raise UsageError(f"invalid topic prefix {prefix!r}", fix="use levels like edge-rag or robots/r1/edge-rag")
        if workers < 1 or max_pending < 1:
            raise UsageError("--workers and --max-pending must be >= 1")
        self.runtime = runtime
        self.host, self.port, self.prefix, self.qos, self.keepalive = host, port, prefix, qos, keepalive
        self.ask_topic = f"{prefix}/ask"
        self.status_topic = f"{prefix}/status"
        self.error_topic = f"{prefix}/error"
        self._Properties, self._PUBLISH = Properties, PacketTypes.PUBLISH
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-mqtt")
        self._pending = threading.BoundedSemaphore(max_pending)
        self.connected = threading.Event()
        self._stopping = False
        self.connects = 0  # how many times the client has (re)connected
        self.answered = 0
        self._count_lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"edge-rag-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            import ssl

            c.tls_set(ca_certs=tls.cafile, certfile=tls.certfile, keyfile=tls.keyfile, cert_reqs=ssl.CERT_REQUIRED)
            c.tls_insecure_set(tls.insecure)
        c.will_set(self.status_topic, json.dumps({"state": "offline"}), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_queued_messages_set(0)  # unbounded: replies made while reconnecting go out after it
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    # ---- lifecycle
    def start(self, timeout: float | None = 30.0) -> None:
        """Connect (in the background: a broker that is down now is retried) and serve."""
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if timeout is not None and not self.connected.wait(timeout):
            log.warning("no connection to %s:%d yet; retrying in the background", self.host, self.port)

    def stop(self) -> None:
        """Finish the questions in hand, say offline, disconnect."""
        self._pool.shutdown(wait=True)
        self._stopping = True
        if self.connected.is_set():
            self.client.publish(self.status_topic, json.dumps({"state": "offline"}), qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    # ---- paho callbacks (its network thread: never block here)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused the connection: %s", reason_code)
            return
        client.subscribe(self.ask_topic, qos=self.qos)  # again on every reconnect (a restarted broker forgot us)
        client.publish(self.status_topic, json.dumps({"state": "online"}), qos=1, retain=True)
        self.connects += 1
        self.connected.set()
        log.info("connected to %s:%d, listening on %s", self.host, self.port, self.ask_topic)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stopping:
                log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) or None
        correlation = getattr(props, "CorrelationData", None)
        try:
            req = parse_request(msg.payload)
        except BadPayload as e:
            rid = _request_id(msg.payload)
            topic = response or (f"{self.prefix}/answer/{rid}" if rid else self.error_topic)
            self._reply(topic, correlation, {"type": "error", "id": rid, "error": {"message": str(e), "code": "bad_request"}})
            return
        topic = response or (f"{self.prefix}/answer/{req.id}" if req.id else None)
        if topic is None:
            self._reply(self.error_topic, correlation, {"type": "error", "id": "", "error": {
                "message": "nowhere to answer: set the MQTT 5 Response Topic property or an 'id' in the payload",
                "code": "bad_request"}})
            return
        if not self._pending.acquire(blocking=False):
            self._reply(topic, correlation, {"type": "error", "id": req.id, "error": {
                "message": "the bridge is busy (too many questions waiting); retry later", "code": "busy"}})
            return
        self._pool.submit(self._answer, req, topic, correlation)

    # ---- work
    def _answer(self, req: Request, topic: str, correlation: bytes | None) -> None:
        try:
            seq = 0

            def on_token(text: str) -> None:
                nonlocal seq
                self._reply(topic, correlation, {"type": "token", "id": req.id, "seq": seq, "text": text})
                seq += 1

            ans = self.runtime.ask(req.question, k=req.k, mode=req.mode, max_tokens=req.max_tokens, on_token=on_token)
            self._reply(topic, correlation, {"type": "answer", "id": req.id, "answer": ans.to_dict()})
            with self._count_lock:
                self.answered += 1
        except Exception as e:  # noqa: BLE001 - reported to the asker; the bridge keeps serving
            code = "collection_unavailable" if isinstance(e, IndexError_) else \
                "bad_request" if isinstance(e, UsageError) else "server_error"
            msg = str(e) if isinstance(e, EdgeRagError) else f"internal error: {type(e).__name__}: {e}"
            if code == "server_error":
                log.exception("answering %r failed", req.question)
            self._reply(topic, correlation, {"type": "error", "id": req.id, "error": {"message": msg, "code": code}})
        finally:
            self._pending.release()

    def _reply(self, topic: str, correlation: bytes | None, body: dict) -> None:
        props = None
        if correlation is not None:
            props = self._Properties(self._PUBLISH)
            props.CorrelationData = correlation
        self.client.publish(topic, json.dumps(body, default=str), qos=self.qos, properties=props)


def parse_broker(broker: str, tls: bool = False) -> tuple[str, int]:
    """'HOST', 'HOST:PORT', '[v6]:PORT' -> (host, port); the port defaults to 1883 (8883 with TLS)."""
    default = 8883 if tls else 1883
    b = broker.strip()
    if not b:
        raise UsageError("--broker is empty", fix="give HOST or HOST:PORT")
    if b.startswith("["):
        host, _, rest = b[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif b.count(":") == 1:
        host, port = b.split(":")
    else:
        host, port = b, ""
    if not host:
        raise UsageError(f"invalid broker {broker!r}", fix="give HOST or HOST:PORT")
    if port == "":
        return host, default
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"invalid broker port in {broker!r}", fix="use 1-65535, e.g. localhost:1883")
    return host, int(port)


def serve_until_signal(bridge: MqttBridge, on_ready: Callable[[], None] | None = None) -> None:
    """Start, then block until SIGINT/SIGTERM; stop cleanly."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bridge.start(timeout=None)
    if on_ready:
        on_ready()
    while not stop.wait(1.0):
        pass
    bridge.stop()
