"""Loaders and chunking: headings, locations, offsets, token limits, bad files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_rag_fakes import HashEmbedder  # noqa: E402

from edge.errors import UsageError  # noqa: E402
from rag.chunk import ChunkParams, Chunker  # noqa: E402
from rag.loaders import LOADERS, LoadError, load, text_blocks  # noqa: E402


def make_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal valid PDF with one text line per page (Helvetica), correct xref offsets."""
    objs: list[bytes] = []
    n_pages = len(pages)
    # 1 catalog, 2 pages, 3 font, then (page, content) pairs
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n_pages))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    out = b"%PDF-1.4\n"
    offsets = []
    for i, o in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{off:010d} 00000 n \n".encode() for off in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


MD = """# Pump manual

Intro paragraph.

## Errors

### E-214

Error E-214 means low coolant pressure.
Check the hose.

## Care
Clean the filter.
"""


def test_markdown_headings_lines_and_offsets(tmp_path):
    p = tmp_path / "m.md"
    p.write_text(MD)
    doc = load(p)
    heads = [(b.heading_level, b.text) for b in doc.blocks if b.heading_level]
    assert heads == [(1, "Pump manual"), (2, "Errors"), (3, "E-214"), (2, "Care")]
    para = next(b for b in doc.blocks if b.text.startswith("Error E-214"))
    assert (para.loc_start, para.loc_end) == (9, 10)
    assert doc.text[para.char_start:para.char_end] == para.text
    chunks = Chunker(HashEmbedder().count_tokens).chunk(doc)
    by_head = {c.heading: c for c in chunks}
    assert set(by_head) == {"Pump manual", "Pump manual > Errors > E-214", "Pump manual > Care"}
    c = by_head["Pump manual > Errors > E-214"]
    assert (c.loc_start, c.loc_end) == (9, 10)
    assert MD[c.char_start:c.char_end] == c.text
    # a chunk never spans two sections
    assert all("Clean" not in c.text for c in chunks if "E-214" in c.heading)


def test_rst_and_txt_underlined_titles(tmp_path):
    rst = tmp_path / "a.rst"
    rst.write_text("=====\nTitle\n=====\n\nSection\n-------\n\nBody text here.\n\nSub\n~~~\n\nMore.\n")
    doc = load(rst)
    assert [(b.heading_level, b.text) for b in doc.blocks if b.heading_level] == [(1, "Title"), (2, "Section"), (3, "Sub")]
    txt = tmp_path / "b.txt"
    txt.write_text("HEADER\n\nSYMPTOM 1: robot stops\n----------------------\n  Check 1. the field.\n")
    doc = load(txt)
    assert [b.text for b in doc.blocks if b.heading_level] == ["SYMPTOM 1: robot stops"]
    assert next(b for b in doc.blocks if "Check 1" in b.text).loc_start == 5


def test_html_keeps_headings_and_source_lines(tmp_path):
    p = tmp_path / "s.html"
    p.write_text("<html><head><title>x</title><style>p{}</style></head><body>\n<h1>Safety</h1>\n"
                 "<p>Never ride\n the robot.</p>\n<ul><li>One</li><li>Two &amp; three</li></ul>\n"
                 "<h2>E-Stop</h2>\n<p>Press the red button.</p><script>var x=1;</script></body></html>\n")
    doc = load(p)
    assert [(b.heading_level, b.text) for b in doc.blocks if b.heading_level] == [(1, "Safety"), (2, "E-Stop")]
    texts = [b.text for b in doc.blocks]
    assert "Never ride\nthe robot." in texts and "Two & three" in texts
    assert not any("var x" in t or "p{}" in t for t in texts)
    red = next(b for b in doc.blocks if "red button" in b.text)
    assert red.loc_start == 7  # the source line of <p>Press ...
    chunks = Chunker(HashEmbedder().count_tokens).chunk(doc)
    assert next(c for c in chunks if "red button" in c.text).heading == "Safety > E-Stop"


