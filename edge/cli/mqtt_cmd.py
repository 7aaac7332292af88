"""`edge-rag mqtt`: answer questions from an MQTT broker (edge.serve.mqtt).

Thin: parse, open the runtime (engines built on first use, as `ask` does), run the bridge until
Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from edge.cli.app import app
from edge.cli.rag_cmd import BACKEND_HELP


@app.command()
def mqtt(
    broker: str = typer.Option(..., "--broker", "-b", help="HOST[:PORT] of the MQTT broker (1883, or 8883 with TLS)"),
    topic_prefix: str = typer.Option("edge-rag", "--topic-prefix", help="Questions on PREFIX/ask, answers on PREFIX/answer/<id>"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection the questions are answered from"),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Generator bundle (default: the default answer model, built on first use)"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Embedder bundle (default: the collection's)"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for onnxruntime (default: all cores)"),
    workers: int = typer.Option(4, "--workers", help="Questions answered at once (the engine batches them)"),
    username: Optional[str] = typer.Option(None, "--username", "-u", help="Broker user name"),
    password: Optional[str] = typer.Option(None, "--password", "-P",
                                           help="Broker password (or $EDGE_RAG_MQTT_PASSWORD, which ps cannot show)"),
    tls: bool = typer.Option(False, "--tls", help="Connect with TLS (the system's CAs unless --cafile)"),
    cafile: Optional[Path] = typer.Option(None, "--cafile", help="CA certificate(s) to trust (implies --tls)"),
    certfile: Optional[Path] = typer.Option(None, "--certfile", help="Client certificate (implies --tls)"),
    keyfile: Optional[Path] = typer.Option(None, "--keyfile", help="Client certificate's key"),
    insecure: bool = typer.Option(False, "--insecure", help="TLS without checking the broker's host name"),
    client_id: Optional[str] = typer.Option(None, "--client-id", help="MQTT client id (default: edge-rag-<random>)"),
) -> None:
    """Answer questions published to PREFIX/ask (JSON: question, k, max_tokens) with streamed tokens
    and the final answer on the MQTT 5 response topic (with its correlation data), or on
    PREFIX/answer/<id>. Reconnects by itself."""
    from edge.errors import UsageError

    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        raise UsageError("the MQTT bridge needs paho-mqtt", fix="pip install 'edge-rag[mqtt]'") from None
    from edge.serve.mqtt import MqttBridge, TlsOptions, parse_broker, serve_until_signal

    use_tls = tls or cafile is not None or certfile is not None
    for f in (cafile, certfile, keyfile):
        if f is not None and not f.is_file():
            raise UsageError(f"{f}: no such file")
    if keyfile is not None and certfile is None:
        raise UsageError("--keyfile needs --certfile")
    host, port = parse_broker(broker, use_tls)
    password = password if password is not None else os.environ.get("EDGE_RAG_MQTT_PASSWORD")
    if password is not None and username is None:
        raise UsageError("a password needs --username")

    from edge.cli.generate_cmd import _generator
    from edge.cli.rag_cmd import _embedder, _require_collection
    from edge.runtime.host import EdgeRuntime

    _require_collection(collection)
    emb, _ = _embedder(embedder, collection, backend)
    gen = _generator(engine, backend, threads)  # loaded (or built) before taking questions
    rt = EdgeRuntime(collection, embedder=emb, generator=gen, backend=backend)
    tls_opts = TlsOptions(str(cafile) if cafile else None, str(certfile) if certfile else None,
                          str(keyfile) if keyfile else None, insecure) if use_tls else None
    bridge = MqttBridge(rt, host, port, prefix=topic_prefix, username=username, password=password, tls=tls_opts,
                        client_id=client_id, workers=workers)
    import logging

    logging.basicConfig(level=logging.INFO, format="edge-rag mqtt: %(message)s", stream=sys.stderr)
    print(f"edge-rag mqtt: {'mqtts' if use_tls else 'mqtt'}://{host}:{port}, questions on {topic_prefix}/ask "
          f"(collection '{collection}'; Ctrl-C stops)", file=sys.stderr)
    try:
        serve_until_signal(bridge)
    finally:
        rt.close()
