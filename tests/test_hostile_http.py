"""Hostile HTTP clients against `edge-rag serve`'s app (a tiny real generator bundle, the hashing
test embedder, an ingested collection): every client mistake gets a 4xx JSON error naming what to
change, never a 500, and the server keeps answering. Issue 13's failures are reproduced here
first (`"stop": 5` and a lone surrogate were 500s; text/plain posts were accepted; no size limit,
no key); add a case for every new bug found."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tiny import make_tiny_bundle, tiny_hf_model  # noqa: E402
from test_rag_fakes import HashEmbedder  # noqa: E402

pytest.importorskip("starlette")
pytest.importorskip("httpx")

MSG = [{"role": "user", "content": "Say something."}]
CHAT, COMP, EMB, ASK = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/ask"
KEY = "s3cret-key-0123"
MAX_TOKENS = 12  # the test server's cap (the plan's context would be 2048)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("hostile") / "gen", tiny_hf_model("llama", seed=7, max_position=2048),
                            "fp32", forms=("ort",), max_context=2048, max_batch=2)


@pytest.fixture(scope="module")
def runtime(bundle, tmp_path_factory):
    from edge.runtime.generator import Generator
    from edge.runtime.host import EdgeRuntime
    from rag.ingest import ingest

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("hostile-home")
    mp.setenv("EDGE_RAG_HOME", str(home))
    docs = home / "docs"
    docs.mkdir()
    (docs / "controller.md").write_text("# Manual\n\n## Error E-214\n\nE-214 means the coolant pressure is low.\n")
    emb = HashEmbedder()
    ingest(docs, embedder=emb, progress=False)
    rt = EdgeRuntime("default", embedder=emb, generator=Generator.from_bundle(bundle, backend="onnxruntime"))
    yield rt
    rt.close()
    mp.undo()


def _client(runtime, **limits):
    from starlette.testclient import TestClient

    from edge.serve import create_app
    from edge.serve.guard import Limits

    lim = Limits.for_generator(runtime.generator, max_tokens=MAX_TOKENS, max_body_bytes=64_000, max_embed_inputs=8,
                               max_embed_chars=2000, max_k=20, **limits)
    return TestClient(create_app(runtime, lim), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(runtime):
    with _client(runtime) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(runtime):
    with _client(runtime, api_key=KEY) as c:
        yield c


def post(client, path: str, body, **headers):
    """POST `body` as JSON text (ensure_ascii: lone surrogates travel as \\ud800 escapes, as a
    hostile client would send them)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json", **headers})