def test_html_table_keeps_rows_and_columns(tmp_path):
    # one block per table, one line per row: a value stays beside its row's name and under its column
    p = tmp_path / "t.html"
    p.write_text("<html><body>\n<h2>Fields</h2>\n<p>Before.</p>\n<table>\n"
                 "  <tr><th>Field set</th><th>Protective field</th></tr>\n"
                 "  <tr><td>F3 <em>standard</em></td><td>1.1 m</td></tr>\n"
                 "  <tr><td>F4 | highway</td><td><p>1.5 m</p><p>(front)</p></td></tr>\n"
                 "</table>\n<p>After.</p>\n</body></html>\n")
    doc = load(p)
    table = next(b for b in doc.blocks if "F4" in b.text)
    assert table.text.split("\n") == ["| Field set | Protective field |", "| --- | --- |",
                                      "| F3 standard | 1.1 m |", "| F4 / highway | 1.5 m (front) |"]
    assert (table.loc_start, table.loc_end) == (4, 8)
    assert [b.text for b in doc.blocks if not b.heading_level] == ["Before.", table.text, "After."]
    c = next(c for c in Chunker(HashEmbedder().count_tokens).chunk(doc) if "F4" in c.text)
    assert "| F4 / highway | 1.5 m (front) |" in c.text and c.heading == "Fields"


def test_html_table_without_header_or_closing_tags(tmp_path):
    p = tmp_path / "u.html"
    p.write_text("<table><tr><td>a<td>b<tr><td>c<td>d</table><p>x</p><table><tr><td>open")
    assert [b.text for b in load(p).blocks] == ["| a | b |\n| c | d |", "x", "| open |"]


def test_pdf_pages_kept(tmp_path):
    p = make_pdf(tmp_path / "g.pdf", ["Page one talks about docking.", "Page two: error E-500 overheating."])
    doc = load(p)
    assert doc.unit == "page"
    b = next(b for b in doc.blocks if "E-500" in b.text)
    assert (b.loc_start, b.loc_end) == (2, 2)
    # small pages pack into one chunk spanning pages 1-2; with tiny chunks page 2 stands alone
    c = next(c for c in Chunker(HashEmbedder().count_tokens).chunk(doc) if "E-500" in c.text)
    assert (c.loc_start, c.loc_end) == (1, 2)
    c = next(c for c in Chunker(HashEmbedder().count_tokens, ChunkParams(8, 0)).chunk(doc) if "E-500" in c.text)
    assert (c.loc_start, c.loc_end) == (2, 2)


