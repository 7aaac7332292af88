"""The local HTTP API (edge.serve.app) on a tiny real generator bundle (ONNX Runtime), the
hashing test embedder and an ingested collection: responses equal the library's own output,
streams equal whole responses, and bad requests get a 400 that says what to change."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tiny import make_tiny_bundle, tiny_hf_model  # noqa: E402
from test_rag_fakes import HashEmbedder  # noqa: E402

from edge.runtime.generator import Generator  # noqa: E402
from edge.runtime.sampler import SamplingParams  # noqa: E402

pytest.importorskip("starlette")
pytest.importorskip("httpx")

MANUAL = """# Controller manual

## Error E-214

E-214 means the coolant pressure sensor reads below 0.8 bar. Check hose PN 40-118-2 for leaks.

## Cleaning

Wipe the touch screen with a dry cloth. Never use solvents on the housing.
"""
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    # byte-level tokenizer: the RAG prompt with its passages is ~1k tokens
    return make_tiny_bundle(tmp_path_factory.mktemp("serve") / "gen", tiny_hf_model("llama", seed=5, max_position=2048),
                            "fp32", forms=("ort",), max_context=2048, max_batch=2)


@pytest.fixture
def client(bundle, tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from edge.runtime.host import EdgeRuntime
    from edge.serve import create_app
    from rag.ingest import ingest

    monkeypatch.setenv("EDGE_RAG_HOME", str(tmp_path / "home"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "controller.md").write_text(MANUAL)
    emb = HashEmbedder()
    ingest(docs, embedder=emb, progress=False)
    gen = Generator.from_bundle(bundle, backend="onnxruntime")
    with EdgeRuntime("default", embedder=emb, generator=gen) as rt:
        with TestClient(create_app(rt)) as c:
            c.gen, c.emb = gen, emb
            yield c


def sse(resp) -> list:
    """The `data:` payloads of a server-sent-events body; '[DONE]' kept as a string."""
    out = []
    for line in resp.text.splitlines():
        if line.startswith("data: "):
            d = line[6:]
            out.append(d if d == "[DONE]" else json.loads(d))
    return out


def test_chat_completion_equals_the_generator(client):
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    d = r.json()
    want = client.gen.generate(MESSAGES, SamplingParams(max_tokens=12, temperature=0))
    st = client.gen.stats
    assert d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-")
    assert d["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert d["choices"][0]["finish_reason"] == {"length": "length", "stop": "stop", "context": "length"}[st.finish_reason]
    assert d["usage"] == {"prompt_tokens": st.n_prompt, "completion_tokens": st.n_generated, "total_tokens": st.n_prompt + st.n_generated}
    assert d["model"] == "gen"


def test_chat_stream_equals_the_whole_response(client):
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    r = client.post("/v1/chat/completions", json=body | {"stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_text_completion_is_raw_and_sampling_fields_apply(client):
    r = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 8, "temperature": 0, "stop": "zzz"})
    assert r.status_code == 200, r.text
    want = client.gen.generate("Once upon", SamplingParams(max_tokens=8, temperature=0, stop=["zzz"]))
    assert r.json()["choices"][0]["text"] == want
    seeded = {"prompt": "Once upon", "max_tokens": 8, "temperature": 0.9, "seed": 3}
    assert client.post("/v1/completions", json=seeded).json()["choices"][0]["text"] == \
        client.post("/v1/completions", json=seeded).json()["choices"][0]["text"]  # the seed reaches the sampler


def test_embeddings_equal_the_embedder(client):
    r = client.post("/v1/embeddings", json={"input": ["coolant pressure", "touch screen"]})
    assert r.status_code == 200, r.text
    d = r.json()
    got = np.array([e["embedding"] for e in d["data"]], dtype=np.float32)
    assert [e["index"] for e in d["data"]] == [0, 1]
    np.testing.assert_allclose(got, client.emb.embed(["coolant pressure", "touch screen"]), rtol=0, atol=1e-7)
    one = client.post("/v1/embeddings", json={"input": "coolant pressure"}).json()
    assert len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == client.emb.count_tokens("coolant pressure")


def test_ask_answers_with_sources_whole_and_streamed(client):
    r = client.post("/v1/ask", json={"question": "What does E-214 mean?", "max_tokens": 10})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["covered"] and d["sources"] and "controller.md" in d["sources"][0]["source"]
    r = client.post("/v1/ask", json={"question": "What does E-214 mean?", "max_tokens": 10, "stream": True})
    events = sse(r)
    assert events[-1] == "[DONE]" and "answer" in events[-2]
    streamed = "".join(e["delta"] for e in events[:-2]).strip()
    assert streamed == events[-2]["answer"]["text"] == d["text"]
    assert events[-2]["answer"]["sources"] == d["sources"]


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/ask", {"question": "  "}, "question"),
    ("/v1/ask", {"question": "E-214?", "mode": "psychic"}, "mode"),
])
def test_bad_requests_get_a_400_that_names_the_field(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]


def test_protocol_errors_are_json(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=[1, 2]).status_code == 400
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405


def test_a_prompt_over_the_context_is_a_400_even_when_streaming(client):
    long = [{"role": "user", "content": "word " * 500}]  # 2500 tokens
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": long, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 200, "temperature": 0.8, "seed": 1}),
    ("/v1/ask", {"question": "What does E-214 mean?", "max_tokens": 200}),
])
def test_a_client_leaving_mid_stream_does_not_block_the_next_request(client, path, body):
    import threading

    with client.stream("POST", path, json=body | {"stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # the stream was dropped after one event; the engines must be free again
    result = {}
    nxt = {"messages": MESSAGES, "max_tokens": 4}
    t = threading.Thread(target=lambda: result.update(r=client.post("/v1/chat/completions", json=nxt)))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the next request is stuck behind the abandoned stream"
    assert result["r"].status_code == 200


def test_models_and_health(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["gen", client.emb.embedder_id]
    h = client.get("/health").json()
    eng = h.pop("engine")
    assert h == {"status": "ok", "generator": "gen", "embedder": client.emb.embedder_id, "collection": "default"}
    assert eng["running"] == 0 and eng["waiting"] == 0 and eng["kv_blocks_used"] == 0 and eng["kv_blocks_total"] > 0


def test_concurrent_chats_are_batched_and_equal_each_alone(client):
    """Eight clients at once: each gets what it gets alone; the engine ran them in one batch."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 6 + i, "temperature": 0} for i in range(8)]
    alone = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in bodies]
    steps0 = client.get("/health").json()["engine"]["steps"]
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda b: client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"], bodies))
    assert got == alone
    eng = client.get("/health").json()["engine"]
    assert eng["kv_blocks_used"] == 0
    # alone they took sum(max_tokens) steps or more; batched, fewer steps than that
    assert eng["steps"] - steps0 < sum(b["max_tokens"] for b in bodies)


