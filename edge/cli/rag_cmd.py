"""`edge-rag ingest | search | ask | eval`: documents in, answers with sources out.

Thin: parse, call rag.* / edge.runtime.host, print. Heavy imports (numpy, faiss, onnxruntime)
happen inside the commands so that `edge-rag --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from edge.cli.app import app
from rag.chunk import DEFAULT_EMBED_TOKENS, FAST_EMBED_TOKENS

MODE_HELP = "hybrid (vector + keyword, fused), vector or keyword"


EMBED_BACKEND_HELP = ("Embedder backend: auto (the GPU when cupy and an NVIDIA GPU are usable, else cpu), cpu (the native encoder "
                      "where this CPU has AVX-512 VNNI, else onnxruntime), onnxruntime or cuda")
BACKEND_HELP = ("auto, onnxruntime, native (own CPU kernels, llama-family), cuda or tensorrt (untested) for the generator; "
                "the embedder follows (cuda or cpu; native and onnxruntime: the CPU; auto and tensorrt: the GPU where usable)")


def _embedder(path: Optional[Path], collection: str | None = None, backend: str = "auto"):
    """--embedder, else the one the collection was built with, else the default (built on first use);
    on `backend` (edge.runtime.embedder.resolve_backend)."""
    from edge.runtime.embedder import Embedder

    if path is None and collection is not None:
        stored = _stored_embedder_path(collection)
        if stored is not None:
            path = stored
    if path is None:
        from edge.engines import default_embedder_bundle

        path = default_embedder_bundle(progress=True)
    return Embedder.from_bundle(Path(path), backend=backend), Path(path)


def _stored_meta(collection: str, key: str):
    """A collection's stored meta value (None where the collection or the key does not exist)."""
    from edge.paths import collection_exists, home

    if not collection_exists(collection):
        return None
    from rag.store import Store

    with Store(home() / "collections" / collection, readonly=True) as s:
        return s.get_meta(key)


def _stored_embedder_path(collection: str) -> Path | None:
    p = _stored_meta(collection, "embedder_path")
    return Path(p) if p and Path(p).exists() else None


def _collection_vectors_setting(field: str, collection: str, rebuild: bool):
    """A ChunkParams field that shapes the vectors (embed_overlap, embed_tokens) when the command line does
    not give it: what the collection was ingested with, so its vectors stay alike (--rebuild, or a new
    collection: ChunkParams' default)."""
    from rag.chunk import ChunkParams, stored_chunk_params

    stored = None if rebuild else _stored_meta(collection, "chunk_params")
    if isinstance(stored, dict):
        return stored_chunk_params(stored)[field]
    return getattr(ChunkParams, field)


def _require_collection(collection: str) -> None:
    """Fail fast (before loading any engine) when the collection was never ingested."""
    from edge.errors import missing_collection
    from edge.paths import collection_exists

    if not collection_exists(collection):
        raise missing_collection(collection)


