"""The MQTT bridge (edge.serve.mqtt) against a real broker: Debian's mosquitto, started by the test
on a free port (the broker tests skip with their reason where it is not installed), in front of a
tiny real generator + embedder. Answers that come over MQTT must equal the Python API's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tiny import make_tiny_bundle, make_tiny_embedder_bundle, tiny_hf_model  # noqa: E402

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install 'edge-rag[mqtt]')")

MANUAL = """# Controller manual

## Error E-214

E-214 means the coolant pressure sensor reads below 0.8 bar. Check hose PN 40-118-2 for leaks.

## Cleaning

Wipe the touch screen with a dry cloth. Never use solvents on the housing.

## Battery

The battery pack KS-BAT-48105 charges to 57.6 V. Replace it after 1,500 cycles.
"""
QUESTIONS = ["What does error E-214 mean?", "How do I clean the touch screen?", "When should the battery pack be replaced?"]
MAX_TOKENS = 16


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None)


needs_broker = pytest.mark.skipif(_mosquitto() is None,
                                  reason="mosquitto is not installed (apt-get install mosquitto; .ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A mosquitto process on 127.0.0.1:port; stop() and start() again on the same port."""

    def __init__(self, workdir: Path):
        self.port = _free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "log_dest stderr\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([_mosquitto(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from edge.runtime.embedder import Embedder
    from edge.runtime.generator import Generator
    from edge.runtime.host import EdgeRuntime
    from rag.ingest import ingest

    root = tmp_path_factory.mktemp("mqtt")
    old = os.environ.get("EDGE_RAG_HOME")
    os.environ["EDGE_RAG_HOME"] = str(root / "home")
    gen_path = make_tiny_bundle(root / "gen", tiny_hf_model("llama", seed=0, max_position=2048), "fp32", forms=("ort",),
                                max_context=2048, max_batch=8)
    emb_path = make_tiny_embedder_bundle(root / "emb")
    emb = Embedder.from_bundle(emb_path)
    docs = root / "docs"
    docs.mkdir()
    (docs / "controller.md").write_text(MANUAL)
    try:
        ingest(docs, embedder=emb, progress=False, embedder_path=str(Path(emb_path).resolve()))
        gen = Generator.from_bundle(gen_path, backend="onnxruntime", threads=1)
        rt = EdgeRuntime("default", embedder=emb, generator=gen)
        # the Python API's answers, one question at a time: what MQTT must deliver
        rt.expected = {q: rt.ask(q, max_tokens=MAX_TOKENS).to_dict() for q in QUESTIONS}
        rt.paths = {"gen": gen_path, "home": root / "home"}
        yield rt
        rt.close()
        gen.close()
    finally:
        if old is None:
            os.environ.pop("EDGE_RAG_HOME", None)
        else:
            os.environ["EDGE_RAG_HOME"] = old


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def bridge(runtime, broker):
    from edge.serve.mqtt import MqttBridge

    br = MqttBridge(runtime, "127.0.0.1", broker.port, prefix="edge-rag", workers=8)
    br.start(timeout=10)
    assert br.connected.is_set()
    yield br
    br.stop()


class Asker:
    """A test client: MQTT 5 (response topic + correlation data) or 3.1.1 (ids). Collects the
    replies of each correlation / topic, in arrival order."""

    def __init__(self, port: int, v5: bool = True):
        from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5, MQTTv311

        self.replies: dict[bytes | str, list[dict]] = {}
        self.cond = threading.Condition()
        self.reply_topic = f"test/replies/{uuid.uuid4().hex[:8]}"
        self.c = Client(CallbackAPIVersion.VERSION2, client_id=f"asker-{uuid.uuid4().hex[:6]}",
                        protocol=MQTTv5 if v5 else MQTTv311)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.subscribe(self.reply_topic)
        self.subscribe("edge-rag/answer/#")
        self.subscribe("edge-rag/error")

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, qos=1)
        assert done.wait(5)

    def _on_message(self, client, userdata, msg) -> None:
        props = getattr(msg, "properties", None)
        key = getattr(props, "CorrelationData", None) or msg.topic
        with self.cond:
            self.replies.setdefault(key, []).append(json.loads(msg.payload))
            self.cond.notify_all()

    def ask(self, payload: bytes | dict, correlation: bytes | None = None, topic: str = "edge-rag/ask") -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.c.publish(topic, data, qos=1, properties=props).wait_for_publish(5)

    def wait_final(self, key: bytes | str, timeout: float = 120) -> list[dict]:
        """The replies of `key` once its answer or error has arrived."""
        deadline = time.time() + timeout
        with self.cond:
            while not any(r["type"] in ("answer", "error") for r in self.replies.get(key, [])):
                left = deadline - time.time()
                assert left > 0, f"no answer for {key!r}; got {self.replies.get(key)}"
                self.cond.wait(left)
            return list(self.replies[key])

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def asker(broker):
    a = Asker(broker.port)
    yield a
    a.close()


