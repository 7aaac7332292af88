"""bench/serve_harness.py's HTTP client against a scripted server: chunked bodies split mid-event,
usage, [DONE], error events, hang-ups, /health's engine counters; and its percentile. Also
bench/bench_answers.py's check that its collection holds only its own corpus."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_harness import engine_counters, get_health, pct, stream_chat  # noqa: E402


def _event(content: str | None = None, usage: dict | None = None, error: str | None = None) -> bytes:
    if error:
        return f"data: {json.dumps({'error': {'message': error}})}\n\n".encode()
    ev = {"choices": [{"index": 0, "delta": {"content": content} if content else {"role": "assistant"}}]}
    if usage:
        ev = {"choices": [], "usage": usage}
    return f"data: {json.dumps(ev)}\n\n".encode()


async def _serve(body: bytes, chunk: int, status: int = 200, chunked: bool = True):
    """A one-response-per-connection HTTP server; returns (server, port, seen request bodies)."""
    seen = []

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        n = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        seen.append(json.loads(await reader.readexactly(n)) if n else None)
        try:
            if chunked:
                writer.write(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
                for i in range(0, len(body), chunk):  # pieces cut anywhere, mid-line included
                    piece = body[i:i + chunk]
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.001)
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], seen


@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_stream_counts_content_events_across_chunk_boundaries(chunk):
    body = _event() + b"".join(_event(f"t{i}") for i in range(5)) + _event(usage={"completion_tokens": 6}) + b"data: [DONE]\n\n"

    async def go():
        srv, port, seen = await _serve(body, chunk)
        async with srv:
            return await stream_chat("127.0.0.1", port, {"messages": []}), seen

    r, seen = asyncio.run(go())
    assert r.error is None and r.done and r.status == 200
    assert len(r.times) == 5 and len(r.gaps) == 4  # the role-only event is not a token
    assert r.tokens == 6  # the server's usage wins over the event count
    assert r.ttft is not None and r.ttft >= 0
    assert seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}


def test_stream_reports_errors_missing_done_and_http_status():
    async def go(body, **kw):
        srv, port, _ = await _serve(body, 16, **kw)
        async with srv:
            return await stream_chat("127.0.0.1", port, {"messages": []})

    r = asyncio.run(go(_event("a") + _event(error="boom")))
    assert r.error.startswith("stream error") and "boom" in r.error
    r = asyncio.run(go(_event("a") + _event("b")))
    assert r.error == "stream ended without [DONE]" and r.tokens == 2
    r = asyncio.run(go(b'{"error": "bad"}', status=400, chunked=False))
    assert r.status == 400 and r.error.startswith("HTTP 400")


def test_stream_hangs_up_after_n_events():
    body = b"".join(_event(f"t{i}") for i in range(50)) + b"data: [DONE]\n\n"

    async def go():
        srv, port, _ = await _serve(body, 40)
        async with srv:
            return await stream_chat("127.0.0.1", port, {"messages": []}, disconnect_after=3)

    r = asyncio.run(go())
    assert r.disconnected and not r.done and r.error is None and len(r.times) == 3


def test_health_engine_counters_or_none():
    eng = {"waiting": 1, "running": 2, "kv_blocks_used": 30, "kv_blocks_total": 512}

    async def go(payload):
        srv, port, _ = await _serve(json.dumps(payload).encode(), 1 << 20, chunked=False)
        async with srv:
            return await get_health("127.0.0.1", port)

    lat, h = asyncio.run(go({"status": "ok", "engine": eng}))
    assert lat > 0 and engine_counters(h) == eng
    _, h = asyncio.run(go({"status": "ok"}))  # today's serve: no engine block
    assert h == {"status": "ok"} and engine_counters(h) is None
    assert engine_counters({"engine": {"running": 1}}) is None


def test_percentile():
    assert pct([], 50) != pct([], 50)  # nan
    assert pct([5.0], 99) == 5.0
    xs = list(range(1, 101))
    assert pct(xs, 50) == pytest.approx(50.5) and pct(xs, 99) == pytest.approx(99.01) and pct(xs, 100) == 100


def test_bench_answers_reingests_a_collection_holding_another_checkouts_corpus(tmp_path, capsys):
    # ingest keeps every root a collection was given: the same corpus from two checkouts is in it twice
    sys.path.insert(0, str(Path(__file__).parent))
    from test_rag_fakes import HashEmbedder

    from bench.bench_answers import foreign_documents
    from rag.ingest import ingest

    a, b = tmp_path / "a" / "manuals", tmp_path / "b" / "manuals"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "x.md").write_text("# X\n\nThe valve opens at 3 bar.\n")
    assert foreign_documents("bench-answers-t", a) == 0  # no collection yet
    ingest(a, embedder=HashEmbedder(), collection="bench-answers-t", progress=False)
    assert foreign_documents("bench-answers-t", a) == 0
    ingest(b, embedder=HashEmbedder(), collection="bench-answers-t", progress=False)
    assert foreign_documents("bench-answers-t", a) == 1 and foreign_documents("bench-answers-t", b) == 1
    assert "ingested afresh" in capsys.readouterr().err


def test_bench_answers_selects_questions_by_position_then_offset_and_limit():
    from bench.bench_answers import select_questions
    from edge.errors import UsageError

    qs = [f"q{i}" for i in range(10)]
    assert select_questions(qs) == qs and select_questions(qs, 8) == ["q8", "q9"] and select_questions(qs, 2, 3) == ["q2", "q3", "q4"]
    assert select_questions(qs, ids="7,0, 3") == ["q0", "q3", "q7"]  # file order, whatever order they were given in
    assert select_questions(qs, 1, 1, ids="7,0,3") == ["q3"]  # a list of ids split into jobs
    for bad, says in (("0,10", "outside"), ("2,2", "twice"), ("1,x", "not a list")):
        with pytest.raises(UsageError, match=says):
            select_questions(qs, ids=bad)


def test_bench_answers_man_corpus_is_held_out_only():
    from bench.bench_answers import CORPORA, HELDOUT, UNCOVERED, corpus_splits
    from edge.errors import UsageError

    assert CORPORA["man"][1] is None and HELDOUT["man"].is_file() and len(UNCOVERED["man"]) == 6
    assert corpus_splits("manuals,man", "both") == [("manuals", "test"), ("manuals", "heldout"), ("man", "heldout")]
    assert corpus_splits("man", "heldout") == [("man", "heldout")]
    assert corpus_splits("manuals,pydoc", "test") == [("manuals", "test"), ("pydoc", "test")]
    with pytest.raises(UsageError, match=r"corpus man is held out only.*--split heldout"):
        corpus_splits("pydoc,man", "test")
    with pytest.raises(UsageError, match="unknown corpus mans"):
        corpus_splits("mans", "heldout")
    assert corpus_splits("man,info", "both") == [("man", "heldout"), ("info", "heldout")]
    assert CORPORA["info"][1] is None and len(UNCOVERED["info"]) == 6 and len(UNCOVERED["info2"]) == 18


def test_bench_answers_own_words_set_asks_facts_its_sources_hold():
    """The blind own-words set (session 23): every expected keyword is in its expected source as the
    loader reads it (a keyword no document holds would score a right answer wrong), no fact another
    manuals set asks, and its uncovered questions are the near-domain file's."""
    import json

    from bench.bench_answers import CORPORA, HELDOUT, ROOT, UNCOVERED, corpus_splits
    from rag.eval import load_questions
    from rag.loaders import load

    manuals = ROOT / "examples" / "manuals"
    assert CORPORA["own"] == (manuals, None) and corpus_splits("own", "both") == [("own", "heldout")]
    items = load_questions(HELDOUT["own"])
    assert len(items) == 30
    texts = {p.name: load(p).text for p in manuals.iterdir()}
    for it in items:
        for kw in it.keywords:
            assert any(kw in texts[s] for s in it.expected_sources), (it.question, kw)
    taken = {kw for f in ("questions.jsonl", "questions_heldout.jsonl", "questions_paraphrased.jsonl")
             for it in load_questions(ROOT / "examples" / f) for kw in it.keywords}
    assert not [it.question for it in items if set(it.keywords) <= taken]
    near = [json.loads(x)["question"] for x in (ROOT / "examples" / "questions_uncovered_near.jsonl").read_text().splitlines()]
    assert UNCOVERED["own"] == near and len(near) == 20