def _is_error(r, status: int, needle: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["message"] and needle.lower() in err["message"].lower(), err


# --------------------------------------------------------------------------- 400: bad fields

BAD_FIELDS = [
    # issue 13: 500 before
    (CHAT, {"messages": MSG, "stop": 5}, "stop"),
    (CHAT, {"messages": [{"role": "user", "content": "hi\ud800"}]}, "surrogate"),
    (COMP, {"prompt": "hi\udfff there"}, "surrogate"),
    (EMB, {"input": ["ok", "bad\ud800"]}, "surrogate"),
    (ASK, {"question": "E-214\ud800?"}, "surrogate"),
    (CHAT, {"messages": MSG, "stop": ["ok\ud800"]}, "surrogate"),
    (CHAT, {"messages": MSG, "x\ud800": 1}, "surrogate"),
    # stop
    (CHAT, {"messages": MSG, "stop": [5]}, "stop"),
    (CHAT, {"messages": MSG, "stop": [""]}, "stop"),
    (CHAT, {"messages": MSG, "stop": {"a": 1}}, "stop"),
    (CHAT, {"messages": MSG, "stop": ["s"] * 17}, "stop"),
    (CHAT, {"messages": MSG, "stop": ["x" * 300]}, "stop"),
    (CHAT, {"messages": MSG, "stop": [None]}, "stop"),
    # max_tokens
    (CHAT, {"messages": MSG, "max_tokens": "10"}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": -1}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": True}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": [1]}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": "x"}, "max_tokens"),
    # sampling numbers
    (CHAT, {"messages": MSG, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": MSG, "temperature": -0.5}, "temperature"),
    (CHAT, {"messages": MSG, "temperature": True}, "temperature"),
    (CHAT, {"messages": MSG, "temperature": [1]}, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, "top_p"),
    (CHAT, {"messages": MSG, "top_p": 1.5}, "top_p"),
    (CHAT, {"messages": MSG, "top_p": "all"}, "top_p"),
    (CHAT, {"messages": MSG, "top_k": -1}, "top_k"),
    (CHAT, {"messages": MSG, "top_k": 10 ** 30}, "top_k"),
    (CHAT, {"messages": MSG, "top_k": 2.5}, "top_k"),
    (CHAT, {"messages": MSG, "seed": -1}, "seed"),
    (CHAT, {"messages": MSG, "seed": 2 ** 64}, "seed"),
    (CHAT, {"messages": MSG, "seed": "x"}, "seed"),
    (CHAT, {"messages": MSG, "repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"messages": MSG, "repetition_penalty": -2}, "repetition_penalty"),
    (CHAT, {"messages": MSG, "n": 3}, "'n'"),
    (CHAT, {"messages": MSG, "stream": "yes"}, "stream"),
    (CHAT, {"messages": MSG, "stream": 1}, "stream"),
    # messages
    (CHAT, {}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": {"role": "user"}}, "messages"),
    (CHAT, {"messages": [None]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    (CHAT, {"messages": [{"role": ["user"], "content": "x"}]}, "messages[0]"),
    (CHAT, {"messages": MSG * 300}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 3000}]}, "context"),
    # completions
    (COMP, {}, "prompt"),
    (COMP, {"prompt": ""}, "prompt"),
    (COMP, {"prompt": 5}, "prompt"),
    (COMP, {"prompt": ["a", "b"]}, "prompt"),
    (COMP, {"prompt": [1, 2, 3]}, "prompt"),
    (COMP, {"prompt": None}, "prompt"),
    (COMP, {"prompt": "x", "stop": 5}, "stop"),
    # embeddings
    (EMB, {}, "input"),
    (EMB, {"input": ""}, "input"),
    (EMB, {"input": []}, "input"),
    (EMB, {"input": [1, 2, 3]}, "input"),
    (EMB, {"input": [[1, 2]]}, "input"),
    (EMB, {"input": {"text": "x"}}, "input"),
    (EMB, {"input": ["a", ""]}, "input"),
    (EMB, {"input": ["t"] * 9}, "limit"),
    (EMB, {"input": "x" * 2001}, "limit"),
    # ask
    (ASK, {}, "question"),
    (ASK, {"question": 5}, "question"),
    (ASK, {"question": " \n "}, "question"),
    (ASK, {"question": "E-214?", "k": 0}, "'k'"),
    (ASK, {"question": "E-214?", "k": -3}, "'k'"),
    (ASK, {"question": "E-214?", "k": "5"}, "'k'"),
    (ASK, {"question": "E-214?", "k": True}, "'k'"),
    (ASK, {"question": "E-214?", "k": 10 ** 9}, "'k'"),
    (ASK, {"question": "E-214?", "max_tokens": 0}, "max_tokens"),
    (ASK, {"question": "E-214?", "max_tokens": "9"}, "max_tokens"),
    (ASK, {"question": "E-214?", "mode": "psychic"}, "mode"),
    (ASK, {"question": "E-214?", "mode": 5}, "mode"),
    (ASK, {"question": "E-214?", "stream": "true"}, "stream"),
]


@pytest.mark.parametrize("path,body,needle", BAD_FIELDS, ids=[f"{i}-{p.split('/')[-1]}" for i, (p, *_) in enumerate(BAD_FIELDS)])
def test_a_bad_field_is_a_400_that_names_it(client, path, body, needle):
    _is_error(post(client, path, body), 400, needle)


STREAMED_BAD = [(CHAT, {"messages": MSG, "stop": 5}), (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}),
                (COMP, {"prompt": "x", "top_k": -1}), (ASK, {"question": "x", "k": 0})]


@pytest.mark.parametrize("path,body", STREAMED_BAD)
def test_a_bad_streamed_request_is_a_400_before_the_stream(client, path, body):
    _is_error(post(client, path, body | {"stream": True}), 400)


# --------------------------------------------------------------------------- bodies that are not JSON objects

RAW_BODIES = [b"{not json", b"", b"[1, 2]", b"5", b'"text"', b"null", b"\xff\xfe{}", b"[" * 30_000 + b"]" * 30_000,
              b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\x00\x01\x02", b'{"a": 1}{"b": 2}',
              '{"messages": [{"role": "user", "content": "é"}]}'.encode("latin-1")]


@pytest.mark.parametrize("raw", RAW_BODIES, ids=range(len(RAW_BODIES)))
def test_a_body_that_is_not_a_json_object_is_a_400(client, raw):
    r = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    _is_error(r, 400)


def test_a_deeply_nested_body_is_a_400_on_every_python(client):
    """40 levels parse on every Python (3.11's json refuses ~1,000, 3.12's takes 5,000 and more), so the refusal is
    the guard's own limit, not the parser's (on 3.12 the 5,000-level body above was a RecursionError and a 500)."""
    nested = b"[" * 40 + b"]" * 40
    raw = b'{"messages": [{"role": "user", "content": "x"}], "user": ' + nested + b"}"
    r = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    _is_error(r, 400)
    assert "nests more than 32 levels" in r.json()["error"]["message"]


def test_nan_and_infinity_are_refused(client):
    for raw in (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
                b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
                b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}'):
        _is_error(client.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400)


# --------------------------------------------------------------------------- 415 / 413 / 405 / 404

@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                   "application/jsonx", "text/json", "application/json-patch+json", ""])
def test_a_post_that_is_not_json_is_a_415(client, ctype):
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.post(CHAT, content=json.dumps({"messages": MSG, "max_tokens": 2}).encode(), headers=headers)
    _is_error(r, 415, "application/json")


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_accepted(client, ctype):
    r = client.post(CHAT, content=json.dumps({"messages": MSG, "max_tokens": 2}).encode(), headers={"content-type": ctype})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", [CHAT, COMP, EMB, ASK])
