"""Deploy: the pack (layout, manifest, corruption refused by name, rootfs overlay), the systemd unit,
the first-boot backend chain with TensorRT absent, the TensorRT plan cache, /metrics, doctor's
power-mode check and `edge-rag monitor`. The whole host-arch flow (pip download, install.sh with
pip's network disabled, the service answering) is the slow test at the end."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tiny import make_tiny_bundle, make_tiny_embedder_bundle, tiny_hf_model  # noqa: E402

from edge.deploy.manifest import PackError, verify_pack  # noqa: E402
from edge.paths import REPO_ROOT  # noqa: E402

MANUAL = "# Controller manual\n\n## Error E-214\n\nE-214 means the coolant pressure sensor reads below 0.8 bar.\n"
# Orin Nano JetPack 6 line quoted in tests/test_board.py (source cited there)
NANO_LINE = ("06-18-2025 11:25:24 RAM 3452/7620MB (lfb 25x4MB) SWAP 1518/16384MB (cached 174MB) "
             "CPU [1%@1420,2%@1420,0%@1420,2%@1420,2%@729,1%@729] GR3D_FREQ 0% cpu@50.031C soc2@49.031C "
             "soc0@50C gpu@49.031C tj@50.25C soc1@50.25C VDD_IN 4824mW/4824mW VDD_CPU_GPU_CV 518mW/518mW "
             "VDD_SOC 1475mW/1475mW")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-engines")
    gen = make_tiny_bundle(root / "gen", tiny_hf_model("llama", seed=3, max_position=2048), "fp32", forms=("ort",),
                           max_context=2048, max_batch=1)
    emb = make_tiny_embedder_bundle(root / "emb")
    return gen, emb


@pytest.fixture
def collection(engines, edge_home, tmp_path):
    from edge.runtime.embedder import Embedder
    from rag.ingest import ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "controller.md").write_text(MANUAL)
    ingest(docs, embedder=Embedder.from_bundle(engines[1], threads=1), progress=False, embedder_path=str(engines[1]))
    return "default"


def fake_wheelhouse(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "edge_rag-0.1.0-py3-none-any.whl").write_bytes(b"PK fake wheel for layout tests")
    return d


def unpack(tar: Path, dest: Path) -> Path:
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="tar") if sys.version_info >= (3, 12) else t.extractall(dest)
    return dest / "edge-rag"


def test_pack_layout_manifest_and_corruption_refused_by_name(engines, collection, tmp_path):
    from edge.deploy.pack import build_pack

    gen, emb = engines
    r = build_pack(profile="orin-nano-8gb", out=tmp_path / "robot.tar", engine=gen, embedder=emb,
                   collection=collection, target="host", wheelhouse=fake_wheelhouse(tmp_path / "wh"))
    assert r.out.is_file() and r.bytes == r.out.stat().st_size and r.memory_max_bytes > 384 << 20
    root = unpack(r.out, tmp_path / "x")
    m = verify_pack(root)
    for f in ("install.sh", "README.txt", "systemd/edge-rag.service", "systemd/edge-rag-install.service",
              "engines/generator/manifest.json", "engines/generator/model.ort.onnx", "engines/embedder/manifest.json",
              "home/collections/default/store.sqlite", "home/collections/default/vectors.faiss",
              "wheels/edge_rag-0.1.0-py3-none-any.whl"):
        assert f in m["files"], f
    assert m["profile"] == "orin-nano-8gb" and m["power_mode"] == "MAXN_SUPER" and m["collection"] == "default"
    assert os.access(root / "install.sh", os.X_OK) and "@PACK_PREFIX@" not in (root / "install.sh").read_text()
    # the store opens read-only from a read-only folder: rollback journal, no -wal / -shm beside it
    db = sqlite3.connect(f"file:{root / 'home/collections/default/store.sqlite'}?mode=ro", uri=True)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    db.close()
    assert sorted(p.name for p in (root / "home/collections/default").iterdir()) == ["store.sqlite", "vectors.faiss"]
    unit = (root / "systemd/edge-rag.service").read_text()
    assert f"MemoryMax={-(-r.memory_max_bytes // 2**20)}M" in unit

    victim = root / "engines/generator/model.ort.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(PackError, match=r"checksum mismatch for engines/generator/model\.ort\.onnx"):
        verify_pack(root)
    # install.sh's check: stdlib only, run as a module, names the file and exits 1
    p = subprocess.run([sys.executable, "-m", "edge.deploy.manifest", "verify", str(root)], capture_output=True, text=True,
                       cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert p.returncode == 1 and "engines/generator/model.ort.onnx" in p.stderr
    victim.unlink()
    with pytest.raises(PackError, match="missing file engines/generator/model.ort.onnx"):
        verify_pack(root)


def test_service_command_refuses_a_bad_pack_and_an_open_bind_without_key(engines, tmp_path):
    from edge.deploy.pack import build_pack

    r = build_pack(profile="orin-nano-8gb", out=tmp_path / "robot.tar", engine=engines[0], embedder=engines[1],
                   collection=None, target="host", wheelhouse=fake_wheelhouse(tmp_path / "wh"))
    root = unpack(r.out, tmp_path / "x")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "EDGE_RAG_CACHE": str(tmp_path / "cache")}
    p = _run_cli(["service", "--pack", str(root), "--host", "0.0.0.0"], env)
    assert p.returncode == 2 and "without authentication" in p.stderr and "--api-key" in p.stderr
    (root / "engines/embedder/tokenizer.json").write_text("{}")
    p = _run_cli(["service", "--pack", str(root)], env)
    assert p.returncode == 1 and "checksum mismatch for engines/embedder/tokenizer.json" in p.stderr
    p = _run_cli(["verify-pack", str(root)], env)
    assert p.returncode == 1 and "engines/embedder/tokenizer.json" in p.stderr


def test_pack_refuses_a_missing_collection_and_a_bad_out(engines, tmp_path):
    from edge.deploy.pack import build_pack
    from edge.errors import EdgeRagError, UsageError

    with pytest.raises(EdgeRagError, match="collection 'nope' does not exist"):
        build_pack(profile="orin-nano-8gb", out=tmp_path / "r.tar", engine=engines[0], embedder=engines[1],
                   collection="nope", target="host", wheelhouse=fake_wheelhouse(tmp_path / "wh"))
    with pytest.raises(UsageError, match="tar archive"):
        build_pack(profile="orin-nano-8gb", out=tmp_path / "r.zip", engine=engines[0], embedder=engines[1],
                   collection=None, target="host", wheelhouse=fake_wheelhouse(tmp_path / "wh"))


def test_rootfs_overlay_file_list(engines, tmp_path):
    from edge.deploy.pack import build_pack, overlay_files

    overlay = tmp_path / "rootfs"
    build_pack(profile="orin-nx-16gb", out=None, engine=engines[0], embedder=engines[1], collection=None,
               target="host", wheelhouse=fake_wheelhouse(tmp_path / "wh"), rootfs_overlay=overlay)
    files = overlay_files(overlay)
    assert "etc/systemd/system/edge-rag.service" in files
    assert "etc/systemd/system/multi-user.target.wants/edge-rag.service -> /etc/systemd/system/edge-rag.service" in files
    assert "etc/systemd/system/multi-user.target.wants/edge-rag-install.service -> /etc/systemd/system/edge-rag-install.service" in files
    assert "usr/lib/sysusers.d/edge-rag.conf" in files
    assert "opt/edge-rag/pack.json" in files and "opt/edge-rag/engines/generator/model.ort.onnx" in files
    verify_pack(overlay / "opt/edge-rag")
    install_unit = (overlay / "etc/systemd/system/edge-rag-install.service").read_text()
    assert "ExecStart=/opt/edge-rag/install.sh --in-place --no-systemd" in install_unit


# ---- the systemd unit ---------------------------------------------------------------------


def _unit_sections(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read_string(text)
    return cp


def test_shipped_unit_is_the_rendering_and_has_the_protections():
    from edge.deploy.systemd import UnitConfig, render_unit

    text = render_unit(UnitConfig())
    assert (REPO_ROOT / "jetson/systemd/edge-rag.service").read_text() == text  # one definition
    s = _unit_sections(text)["Service"]
    assert s["Type"] == "notify" and s["Restart"] == "on-failure" and s["User"] == "edge-rag"
    assert s["ProtectSystem"] == "strict" and s["ReadWritePaths"] == "/var/cache/edge-rag"
    assert s["MemoryMax"] == "2048M" and int(s["WatchdogSec"]) > 0
    assert s["StandardOutput"] == "journal" and s["ExecStart"].startswith("/opt/edge-rag/venv/bin/edge-rag service --pack /opt/edge-rag")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed (apt-get install systemd)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    from edge.deploy.systemd import UnitConfig, render_unit

    # verify checks that ExecStart exists: point the unit at a stand-in prefix
    prefix = tmp_path / "opt"
    (prefix / "venv/bin").mkdir(parents=True)
    exe = prefix / "venv/bin/edge-rag"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "edge-rag.service"
    unit.write_text(render_unit(UnitConfig(prefix=str(prefix))).replace("User=edge-rag\nGroup=edge-rag\n", ""))
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [ln for ln in (p.stdout + p.stderr).splitlines() if "edge-rag.service" in ln and "Unknown" in ln]
    assert not problems, p.stdout + p.stderr


# ---- first boot: backend chain and the TensorRT plan cache -----------------------------------


def test_backend_chain_without_tensorrt_falls_back_with_reasons(engines, caplog, monkeypatch):
    from edge.deploy.firstboot import open_generator

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, as here
    monkeypatch.setenv("EDGE_RAG_NO_GPU", "1")
    caplog.set_level("INFO", logger="edge.deploy")
    gen, choice = open_generator(engines[0])
    assert choice.backend == "onnxruntime" and gen.session is not None
    assert "TensorRT is not importable" in choice.skipped["tensorrt"]
    assert "cuda" in choice.skipped
    text = caplog.text
    assert "backend tensorrt unavailable: TensorRT is not importable" in text and "backend onnxruntime loaded" in text


def test_backend_chain_a_failing_tensorrt_build_is_logged_and_skipped(engines, caplog, monkeypatch, tmp_path):
    """TensorRT importable but the session fails (here: a stand-in module without a GPU): the reason
    is logged, CUDA is tried, ONNX Runtime serves. Nothing is written into the bundle."""
    from edge.deploy.firstboot import open_generator

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setenv("EDGE_RAG_NO_GPU", "1")
    monkeypatch.setenv("EDGE_RAG_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in Path(engines[0]).iterdir())
    caplog.set_level("INFO", logger="edge.deploy")
    gen, choice = open_generator(engines[0])
    assert choice.backend == "onnxruntime"
    assert choice.skipped["tensorrt"].startswith("AttributeError")  # the stand-in has no tensorrt API
    assert "backend tensorrt unavailable: AttributeError" in caplog.text
    assert sorted(p.name for p in Path(engines[0]).iterdir()) == before


def test_plan_cache_builds_outside_the_bundle_and_rebuilds_on_change(engines, tmp_path):
    from edge.bundle import Bundle
    from edge.runtime.trt_cache import ensure_plan

    bundle = Bundle.open(engines[0], kind="generator")
    before = {p.name: p.stat().st_mtime_ns for p in bundle.path.iterdir()}
    builds = []

    def fake_build(bundle_path: Path, out: Path) -> Path:
        builds.append(out)
        out.write_bytes(b"plan for " + str(len(builds)).encode())
        return out

    cache = tmp_path / "cache"
    p1 = ensure_plan(bundle, trt_version="10.3.0", device="Orin sm_87", cache=cache, build=fake_build)
    assert p1.is_file() and cache in p1.parents and len(builds) == 1
    assert ensure_plan(bundle, trt_version="10.3.0", device="Orin sm_87", cache=cache, build=fake_build) == p1
    assert len(builds) == 1  # cached
    p2 = ensure_plan(bundle, trt_version="10.7.0", device="Orin sm_87", cache=cache, build=fake_build)
    assert p2 != p1 and len(builds) == 2  # a TensorRT upgrade gets its own plan
    p1.write_bytes(b"corrupted")
    assert ensure_plan(bundle, trt_version="10.3.0", device="Orin sm_87", cache=cache, build=fake_build) == p1
    assert len(builds) == 3 and p1.read_bytes() == b"plan for 3"  # a plan failing its checksum is rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in bundle.path.iterdir()} == before  # the bundle untouched


# ---- /metrics ------------------------------------------------------------------------------


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_metrics_scrape(engines, tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from edge.runtime.generator import Generator
    from edge.serve.app import ModelsRuntime, create_app

    # a Jetson's sysfs, as a fixture tree: one thermal zone, one INA3221 rail
    z = tmp_path / "sys/class/thermal/thermal_zone0"
    z.mkdir(parents=True)
    (z / "type").write_text("tj-thermal\n")
    (z / "temp").write_text("50250\n")
    hw = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hw.mkdir(parents=True)
    for f, v in (("in1_label", "VDD_IN"), ("in1_input", "5000"), ("curr1_input", "965")):
        (hw / f).write_text(v + "\n")
    import edge.serve.metrics as metrics_mod

    real = metrics_mod.ServeMetrics.__init__
    monkeypatch.setattr(metrics_mod.ServeMetrics, "__init__",
                        lambda self, rt, sysfs_root="/": real(self, rt, sysfs_root=str(tmp_path)))
    gen = Generator.from_bundle(engines[0], backend="onnxruntime")
    with TestClient(create_app(ModelsRuntime(None, "default", gen))) as c:
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        m = c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain; version=0.0.4")
    t = m.text
    assert _sample(t, "edge_rag_generated_tokens_total") >= usage["completion_tokens"] > 0  # the engine's counter
    assert 'edge_rag_requests_total{route="/v1/completions"} 1' in t
    assert _sample(t, "edge_rag_requests_waiting") == 0 and _sample(t, "edge_rag_requests_running") == 0
    assert _sample(t, "edge_rag_kv_blocks_total") > 0 and _sample(t, "edge_rag_kv_blocks_used") >= 0
    assert 'edge_rag_temperature_celsius{sensor="tj"} 50.25' in t
    assert 'edge_rag_power_milliwatts{rail="VDD_IN"} 4825' in t
    assert _sample(t, "edge_rag_process_resident_bytes") > 10 << 20
    # the engine's queue as Engine.stats() reports it
    rt = ModelsRuntime(None, "default", gen)
    rt.engine = types.SimpleNamespace(stats=lambda: {"waiting": 2, "running": 1, "kv_blocks_used": 7, "kv_blocks_total": 64,
                                                     "tokens_generated": 30, "busy_s": 0.5})
    with TestClient(create_app(rt)) as c:
        t2 = c.get("/metrics").text
    assert _sample(t2, "edge_rag_requests_waiting") == 2 and _sample(t2, "edge_rag_kv_blocks_used") == 7
    assert _sample(t2, "edge_rag_tokens_per_busy_second") == 60
    for line in t.splitlines():  # every line is a comment or `name{labels} value`
        assert line.startswith("# ") or line.startswith("edge_rag_"), line


# ---- doctor and monitor on a stand-in Jetson ---------------------------------------------------


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    p = bin_dir / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)


def _run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from edge.cli import main; sys.exit(main(sys.argv[1:]))", *args],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_doctor_warns_when_the_live_power_mode_is_not_the_profiles(tmp_path):
    _fake_tool(tmp_path / "bin", "nvpmodel", "printf 'NVPM WARN: fan mode is not set!\\nNV Power Mode: 15W\\n1\\n'\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "EDGE_RAG_PROFILE": "orin-nano-8gb",
           "PYTHONPATH": str(REPO_ROOT), "EDGE_RAG_NO_GPU": "1"}
    p = _run_cli(["doctor", "--json"], env)
    assert p.returncode == 0, p.stderr
    pm = json.loads(p.stdout)["power_mode"]
    assert pm["live"] == "15W" and pm["live_id"] == 1 and pm["profile_mode"] == "MAXN_SUPER" and pm["match"] is False
    p = _run_cli(["doctor"], env)
    assert "power mode" in p.stdout and "warning: power mode 15W is live" in p.stdout


def test_monitor_reads_tegrastats(tmp_path):
    _fake_tool(tmp_path / "bin", "tegrastats", f"while true; do echo '{NANO_LINE}'; sleep 0.05; done\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO_ROOT)}
    p = _run_cli(["monitor", "--count", "2", "--json", "--interval", "0.05"], env)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["source"] == "tegrastats"
    assert rows[0]["power_mw"]["VDD_IN"] == 4824 and rows[0]["temps_c"]["tj"] == 50.25
    p = _run_cli(["monitor", "--count", "1", "--interval", "0.05"], env)
    assert "RAM 3452/7620 MB" in p.stdout and "VDD_IN=4824mW" in p.stdout


# ---- slow: a wheel install finds its profiles; the whole host-arch flow ------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_with_shared_deps(venv: Path) -> Path:
    """A fresh venv whose site-packages comes first, with this venv's packages behind it (a .pth
    path line: the editable edge-rag's own .pth there is not processed)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    shared = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_shared_deps.pth").write_text("\n".join(shared) + "\n")
    return site


