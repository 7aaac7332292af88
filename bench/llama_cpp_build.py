"""Build llama.cpp's own C++ peers (llama-server, llama-bench, llama-batched-bench).

    python bench/llama_cpp_build.py [--cuda] [--jobs 2] [--version 0.3.36] [--print-bin]

The source is the llama.cpp tree vendored in the llama-cpp-python sdist of the version installed
in this environment (so the C++ peer and the in-process peer are the same llama.cpp), fetched with
`pip download --no-binary llama-cpp-python --no-deps llama-cpp-python==<version>`. Binaries are cached outside
the repository and reused:

    ~/.cache/edge-rag-peers/<version>-<cpu|cuda>/bin/{llama-server,llama-bench,llama-batched-bench}
    ~/.cache/edge-rag-peers/<version>-<cpu|cuda>/build.json   (flags, seconds, compiler)

($EDGE_RAG_PEERS_CACHE moves the root.) A second call returns at once. CPU builds are static,
`GGML_NATIVE=ON` (the peer gets this CPU's best kernels, as a user building it would), no curl, no
OpenSSL, no web UI. `--cuda` adds `GGML_CUDA=ON` for sm_90 (`--cuda-arch` to change), for the GPU
device machine. The build runs under `nice`; `--jobs` defaults to 2 (the shared dev machine).

From Python: `from bench.llama_cpp_build import ensure_binaries; bin_dir = ensure_binaries()`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TARGETS = ("llama-server", "llama-bench", "llama-batched-bench")


def cache_root() -> Path:
    return Path(os.environ.get("EDGE_RAG_PEERS_CACHE", Path.home() / ".cache" / "edge-rag-peers"))


def installed_version() -> str:
    """The llama-cpp-python version of this environment (the in-process peer's llama.cpp)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise SystemExit("llama-cpp-python is not installed here: pass --version X.Y.Z "
                         "(or `pip install -e .[dev]`)") from None


def flavour_dir(version: str, cuda: bool) -> Path:
    return cache_root() / f"{version}-{'cuda' if cuda else 'cpu'}"


def binaries_ready(version: str, cuda: bool, targets: tuple[str, ...] = TARGETS) -> Path | None:
    """The bin/ directory when the binaries and the build stamp exist, else None."""
    d = flavour_dir(version, cuda)
    bin_dir = d / "bin"
    if (d / "build.json").is_file() and all(os.access(bin_dir / t, os.X_OK) for t in targets):
        return bin_dir
    return None


def _sdist(version: str) -> Path:
    """llama_cpp_python-<version>.tar.gz in the cache, downloaded once with pip."""
    sd = cache_root() / "sdist"
    sd.mkdir(parents=True, exist_ok=True)
    found = sorted(sd.glob(f"llama_cpp_python-{version}.tar.gz")) + sorted(sd.glob(f"llama-cpp-python-{version}.tar.gz"))
    if found:
        return found[0]
    # --no-binary for this package only: with `:all:` pip also builds scikit-build-core (the
    # sdist's metadata backend) from source, which failed here
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
           f"llama-cpp-python=={version}", "-d", str(sd)]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    found = sorted(sd.glob(f"llama*cpp*python-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no llama-cpp-python {version} sdist in {sd}")
    return found[0]


def _extract_llama_cpp(archive: Path, dest: Path) -> Path:
    """Extract the llama.cpp tree (the sdist's vendor/llama.cpp, or a tarball whose top folder is
    llama.cpp/, as `--src` takes); returns its source root."""
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        vendored = any("/vendor/llama.cpp/" in n for n in names)
        members = [m for m in tar.getmembers()
                   if ("/vendor/llama.cpp/" in m.name + "/") or (not vendored and m.name.split("/")[0] == "llama.cpp")]
        if not members:
            raise SystemExit(f"{archive} holds no llama.cpp tree")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kw)
    if not vendored:
        return dest / "llama.cpp"
    (top,) = {m.name.split("/")[0] for m in members}
    return dest / top / "vendor" / "llama.cpp"


def cmake_flags(cuda: bool, cuda_arch: str, extra: list[str] = ()) -> list[str]:
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",           # self-contained binaries: the cache dir can move
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no npm, no network: no web UI
    ]
    if shutil.which("ninja"):
        flags += ["-G", "Ninja"]
    if cuda:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    return flags + list(extra)  # later -D values win


