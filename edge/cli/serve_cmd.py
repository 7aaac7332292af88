"""`edge-rag serve`: the engines and a collection behind a local HTTP API (edge.serve.app).

Thin: parse, open the runtime (engines built on first use, as `ask` does), hand the app to uvicorn.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from edge.cli.app import app
from edge.cli.rag_cmd import BACKEND_HELP


def _check_port(host: str, port: int) -> None:
    """A clear error before loading any engine when the address is taken or invalid."""
    from edge.errors import UsageError

    if not 0 < port < 65536:
        raise UsageError(f"invalid port {port}", fix="use 1-65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                         fix="pick another --port, or stop what is using it") from None


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8080, "--port", "-p"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection /v1/ask answers from"),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Generator bundle (default: the default answer model, built on first use)"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Embedder bundle (default: the collection's)"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for onnxruntime (default: all cores)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGE_RAG_API_KEY", show_envvar=True,
                                          help="Require `Authorization: Bearer KEY` on every request"),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key"),
    max_body: str = typer.Option("1MB", "--max-body", help="Largest request body (larger: 413)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap on max_tokens per request (default: the engine's context)"),
    max_embed_inputs: int = typer.Option(256, "--max-embed-inputs", help="Most texts in one /v1/embeddings request"),
    max_embed_chars: int = typer.Option(16384, "--max-embed-chars", help="Longest text in /v1/embeddings"),
    deadline: float = typer.Option(300.0, "--deadline", help="Seconds a request may generate before it is cut"),
) -> None:
    """Serve the engines over HTTP: OpenAI-compatible /v1/chat/completions, /v1/completions,
    /v1/embeddings and /v1/models, plus /v1/ask (answer + sources from the collection) and /health.
    Loopback only unless --api-key (or --insecure) is given; requests run one at a time."""
    from edge.cli.rag_cmd import _embedder
    from edge.paths import collection_exists
    from edge.profiles import parse_size
    from edge.serve.guard import Limits, check_bind

    from edge.cli.generate_cmd import _generator

    from edge.paths import check_collection_name

    check_collection_name(collection)
    warning = check_bind(host, api_key, insecure)
    asked = {"max_body_bytes": int(parse_size(max_body)), "max_tokens": max_tokens, "max_embed_inputs": max_embed_inputs,
             "max_embed_chars": max_embed_chars, "deadline_s": deadline, "api_key": api_key or None}
    Limits(**{k: v for k, v in asked.items() if v is not None}).check()  # a bad limit fails before loading engines
    _check_port(host, port)
    emb, _ = _embedder(embedder, collection, backend)  # verifies every artifact of the embedder bundle
    gen = _generator(engine, backend, threads)  # loaded (or built) before accepting requests
    if getattr(gen, "bundle", None) is not None:
        gen.bundle.verify()  # every artifact, not only the graph the backend loaded
    if max_tokens is not None:
        asked["max_tokens"] = min(max_tokens, int(gen.max_context))
    limits = Limits.for_generator(gen, **asked)  # max_tokens defaults to the engine's context
    if collection_exists(collection):
        from edge.runtime.host import EdgeRuntime

        rt = EdgeRuntime(collection, embedder=emb, generator=gen, backend=backend)
    else:
        from edge.serve.app import ModelsRuntime

        print(f"note: collection '{collection}' does not exist: /v1/ask answers 400 until you run "
              f"`edge-rag ingest` and restart", file=sys.stderr)
        rt = ModelsRuntime(emb, collection, gen)
    import uvicorn

    from edge.serve.app import create_app

    if warning:
        print(warning, file=sys.stderr)
    print(f"edge-rag serving on http://{host}:{port}  (collection '{collection}'; max_tokens <= {limits.max_tokens}, "
          f"body <= {limits.max_body_bytes} bytes, deadline {limits.deadline_s:g} s; Ctrl-C stops)", file=sys.stderr)
    # Ctrl-C / SIGTERM: stop within a few seconds even with a stream open
    uvicorn.run(create_app(rt, limits), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
