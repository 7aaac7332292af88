"""Deploying to a Jetson: an offline pack (engines + collection + wheelhouse + installer + systemd
unit + a checksummed manifest), its verification, the first-boot backend choice (TensorRT plan
cache, then CUDA, then ONNX Runtime) and the service that runs `serve` from an installed pack.

    manifest.py   pack.json: sha256 of every file; verify() names the first bad file (stdlib only:
                  install.sh runs it straight out of the edge-rag wheel before anything is installed)
    pack.py       edge-rag pack: collect, lay out, write the archive or a rootfs overlay
    systemd.py    the unit file, rendered from the pack's plan (MemoryMax, paths, user)
    firstboot.py  TensorRT plan cache outside the bundle; backend fallback chain with reasons
    service.py    edge-rag service: verify, choose the backend, serve, notify systemd + watchdog
"""