def test_a_body_over_the_limit_is_a_413(client, path):
    r = post(client, path, {"messages": MSG, "prompt": "x", "input": "y", "question": "z", "pad": "a" * 70_000})
    _is_error(r, 413, "limit")


def _asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict, int]:
    """Drive the ASGI app by hand: (status, error json, number of body chunks it read)."""
    got: dict = {}
    read = 0

    async def run():
        nonlocal read
        it = iter(chunks)

        async def receive():
            nonlocal read
            try:
                c = next(it)
            except StopIteration:
                await asyncio.sleep(3600)  # a client that never sends the rest
            read += 1
            return {"type": "http.request", "body": c, "more_body": read < len(chunks)}

        async def send(msg):
            if msg["type"] == "http.response.start":
                got["status"] = msg["status"]
            elif msg["type"] == "http.response.body":
                got["body"] = got.get("body", b"") + msg.get("body", b"")

        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 1234), "root_path": ""}
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(run())
    return got["status"], json.loads(got["body"]), read


def test_a_declared_50mb_body_is_refused_before_reading_it(runtime):
    from edge.serve import create_app

    app = create_app(runtime)  # default limits: 1 MB
    status, err, read = _asgi(app, "POST", CHAT, [(b"content-type", b"application/json"),
                                                  (b"content-length", str(50 << 20).encode())], [b"{" * 65536] * 800)
    assert status == 413 and read == 0 and "limit" in err["error"]["message"]


def test_a_chunked_body_is_cut_at_the_limit(runtime):
    from edge.serve import create_app

    app = create_app(runtime)
    status, err, read = _asgi(app, "POST", CHAT, [(b"content-type", b"application/json")], [b" " * 65536] * 800)
    assert status == 413 and read <= (1 << 20) // 65536 + 1


@pytest.mark.parametrize("length", [b"abc", b"-5", b"1e9"])
def test_a_bad_content_length_is_a_400(runtime, length):
    from edge.serve import create_app

    status, _, _ = _asgi(create_app(runtime), "POST", CHAT, [(b"content-type", b"application/json"),
                                                            (b"content-length", length)], [b"{}"])
    assert status == 400


@pytest.mark.parametrize("method,path,status", [
    ("GET", CHAT, 405), ("PUT", CHAT, 405), ("DELETE", EMB, 405), ("PATCH", ASK, 405), ("OPTIONS", CHAT, 405),
    ("GET", "/v1/nope", 404), ("GET", "/../../etc/passwd", 404), ("GET", "/v1/" + "a" * 5000, 404),
    ("POST", "/v1/models", 405), ("GET", "/health/../v1", 404),
])
def test_wrong_methods_and_paths_are_json_errors(client, method, path, status):
    r = client.request(method, path, headers={"content-type": "application/json"}, content=b"{}" if method != "GET" else None)
    _is_error(r, status)


def test_no_cors_headers_are_ever_sent(client):
    origin = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    for r in (client.options(CHAT, headers=origin), client.get("/health", headers=origin),
              client.post(CHAT, json={"messages": MSG, "max_tokens": 2}, headers=origin)):
        assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)


# --------------------------------------------------------------------------- 401

@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x",
                                  f"Bearer {KEY[:-1]}", KEY, f"Token {KEY}", "Bearer " + "k" * 5000])
