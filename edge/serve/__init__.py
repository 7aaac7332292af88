"""Local HTTP API: OpenAI-compatible chat / completions / embeddings plus the RAG `ask`.

    edge-rag serve --port 8080                 # engines and collection as `edge-rag ask` uses them
    curl localhost:8080/v1/chat/completions -H 'content-type: application/json' -d '{"messages": [{"role": "user", "content": "hi"}]}'

See edge.serve.app for the routes. One request runs on the engines at a time (the runtime is
single-sequence); others wait their turn.
"""

from edge.serve.app import create_app

__all__ = ["create_app"]