def ensure_binaries(version: str | None = None, cuda: bool = False, jobs: int = 2,
                    cuda_arch: str = "90", keep_build: bool = False, src: Path | None = None,
                    extra: list[str] = (), nice: bool = True, targets: tuple[str, ...] = TARGETS) -> Path:
    """Build (once) and return the bin/ directory holding `targets`.

    src: a llama.cpp source (a folder, or a .tar.gz with the sdist's tree or a top llama.cpp/
    folder) instead of pip-downloading the sdist; extra: more cmake flags (they win). With
    -DBUILD_SHARED_LIBS=ON in extra the shared libraries are copied next to the binaries (run
    them with LD_LIBRARY_PATH=bin/): a CUDA build's static binaries are ~85 MB each."""
    version = version or installed_version()
    ready = binaries_ready(version, cuda, targets)
    if ready:
        return ready
    for tool in ("cmake", "c++") + (("nvcc",) if cuda else ()):
        if not shutil.which(tool):
            raise SystemExit(f"`{tool}` is not on PATH: needed to build llama.cpp"
                             + (" (--cuda needs the CUDA toolkit)" if tool == "nvcc" else ""))
    out = flavour_dir(version, cuda)
    out.mkdir(parents=True, exist_ok=True)
    archive = src if src is not None else _sdist(version)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="build-", dir=out))
    try:
        tree = Path(archive) if Path(archive).is_dir() else _extract_llama_cpp(Path(archive), work / "src")
        build = work / "build"
        nice = ["nice", "-n", "10"] if nice and shutil.which("nice") else []
        cfg = ["cmake", "-S", str(tree), "-B", str(build)] + cmake_flags(cuda, cuda_arch, extra)
        print("+", " ".join(cfg), file=sys.stderr)
        subprocess.run(nice + cfg, check=True)
        bld = ["cmake", "--build", str(build), "-j", str(jobs), "--target", *targets]
        print("+", " ".join(bld), file=sys.stderr)
        subprocess.run(nice + bld, check=True)
        tmp_bin = work / "bin"
        tmp_bin.mkdir()
        for t in targets:
            (found,) = [p for p in build.rglob(t) if p.is_file() and os.access(p, os.X_OK)][:1] or [None]
            if found is None:
                raise SystemExit(f"the build produced no {t} under {build}")
            shutil.copy2(found, tmp_bin / t)
        for lib in build.rglob("*.so*"):  # shared builds (BUILD_SHARED_LIBS=ON)
            if (tmp_bin / lib.name).exists() or (tmp_bin / lib.name).is_symlink():
                continue
            if lib.is_file() and not lib.is_symlink():
                shutil.copy2(lib, tmp_bin / lib.name)
            elif lib.is_symlink():
                (tmp_bin / lib.name).symlink_to(os.readlink(lib))
        # bin/ appears whole or not at all; the stamp is written last
        if (out / "bin").exists():
            shutil.rmtree(out / "bin")
        tmp_bin.rename(out / "bin")
        stamp = {
            "llama_cpp_python": version, "flavour": "cuda" if cuda else "cpu",
            "cuda_arch": cuda_arch if cuda else None, "cmake_flags": cmake_flags(cuda, cuda_arch, extra),
            "targets": list(targets), "jobs": jobs, "build_s": round(time.time() - t0, 1), "source": Path(archive).name,
            "host": platform.node(), "host_cpus": os.cpu_count(),
            "compiler": subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (out / "build.json").write_text(json.dumps(stamp, indent=1) + "\n")
        print(json.dumps(stamp), file=sys.stderr)
    finally:
        if not keep_build:
            shutil.rmtree(work, ignore_errors=True)
    return out / "bin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    ap.add_argument("--cuda", action="store_true", help="build with GGML_CUDA (GPU device machine)")
    ap.add_argument("--cuda-arch", default="90", help="CMAKE_CUDA_ARCHITECTURES for --cuda (default 90)")
    ap.add_argument("--jobs", "-j", type=int, default=2)
    ap.add_argument("--keep-build", action="store_true", help="keep the build tree (debugging)")
    ap.add_argument("--src", type=Path, help="llama.cpp source folder or .tar.gz (default: pip download the sdist)")
    ap.add_argument("--cmake-extra", default="", help="more cmake flags, space-separated (they win)")
    ap.add_argument("--no-nice", action="store_true", help="build at normal priority (a machine of your own)")
    ap.add_argument("--print-bin", action="store_true", help="print only the bin/ directory")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated build targets (default: %(default)s)")
    a = ap.parse_args()
    bin_dir = ensure_binaries(a.version, a.cuda, a.jobs, a.cuda_arch, a.keep_build, a.src,
                              a.cmake_extra.split(), not a.no_nice, tuple(a.targets.split(",")))
    if a.print_bin:
        print(bin_dir)
    else:
        print(json.dumps({"bin": str(bin_dir), **json.loads((bin_dir.parent / "build.json").read_text())}))


if __name__ == "__main__":
    main()