def test_bad_files_raise_loaderror(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.md").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "corrupt.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    for name, why in [("bin.txt", "binary"), ("latin.md", "UTF-8"), ("corrupt.pdf", "PDF")]:
        with pytest.raises(LoadError, match=why):
            load(tmp_path / name)


def test_encrypted_pdf_is_refused(tmp_path):
    import pypdf

    src = make_pdf(tmp_path / "plain.pdf", ["secret text"])
    w = pypdf.PdfWriter(clone_from=str(src))
    w.encrypt(user_password="hunter2", owner_password="owner")
    enc = tmp_path / "enc.pdf"
    with open(enc, "wb") as f:
        w.write(f)
    with pytest.raises(LoadError, match="encrypted"):
        load(enc)


def test_extension_hook(tmp_path, monkeypatch):
    monkeypatch.setitem(LOADERS, ".log", lambda p: p.read_text().upper())
    p = tmp_path / "x.log"
    p.write_text("first\n\nsecond line\n")
    doc = load(p)
    assert [b.text for b in doc.blocks] == ["FIRST", "SECOND LINE"]
    assert doc.blocks[1].loc_start == 3


def test_chunks_respect_token_limit_and_overlap():
    emb = HashEmbedder()
    words = [f"w{i}" for i in range(1000)]
    # 20 paragraphs of 50 words each, and one giant sentence-free paragraph of 500 words
    paras = [" ".join(words[i:i + 50]) + "." for i in range(0, 1000, 50)]
    text = "\n\n".join(paras) + "\n\n" + " ".join(words[:500])
    doc = text_blocks(Path("t.txt"), text)
    params = ChunkParams(max_tokens=120, overlap=60)
    chunks = Chunker(emb.count_tokens, params).chunk(doc)
    assert all(emb.count_tokens(c.text) - 2 <= params.max_tokens for c in chunks)
    for c in chunks:
        assert text[c.char_start:c.char_end] == c.text
    # consecutive paragraph chunks share their overlap paragraph
    assert chunks[1].text.split("\n\n")[0] == chunks[0].text.split("\n\n")[-1]
    # the giant paragraph is cut into word windows covering all of it
    tail = [c for c in chunks if c.char_start >= text.rindex("\n\n")]
    assert len(tail) >= 5 and tail[-1].text.endswith("w499")
    # every paragraph appears in some chunk
    for p in paras:
        assert any(p in c.text for c in chunks)


def test_overlap_never_becomes_a_chunk_of_its_own():
    emb = HashEmbedder()
    intro = "Intro sentence one two three four five six seven eight nine ten."
    lead = "Causes in order:"
    big = " ".join(f"x{i}" for i in range(99)) + "."  # 99 tokens: no room for the 3-token lead
    text = f"{intro}\n\n{lead}\n\n{big}\n"
    doc = text_blocks(Path("t.txt"), text)
    chunks = Chunker(emb.count_tokens, ChunkParams(max_tokens=100, overlap=20)).chunk(doc)
    assert [c.text for c in chunks] == [f"{intro}\n\n{lead}", big]
    # where it fits, the overlap is carried
    small = " ".join(f"y{i}" for i in range(90)) + "."
    doc = text_blocks(Path("t.txt"), f"{intro}\n\n{lead}\n\n{small}\n")
    chunks = Chunker(emb.count_tokens, ChunkParams(max_tokens=100, overlap=20)).chunk(doc)
    assert [c.text for c in chunks] == [f"{intro}\n\n{lead}", f"{lead}\n\n{small}"]


def test_a_chunk_knows_where_its_own_span_starts_after_the_overlap():
    emb = HashEmbedder()
    paras = [" ".join(f"p{k}w{i}" for i in range(30)) + "." for k in range(8)]  # 32 tokens each
    text = "\n\n".join(paras)
    doc = text_blocks(Path("t.txt"), text)
    chunks = Chunker(emb.count_tokens, ChunkParams(max_tokens=100, overlap=40)).chunk(doc)
    assert len(chunks) >= 3
    assert chunks[0].own_start == chunks[0].char_start  # nothing carried into the first
    for a, b in zip(chunks, chunks[1:]):
        assert b.char_start < a.char_end  # b carries a's last paragraph ...
        assert b.own_start == a.char_end + 2  # ... and its own span starts after it ("\n\n")
        assert b.embed_text("t", overlap=False) == "t\n" + text[b.own_start:b.char_end]
        assert b.embed_text("t") == "t\n" + b.text
    # the own spans tile the document: every paragraph is embedded exactly once
    own = [c.embed_text(overlap=False) for c in chunks]
    assert ["\n\n".join(own).split("\n\n").count(p) for p in paras] == [1] * len(paras)
    with pytest.raises(UsageError):
        ChunkParams(embed_overlap="no")


def test_chunker_counting_ahead_in_batches_cuts_the_same_chunks(tmp_path):
    """count_many (the embedder's batch count) is a speed-up only: the same chunks, far fewer calls."""
    calls = {"one": 0, "many": 0}

    def one(text):
        calls["one"] += 1
        return HashEmbedder().count_tokens(text)

    def many(texts):
        calls["many"] += 1
        return [HashEmbedder().count_tokens(t) for t in texts]

    long_par = " ".join(f"Sentence {i} says the pump P-{i} runs at {i * 10} rpm." for i in range(60))
    src = tmp_path / "m.md"
    src.write_text("# Pumps\n\n" + "\n\n".join(f"Paragraph {k}: the valve V-{k} opens at {k} bar." for k in range(40))
                   + "\n\n## Long\n\n" + long_par + "\n")
    doc = load(src)
    params = ChunkParams(60, 12)
    plain = Chunker(one, params).chunk(doc)
    n_plain, calls["one"] = calls["one"], 0
    ahead = Chunker(one, params, many).chunk(doc)
    assert [(c.text, c.char_start, c.char_end, c.n_tokens, c.own_start) for c in ahead] == \
           [(c.text, c.char_start, c.char_end, c.n_tokens, c.own_start) for c in plain]
    assert len(plain) > 3
    assert calls["many"] >= 1 and calls["one"] < n_plain // 4