def _check_stream(replies: list[dict], want: dict) -> None:
    """Tokens in order, then the answer; the tokens make up the answer; it equals the Python API's."""
    *tokens, final = replies
    assert final["type"] == "answer", final
    assert [t["type"] for t in tokens] == ["token"] * len(tokens) and len(tokens) >= 1
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    ans = final["answer"]
    assert "".join(t["text"] for t in tokens).strip() == ans["text"]
    assert ans["question"] == want["question"] and ans["text"] == want["text"]
    assert [s["source"] for s in ans["sources"]] == [s["source"] for s in want["sources"]] and ans["sources"]


@needs_broker
def test_question_in_tokens_and_answer_out_with_correlation(bridge, asker, runtime):
    q = QUESTIONS[0]
    asker.ask({"question": q, "max_tokens": MAX_TOKENS}, correlation=b"\x00corr-1\xff")
    replies = asker.wait_final(b"\x00corr-1\xff")
    _check_stream(replies, runtime.expected[q])
    assert not any(k for k in asker.replies if k != b"\x00corr-1\xff")  # nothing went elsewhere


@needs_broker
def test_without_a_response_topic_answers_on_the_id_topic(bridge, broker, runtime):
    a = Asker(broker.port, v5=False)  # an MQTT 3.1.1 client has no response topic
    try:
        a.ask({"question": QUESTIONS[1], "max_tokens": MAX_TOKENS, "id": "r1-42"})
        _check_stream(a.wait_final("edge-rag/answer/r1-42"), runtime.expected[QUESTIONS[1]])
        a.ask({"question": QUESTIONS[1]})  # neither: reported on edge-rag/error
        err = a.wait_final("edge-rag/error", timeout=10)[-1]
        assert err["type"] == "error" and "Response Topic" in err["error"]["message"]
    finally:
        a.close()


@needs_broker
def test_eight_concurrent_questions_each_get_their_own_answer(bridge, asker, runtime):
    sent = {f"c{i}".encode(): QUESTIONS[i % len(QUESTIONS)] for i in range(8)}
    for corr, q in sent.items():  # all in flight before the first answer
        asker.ask({"question": q, "max_tokens": MAX_TOKENS}, correlation=corr)
    for corr, q in sent.items():
        _check_stream(asker.wait_final(corr), runtime.expected[q])
    assert len({runtime.expected[q]["text"] for q in QUESTIONS}) >= 2  # a mix-up would show


@needs_broker
def test_malformed_payloads_get_an_error_and_the_bridge_keeps_serving(bridge, asker, runtime):
    cases = {b"m1": b"{not json", b"m2": b"[1, 2]", b"m3": json.dumps({"question": "  "}).encode(),
             b"m4": json.dumps({"question": "q", "k": 0}).encode(), b"m5": b"\xff\xfe",
             b"m6": json.dumps({"question": "q", "mode": "telepathy"}).encode(),
             b"m7": json.dumps({"question": "q", "id": "a/b"}).encode()}
    for corr, payload in cases.items():
        asker.ask(payload, correlation=corr)
    for corr in cases:
        replies = asker.wait_final(corr, timeout=20)
        assert len(replies) == 1 and replies[0]["type"] == "error", replies
        assert replies[0]["error"]["code"] == "bad_request" and replies[0]["error"]["message"]
    assert "not JSON" in asker.replies[b"m1"][0]["error"]["message"]
    assert "'k'" in asker.replies[b"m4"][0]["error"]["message"]
    asker.ask({"question": QUESTIONS[2], "max_tokens": MAX_TOKENS}, correlation=b"after")
    _check_stream(asker.wait_final(b"after"), runtime.expected[QUESTIONS[2]])