def test_a_wheel_build_with_too_old_setuptools_is_one_line(tmp_path, monkeypatch):
    """pyproject.toml's SPDX license needs setuptools >= 77, and pack builds without isolation: an older one
    (a venv's bundled 65) is named with its fix, not a pip traceback."""
    import importlib.metadata

    from edge.deploy.pack import build_edge_wheel
    from edge.errors import UsageError

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "65.5.0")
    with pytest.raises(UsageError, match="setuptools >= 77 .* has 65.5.0") as e:
        build_edge_wheel(tmp_path / "wh")
    assert "pip install 'setuptools>=77'" in e.value.fix and not (tmp_path / "wh").exists()


@pytest.mark.slow
def test_wheel_install_finds_the_profiles(tmp_path):
    from edge.deploy.pack import build_edge_wheel

    wheel = build_edge_wheel(tmp_path / "wh")
    site = _venv_with_shared_deps(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True)
    py = tmp_path / "venv/bin/python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGE_RAG_PROFILES")}
    code = ("import edge, edge.paths, sys; from edge.cli import main; print(edge.__file__); "
            "sys.exit(main(['profiles', '--json']))")
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    first, rest = p.stdout.split("\n", 1)
    assert first.startswith(str(site)), first  # the installed wheel, not the checkout
    names = {x["name"] for x in json.loads(rest)}
    assert {"orin-nano-8gb", "agx-orin-64gb", "cpu"} <= names


