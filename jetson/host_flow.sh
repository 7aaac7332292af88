#!/usr/bin/env bash
# The whole deploy flow on this machine with a host-arch pack and the DEFAULT engines (the slow,
# real-engine counterpart of tests/test_deploy.py::test_host_flow_...; run by hand, not in CI):
#   pack -> copy into a fresh dir -> install.sh with pip's network disabled -> `edge-rag service`
#   -> /health, /v1/ask, /metrics answer -> a corrupted file is refused by name.
#   usage: EDGE_RAG_HOME=/tmp/erh jetson/host_flow.sh [WORKDIR]    (needs PyPI for the pack step only)
#          ENGINE=path/to/generator-bundle to pack another generator than the default
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d /tmp/edge-rag-flow.XXXXXX)}"
PORT="${PORT:-8187}"
EDGE="${EDGE:-edge-rag}"
mkdir -p "$WORK"
say() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

say "collection: ingest examples/manuals (default embedder; built on first use)"
"$EDGE" ingest "$ROOT/examples/manuals" >/dev/null
say "pack (host target; default engines built on first use)"
t0=$(date +%s)
"$EDGE" pack --profile orin-nano-8gb ${ENGINE:+--engine "$ENGINE"} --target host --prefix "$WORK/opt/edge-rag" --port "$PORT" --out "$WORK/robot.tar"
echo "pack took $(( $(date +%s) - t0 )) s"

say "copy into a fresh dir and unpack"
mkdir -p "$WORK/fresh" && cp "$WORK/robot.tar" "$WORK/fresh/" && tar -xf "$WORK/fresh/robot.tar" -C "$WORK/fresh"

say "install.sh with pip's network disabled"
t0=$(date +%s)
env -u PYTHONPATH -u VIRTUAL_ENV PIP_NO_INDEX=1 PIP_INDEX_URL=http://127.0.0.1:9/simple \
  http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 PYTHON="$(command -v python3)" \
  sh "$WORK/fresh/edge-rag/install.sh" --prefix "$WORK/opt/edge-rag" --no-systemd
echo "install took $(( $(date +%s) - t0 )) s"

say "service starts"
chmod -R a-w "$WORK/opt/edge-rag/home" "$WORK/opt/edge-rag/engines"   # read-only, as under ProtectSystem
t0=$(date +%s)
env -u PYTHONPATH EDGE_RAG_CACHE="$WORK/cache" "$WORK/opt/edge-rag/venv/bin/edge-rag" service --pack "$WORK/opt/edge-rag" \
  > "$WORK/service.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
until curl -sf "localhost:$PORT/health" >/dev/null; do
  kill -0 $PID 2>/dev/null || { cat "$WORK/service.log"; exit 1; }
  sleep 0.5
done
echo "ready after $(( $(date +%s) - t0 )) s"
curl -s "localhost:$PORT/health"; echo
say "/v1/ask"
curl -s -H 'Content-Type: application/json' "localhost:$PORT/v1/ask" -d '{"question": "What does error E-214 mean?", "max_tokens": 48}' | head -c 600; echo
say "/metrics (excerpt)"
curl -s "localhost:$PORT/metrics" | grep -v '^#' | head -20
kill $PID; wait $PID 2>/dev/null || true
trap - EXIT
grep -E "verified|backend" "$WORK/service.log" || true

say "a corrupted file is refused by name"
chmod -R u+w "$WORK/opt/edge-rag/engines"
f="$WORK/opt/edge-rag/engines/generator/tokenizer.json"
printf ' ' >> "$f"
if env -u PYTHONPATH "$WORK/opt/edge-rag/venv/bin/edge-rag" service --pack "$WORK/opt/edge-rag" 2> "$WORK/refused.log"; then
  echo "NOT refused"; exit 1
fi
grep -o "error: .*" "$WORK/refused.log"
du -sh "$WORK/robot.tar"