@needs_broker
def test_bridge_survives_a_broker_restart(bridge, broker, runtime):
    assert bridge.connects == 1
    broker.stop()
    deadline = time.time() + 15
    while bridge.connected.is_set() and time.time() < deadline:
        time.sleep(0.05)
    assert not bridge.connected.is_set(), "the bridge did not notice the broker going away"
    broker.start()  # same port; a fresh broker that knows no subscriptions
    assert bridge.connected.wait(40), "the bridge did not reconnect"
    assert bridge.connects == 2
    a = Asker(broker.port)
    try:
        a.ask({"question": QUESTIONS[0], "max_tokens": MAX_TOKENS}, correlation=b"after-restart")
        _check_stream(a.wait_final(b"after-restart"), runtime.expected[QUESTIONS[0]])
    finally:
        a.close()


@needs_broker
def test_status_topic_is_retained_online(bridge, broker):
    a = Asker(broker.port)
    try:
        a.subscribe("edge-rag/status")
        deadline = time.time() + 5
        while "edge-rag/status" not in a.replies and time.time() < deadline:
            time.sleep(0.05)
        assert a.replies["edge-rag/status"][0] == {"state": "online"}
    finally:
        a.close()


def test_parse_broker():
    from edge.errors import UsageError
    from edge.serve.mqtt import parse_broker

    assert parse_broker("localhost") == ("localhost", 1883)
    assert parse_broker("localhost", tls=True) == ("localhost", 8883)
    assert parse_broker("10.0.0.2:1884") == ("10.0.0.2", 1884)
    assert parse_broker("[::1]:1885") == ("::1", 1885)
    assert parse_broker("::1") == ("::1", 1883)
    for bad in ("", "host:0", "host:x", ":1883"):
        with pytest.raises(UsageError):
            parse_broker(bad)


def test_parse_request():
    from edge.serve.mqtt import BadPayload, parse_request

    r = parse_request(b'{"question": "E-214?", "k": 3, "max_tokens": 20, "id": 7}')
    assert (r.question, r.k, r.max_tokens, r.mode, r.id) == ("E-214?", 3, 20, "hybrid", "7")
    for bad in (b"", b"null", b'{"question": 5}', b'{"question": "q", "max_tokens": true}', b'{"question": "q", "id": "#"}',
                b"[" * 30_000 + b"]" * 30_000, b'{"question": ' + b"[" * 5000 + b"]" * 5000 + b"}"):  # past / within 3.12's parser
        with pytest.raises(BadPayload):
            parse_request(bad)


def test_cli_errors_are_one_line(monkeypatch):
    from edge.cli import main

    assert main(["mqtt", "--broker", "localhost:99999"]) == 2
    assert main(["mqtt", "--broker", "localhost", "--keyfile", "/nonexistent.key"]) == 2


@needs_broker
def test_cli_serves_and_stops_on_sigterm(runtime, broker):
    """`edge-rag mqtt` as a user runs it: answers, then SIGTERM -> exit 0 and a retained offline status."""
    import signal

    env = dict(os.environ, EDGE_RAG_HOME=str(runtime.paths["home"]), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edge.cli import main; sys.exit(main())", "mqtt", "--broker", f"127.0.0.1:{broker.port}",
                             "--engine", str(runtime.paths["gen"]), "--threads", "1", "--topic-prefix", "edge-rag"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = Asker(broker.port)
    try:
        a.subscribe("edge-rag/status")
        deadline = time.time() + 120
        while {"state": "online"} not in a.replies.get("edge-rag/status", []):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "no online status"
            time.sleep(0.1)
        a.ask({"question": QUESTIONS[0], "max_tokens": MAX_TOKENS}, correlation=b"cli")
        _check_stream(a.wait_final(b"cli"), runtime.expected[QUESTIONS[0]])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
        deadline = time.time() + 10
        while a.replies["edge-rag/status"][-1] != {"state": "offline"} and time.time() < deadline:
            time.sleep(0.05)
        assert a.replies["edge-rag/status"][-1] == {"state": "offline"}
    finally:
        if proc.poll() is None:
            proc.kill()
        a.close()