def test_requests_without_the_right_key_get_a_401(keyed, auth):
    headers = {} if auth is None else {"authorization": auth}
    for r in (keyed.post(CHAT, json={"messages": MSG, "max_tokens": 2}, headers=headers),
              keyed.get("/health", headers=headers), keyed.get("/v1/models", headers=headers)):
        _is_error(r, 401)
        assert r.headers.get("www-authenticate") == "Bearer"


def test_the_key_in_the_query_string_is_not_accepted(keyed):
    _is_error(keyed.get(f"/health?api_key={KEY}"), 401)


@pytest.mark.parametrize("auth", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY}"])
def test_the_right_key_is_accepted(keyed, auth):
    r = keyed.post(CHAT, json={"messages": MSG, "max_tokens": 2}, headers={"authorization": auth})
    assert r.status_code == 200, r.text
    assert keyed.get("/health", headers={"authorization": auth}).status_code == 200


def test_auth_comes_before_content_type_and_size(keyed):
    _is_error(keyed.post(CHAT, content=b"x" * 100_000, headers={"content-type": "text/plain"}), 401)


# --------------------------------------------------------------------------- limits that cut instead of refusing

def test_a_huge_max_tokens_is_cut_to_the_servers_limit(client):
    # issue 13: max_tokens 10^12 held the engine for minutes
    for body in ({"messages": MSG, "max_tokens": 10 ** 12, "temperature": 0.9, "seed": 1},
                 {"messages": MSG, "max_completion_tokens": 10 ** 12, "temperature": 0.9, "seed": 1}):
        r = client.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= MAX_TOKENS
    r = client.post(ASK, json={"question": "What does E-214 mean?", "max_tokens": 10 ** 12})
    assert r.status_code == 200, r.text


def test_a_request_past_its_deadline_stops_generating(runtime):
    with _client(runtime) as c:  # without a deadline this request ends on its own stop token
        r = c.post(CHAT, json={"messages": MSG, "max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": 3, "stop": list("etaoinsrhdlu ")})
        assert r.json()["choices"][0]["finish_reason"] == "stop", r.json()
    with _client(runtime, deadline_s=1e-6) as c:
        r = c.post(CHAT, json={"messages": MSG, "max_tokens": MAX_TOKENS, "temperature": 0.9, "seed": 3, "stop": list("etaoinsrhdlu ")})
        # cut at once, though the tiny engine may have generated everything by then
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        r = c.post(CHAT, json={"messages": MSG, "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0.9, "seed": 2})
        chunks = [ln for ln in r.text.splitlines() if ln.startswith("data: {")]
        assert r.status_code == 200 and len(chunks) <= 3


def test_unknown_fields_and_extra_openai_fields_are_ignored(client):
    r = client.post(CHAT, json={"messages": MSG, "max_tokens": 2, "logprobs": True, "user": "u", "n": 1,
                                "response_format": {"type": "text"}, "frequency_penalty": 0, "zzz": [1, {"a": None}]})
    assert r.status_code == 200, r.text


def test_the_server_still_answers_after_the_hostile_cases(client):
    assert client.get("/health").status_code == 200
    r = client.post(CHAT, json={"messages": MSG, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


# --------------------------------------------------------------------------- binding

@pytest.mark.parametrize("host,key,insecure,ok", [
    ("127.0.0.1", None, False, True), ("::1", None, False, True), ("localhost", None, False, True),
    ("127.0.0.2", None, False, True), ("0.0.0.0", None, False, False), ("::", None, False, False),
    ("192.168.1.20", None, False, False), ("0.0.0.0", "k", False, True), ("0.0.0.0", None, True, True),
    ("myhost.lan", None, False, False),
])
def test_non_loopback_binds_need_a_key_or_insecure(host, key, insecure, ok):
    from edge.errors import UsageError
    from edge.serve.guard import check_bind

    if ok:
        check_bind(host, key, insecure)
    else:
        with pytest.raises(UsageError, match="--api-key"):
            check_bind(host, key, insecure)


def test_serve_refuses_0000_without_a_key_in_one_line(capsys, monkeypatch):
    from edge.cli import main

    monkeypatch.delenv("EDGE_RAG_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host 0.0.0.0") and "--insecure" in err and "\n" not in err


@pytest.mark.parametrize("args,needle", [
    (["--max-body", "lots"], "size"), (["--max-embed-inputs", "0"], "max_embed_inputs"),
    (["--deadline", "-1"], "deadline"), (["--api-key", "has space"], "API key"), (["--max-tokens", "0"], "max_tokens"),
])
def test_serve_refuses_bad_limits_in_one_line(capsys, args, needle):
    from edge.cli import main

    assert main(["serve", "--port", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