@pytest.mark.slow
def test_host_flow_pack_copy_install_offline_serve_and_refuse_a_corrupted_file(engines, collection, tmp_path):
    """pack (host wheels from PyPI) -> copy into a fresh dir -> install.sh with pip's network
    disabled -> `edge-rag service` starts -> /health, /v1/ask, /metrics answer -> a corrupted file
    stops the next start with its name."""
    import urllib.request

    from edge.deploy.pack import build_pack

    gen, emb = engines
    r = build_pack(profile="orin-nano-8gb", out=tmp_path / "robot.tar", engine=gen, embedder=emb,
                   collection=collection, target="host", prefix=str(tmp_path / "opt/edge-rag"))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy2(r.out, fresh / "robot.tar")
    src = unpack(fresh / "robot.tar", fresh)
    prefix = tmp_path / "opt/edge-rag"
    offline = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "EDGE_RAG_HOME")}
    offline.update(PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple", http_proxy="http://127.0.0.1:9",
                   https_proxy="http://127.0.0.1:9", PIP_RETRIES="0", PIP_TIMEOUT="2",
                   PYTHON=shutil.which("python3") or "python3", HOME=str(tmp_path / "home"))
    p = subprocess.run(["sh", str(src / "install.sh"), "--prefix", str(prefix), "--no-systemd"], capture_output=True,
                       text=True, env=offline, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "files verified" in p.stdout
    port = _free_port()
    svc_env = {**offline, "EDGE_RAG_CACHE": str(tmp_path / "cache")}
    # read-only like ProtectSystem=strict: the service must not write into its pack
    subprocess.run(["chmod", "-R", "a-w", str(prefix / "home"), str(prefix / "engines")], check=True)
    proc = subprocess.Popen([str(prefix / "venv/bin/edge-rag"), "service", "--pack", str(prefix), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=svc_env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    health = json.loads(resp.read())
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
                time.sleep(0.5)
        assert health["status"] == "ok" and health["collection"] == "default"
        req = urllib.request.Request(base + "/v1/ask", data=json.dumps({"question": "What does E-214 mean?", "max_tokens": 8}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            ans = json.loads(resp.read())
        assert ans["sources"] and "controller.md" in json.dumps(ans["sources"])
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            assert 'edge_rag_backend_info{backend="onnxruntime"} 1' in resp.read().decode()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "backend tensorrt unavailable" in out and "verified" in out
    subprocess.run(["chmod", "-R", "u+w", str(prefix / "home"), str(prefix / "engines")], check=True)
    victim = prefix / "home/collections/default/vectors.faiss"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    p = subprocess.run([str(prefix / "venv/bin/edge-rag"), "service", "--pack", str(prefix), "--port", str(port)],
                       capture_output=True, text=True, env=svc_env, timeout=60)
    assert p.returncode != 0
    assert "checksum mismatch for home/collections/default/vectors.faiss" in p.stderr