def test_a_dropped_stream_frees_its_kv_blocks(client):
    import time

    with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 500, "temperature": 0.8, "seed": 1, "stream": True}) as r:
        next(r.iter_lines())
    for _ in range(100):  # the abort lands at the engine's next step
        eng = client.get("/health").json()["engine"]
        if eng["running"] == 0:
            break
        time.sleep(0.05)
    assert eng["running"] == 0 and eng["kv_blocks_used"] == 0


def test_waiting_answers_hold_no_worker_thread(client):
    """Generations in flight (whole and streamed) do not occupy Starlette's worker pool: with it
    cut to one thread and the engine held, /v1/embeddings and /health still answer at once."""
    import threading

    import anyio.to_thread

    client.portal.call(lambda: setattr(anyio.to_thread.current_default_thread_limiter(), "total_tokens", 1))
    engine = client.gen.engine
    gate, execute = threading.Event(), engine.backend.execute
    engine.backend.execute = lambda b: (gate.wait(30), execute(b))[1]
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    out = {}

    def whole():
        out["whole"] = client.post("/v1/chat/completions", json=body).status_code

    def streamed():
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            r.read()
            out["stream"] = (r.status_code, sse(r)[-1])

    threads = [threading.Thread(target=f) for f in (whole, streamed)]
    try:
        [t.start() for t in threads]
        for _ in range(500):  # both submitted to the engine (its open streams)
            if len(engine._streams) == 2:
                break
            time.sleep(0.01)
        t0 = time.monotonic()
        assert client.post("/v1/embeddings", json={"input": ["coolant"]}).status_code == 200
        assert client.get("/health").status_code == 200
        assert time.monotonic() - t0 < 5 and not out  # answered while both generations wait
    finally:
        gate.set()
        [t.join(30) for t in threads]
        del engine.backend.execute
    assert out == {"whole": 200, "stream": (200, "[DONE]")}


def test_without_a_collection_chat_works_and_ask_says_to_ingest(bundle):
    from starlette.testclient import TestClient

    from edge.serve import create_app
    from edge.serve.app import ModelsRuntime

    rt = ModelsRuntime(HashEmbedder(), "manuals", generator=Generator.from_bundle(bundle, backend="onnxruntime"))
    with TestClient(create_app(rt)) as c:
        assert c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}).status_code == 200
        for stream in (False, True):
            r = c.post("/v1/ask", json={"question": "E-214?", "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["code"] == "collection_unavailable"
            assert "edge-rag ingest PATH --collection manuals" in r.json()["error"]["message"]


def test_serve_refuses_a_busy_port_in_one_line(capsys):
    from edge.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in err and "\n" not in err
