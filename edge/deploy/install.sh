#!/bin/sh
# edge-rag offline installer, written into every pack by `edge-rag pack`. Needs python3 (with venv)
# and nothing from the network: every wheel is in wheels/, pip runs with --no-index.
#
#   sudo ./install.sh                  check every file, install into @PACK_PREFIX@, enable the service
#   ./install.sh --prefix DIR --no-systemd     the same into DIR, without systemd (tests, containers)
#   ./install.sh --in-place            the pack already sits at its prefix (a flashed rootfs overlay)
#
# Steps: 1. check every file against pack.json (sha256; a bad file is named and nothing is installed)
#        2. copy the pack to the prefix   3. venv + pip install --no-index from wheels/
#        4. check the installed copy again   5. (root, systemd) user, unit, enable --now
set -eu
SRC=$(cd "$(dirname "$0")" && pwd)
PACK_PREFIX="@PACK_PREFIX@"
PREFIX="$PACK_PREFIX"
SYSTEMD=auto
IN_PLACE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift ;;
    --no-systemd) SYSTEMD=no ;;
    --in-place) IN_PLACE=1; PREFIX="$SRC" ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
WHEEL=$(ls "$SRC"/wheels/edge_rag-*.whl 2>/dev/null | head -n 1)
if [ -z "$WHEEL" ]; then echo "install.sh: no edge_rag wheel in $SRC/wheels" >&2; exit 1; fi

echo "[1/5] checking $SRC against pack.json"
# The checker runs straight out of the edge-rag wheel (a zip on PYTHONPATH): nothing installed yet.
PYTHONPATH="$WHEEL" "$PY" -m edge.deploy.manifest verify "$SRC"

if [ "$IN_PLACE" = 0 ] && [ "$SRC" != "$PREFIX" ]; then
  echo "[2/5] copying to $PREFIX"
  mkdir -p "$PREFIX"
  cp -R "$SRC"/. "$PREFIX"/
else
  echo "[2/5] installing in place at $PREFIX"
fi

echo "[3/5] installing the wheels offline into $PREFIX/venv"
VENV_OPTS=""
# JetPack ships TensorRT's Python bindings in the system site-packages: the venv must see them.
if [ -e /etc/nv_tegra_release ]; then VENV_OPTS="--system-site-packages"; fi
"$PY" -m venv $VENV_OPTS "$PREFIX/venv"
PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PREFIX/venv/bin/python" -m pip install -q --no-index \
  --no-cache-dir --find-links "$PREFIX/wheels" "$PREFIX"/wheels/*.whl

echo "[4/5] checking the installed copy"
"$PREFIX/venv/bin/edge-rag" verify-pack "$PREFIX"

if [ "$SYSTEMD" != no ] && [ "$(id -u)" = 0 ] && command -v systemctl >/dev/null 2>&1; then
  echo "[5/5] systemd: user edge-rag, unit edge-rag.service"
  id edge-rag >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --groups video edge-rag
  sed "s#$PACK_PREFIX#$PREFIX#g" "$PREFIX/systemd/edge-rag.service" > /etc/systemd/system/edge-rag.service
  systemctl daemon-reload
  systemctl enable --now edge-rag.service
  echo "done: systemctl status edge-rag; journalctl -u edge-rag -f"
else
  echo "[5/5] systemd skipped; start the service with:"
  echo "  EDGE_RAG_HOME=$PREFIX/home $PREFIX/venv/bin/edge-rag service --pack $PREFIX"
fi