def _echo_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
def ingest(
    path: Path = typer.Argument(..., help="Folder (or file) of .txt .md .rst .html .pdf documents"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Embedder bundle (default: all-MiniLM-L6-v2)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="Re-embed everything (e.g. after changing the embedder)"),
    max_tokens: int = typer.Option(200, "--chunk-tokens", help="Chunk size in embedder tokens"),
    overlap: int = typer.Option(40, "--overlap", help="Tokens carried over between chunks"),
    embed_overlap: Optional[bool] = typer.Option(None, "--embed-overlap/--no-embed-overlap",
                                                 help="--embed-overlap: embed the tokens a chunk carries from the previous "
                                                      "one too; --no-embed-overlap: a chunk's vector from its own span (13% "
                                                      "fewer tokens, docs/measurements.md, #15). Default: what the collection was ingested "
                                                      "with, else own spans"),
    embed_tokens: Optional[int] = typer.Option(None, "--embed-tokens",
                                               help="Embed at most this many tokens of each chunk (its head; the whole chunk "
                                                    "stays searchable by keyword and goes into prompts). 0: the embedder's limit. "
                                                    "Default: what the collection was ingested with, else "
                                                    f"{DEFAULT_EMBED_TOKENS or 'the embedder limit'}; {FAST_EMBED_TOKENS}: ingest ~1.5x faster, same hybrid recall@5, "
                                                    "lower MRR (docs/measurements.md, #15)"),
    index_memory: Optional[str] = typer.Option(None, "--index-memory",
                                                help="Memory budget for the vector index (e.g. 64MB): picks flat/HNSW/IVF-PQ"),
    backend: str = typer.Option("auto", "--backend", help=EMBED_BACKEND_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
    follow_links: bool = typer.Option(False, "--follow-links",
                                      help="Include symbolic and hard links (links leading outside PATH are refused anyway)"),
) -> None:
    """Index documents: only changed files are embedded again; deleted files are dropped.
    Symbolic links, hard links and special files are skipped unless --follow-links."""
    import logging

    from edge.paths import check_collection_name
    from rag.chunk import ChunkParams
    from rag.ingest import ingest as run_ingest

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    check_collection_name(collection)
    # bad sizes fail here, before any engine loads (the cap may come from the collection's stored meta)
    if embed_overlap is None:
        embed_overlap = _collection_vectors_setting("embed_overlap", collection, rebuild)
    embed_tokens = (_collection_vectors_setting("embed_tokens", collection, rebuild) if embed_tokens is None
                    else embed_tokens or None)  # 0: the embedder's limit
    params = ChunkParams(max_tokens, overlap, embed_overlap, embed_tokens)
    budget = None
    if index_memory:
        from edge.profiles import parse_size

        budget = parse_size(index_memory)
    # re-ingesting keeps the collection's embedder; --rebuild without --embedder goes back to the default
    emb, emb_path = _embedder(embedder, None if rebuild else collection, backend)
    rep = run_ingest(path, embedder=emb, collection=collection, rebuild=rebuild, progress=not quiet and not as_json,
                     params=params, embedder_path=str(emb_path.resolve()),
                     memory_budget=budget, follow_links=follow_links)
    if as_json:
        _echo_json(rep.to_dict())
        return
    from rich.console import Console

    from edge.textsafe import printable

    con = Console(stderr=False)
    con.print(f"collection [bold]{escape(rep.collection)}[/] generation {rep.generation}: {rep.total_documents} documents, "
              f"{rep.total_chunks} chunks, {rep.index_kind} index")
    con.print(f"  added {len(rep.added)}, updated {len(rep.updated)}, removed {len(rep.removed)}, "
              f"unchanged {rep.unchanged}; {rep.chunks_added} chunks embedded in {rep.embed_seconds:.1f} s")
    if rep.skipped:
        con.print(f"  [yellow]skipped {len(rep.skipped)} file(s):[/]")
        for p, why in rep.skipped:
            con.print(f"    {printable(p)}: {printable(why)}", markup=False, highlight=False)
    if rep.unsupported:
        con.print(f"  ignored {rep.unsupported} file(s) of unsupported types")


@app.command()
def search(
    query: str = typer.Argument(..., help="What to look for"),
    k: int = typer.Option(5, "-k", help="How many passages"),
    mode: str = typer.Option("hybrid", "--mode", help=MODE_HELP),
    collection: str = typer.Option("default", "--collection", "-c"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Embedder bundle (default: the collection's)"),
    backend: str = typer.Option("auto", "--backend", help=EMBED_BACKEND_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Show the ranked passages for a query, with scores (no generation)."""
    from rag.retrieve import Retriever

    _require_collection(collection)
    emb = None if mode == "keyword" and embedder is None else _embedder(embedder, collection, backend)[0]
    with Retriever(emb, collection) as r:
        res = r.search(query, k=k, mode=mode)
    if as_json:
        _echo_json({"query": query, "mode": mode, "relevant": res.relevant, "top_cosine": res.top_cosine,
                    "ms": res.ms, "hits": [h.to_dict() for h in res.hits]})
        return
    from rich.console import Console

    from edge.textsafe import for_terminal, printable

    con = Console()
    if not res.hits:
        con.print("no passages found")
    for i, h in enumerate(res.hits, start=1):
        c = h.chunk
        extra = []
        if h.vector_score is not None:
            extra.append(f"cos {h.vector_score:.3f}")
        if h.keyword_score is not None:
            extra.append(f"bm25 {h.keyword_score:.2f}")
        con.print(f"[bold][{i}][/] {escape(printable(c.path))}, {c.location()}  score {h.score:.4f} ({', '.join(extra) or '-'})",
                  highlight=False)
        if c.heading:
            con.print(f"    [dim]{escape(for_terminal(c.heading))}[/]", highlight=False)
        snippet = " ".join(for_terminal(c.text).split())
        con.print(f"    {snippet[:300]}{'...' if len(snippet) > 300 else ''}", markup=False, highlight=False)
    if not res.relevant:
        con.print("[yellow]nothing here looks relevant to the query[/]")


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question"),
    k: int = typer.Option(5, "-k", help="Passages to retrieve"),
    mode: str = typer.Option("hybrid", "--mode", help=MODE_HELP),
    collection: str = typer.Option("default", "--collection", "-c"),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Generator bundle (default: the default answer model, built on first use)"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Embedder bundle (default: the collection's)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Answer budget in tokens (default: the model's answer recipe)"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print answer, sources and timings as JSON"),
    memory: bool = typer.Option(False, "--memory", help="Also print the memory each engine uses"),
) -> None:
    """Answer a question from the ingested documents; streams the answer, then the sources."""
    import time

    t0 = time.perf_counter()
    from edge.runtime.host import EdgeRuntime

    _require_collection(collection)
    emb, _ = _embedder(embedder, collection, backend)
    rt = EdgeRuntime(collection, embedder=emb, generator_path=engine, backend=backend, progress=not as_json)
    t_loaded = time.perf_counter()

    from edge.textsafe import for_terminal

    def out(piece: str) -> None:
        sys.stdout.write(for_terminal(piece))  # the model may echo a document's escape sequences
        sys.stdout.flush()

    with rt:
        ans = rt.ask(question, k=k, mode=mode, max_tokens=max_tokens, on_token=None if as_json else out)
        ans.timings["startup_ms"] = (t_loaded - t0) * 1e3
        if as_json:
            d = ans.to_dict()
            if memory:
                d["memory"] = rt.memory_report()
            _echo_json(d)
            return
        from rag.ask import format_sources

        sys.stdout.write("\n")
        if not ans.covered and ans.notes:  # why: "no passage mentions logrotate" / "nothing relevant retrieved"
            sys.stderr.write(f"({for_terminal(ans.notes[0])})\n")
        src = for_terminal(format_sources(ans))
        if src:
            sys.stdout.write("\n" + src + "\n")
        t = ans.timings
        load = f", engine load {t['load_ms'] / 1e3:.1f} s (not in first token or total)" if t.get("load_ms") else ""
        sys.stderr.write(f"[retrieval {t.get('retrieval_ms', 0):.0f} ms, first token {t.get('ttft_ms', 0):.0f} ms, "
                         f"total {t.get('total_ms', 0):.0f} ms{load}]\n")
        if memory:
            _echo_json(rt.memory_report())


@app.command("eval")
def eval_(
    questions: Path = typer.Argument(..., help="questions.jsonl: question, expected_source, expected_keywords"),
    k: int = typer.Option(5, "-k", help="Passages retrieved per question"),
    mode: str = typer.Option("hybrid", "--mode", help=MODE_HELP + ", or all"),
    collection: str = typer.Option("default", "--collection", "-c"),
    no_generate: bool = typer.Option(False, "--no-generate", help="Score retrieval only"),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Generator bundle"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Embedder bundle (default: the collection's)"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Answer budget (default: the model's answer recipe)"),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per mode (with per-question details)"),
) -> None:
    """Retrieval recall@k and MRR; with generation, how often answers hold the expected keywords."""
    from rag.eval import evaluate, load_questions
    from rag.retrieve import MODES, Retriever

    items = load_questions(questions)
    _require_collection(collection)
    modes = list(MODES) if mode == "all" else [mode]
    emb, _ = _embedder(embedder, collection, backend)
    gen = None
    if not no_generate:
        from edge.runtime.generator import Generator

        if engine is None:
            from edge.engines import default_generator_bundle

            engine = default_generator_bundle(progress=True)
        gen = Generator.from_bundle(engine, backend=backend)
    with Retriever(emb, collection) as r:
        for m in modes:
            res = evaluate(items, r, k=k, mode=m, generator=gen, max_tokens=max_tokens)
            if as_json:
                sys.stdout.write(json.dumps(res.to_dict(details=True), default=str) + "\n")
                continue
            line = f"{m:8s} n={res.n} recall@{k}={res.recall_at_k:.3f} MRR={res.mrr:.3f} " \
                   f"retrieval {res.retrieval_ms_mean:.1f} ms/question"
            if res.keyword_hit_rate is not None:
                line += f" keyword-hit={res.keyword_hit_rate:.3f} keyword-recall={res.keyword_recall:.3f}"
            print(line)
            for row in res.per_question:
                if row["rank"] is None:
                    print(f"  missed: {row['question']} (expected {', '.join(row['expected'])})")
