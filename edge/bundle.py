"""Engine bundles: a self-describing, relocatable directory, and its typed manifest.

    <bundle>/manifest.json        Manifest: schema, kind, model spec, Quant, profile + plan,
                                  Limits, artifacts with sha256, tool versions
    <bundle>/weights.safetensors  quantized weights (the source of truth; see edge.quant.format)
    <bundle>/tokenizer.json ...   tokenizer files
    <bundle>/*.onnx               derived graphs (model.plan is built on the device)

The manifest is the contract between build and runtime: writers (edge.build, bench/random_bundle,
test helpers) construct a `Manifest`; readers get one from `Bundle.open` and read attributes, never
`.get(...) or {}` over a dict. The runtime imports this module, never edge.build.

A bundle is written into a sibling temp dir and renamed into place only when complete, so a
killed build never leaves a half-written bundle behind. A bundle that fails its schema or
checksums is refused, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

from edge.errors import BundleError

# 2: typed manifest (limits carry the KV pool: kv_blocks x kv_block_size); version 1 (untyped
# limits) is still read: its KV pool is derived as max_batch sequences of max_context tokens.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
KINDS = ("generator", "embedder")
KV_BLOCK_SIZE = 16  # tokens per paged KV block (edge.plan.KV_BLOCK_TOKENS counts capacity in these)
KV_DTYPES = ("fp16", "int8", "fp32")


def _stat_key(p: Path) -> list[int]:
    """What changes whenever a file's bytes do: size, mtime, ctime (set by the kernel on every write and on
    every utime, so a restored mtime does not hide an edit), inode and device."""
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _memo_path(p: Path) -> Path:
    from edge.paths import home

    return home() / "cache" / "verified" / (hashlib.sha1(str(p.resolve()).encode()).hexdigest() + ".json")


def _remembered(p: Path, sha256: str) -> bool:
    """This file was hashed to `sha256` before and has not been written since (_stat_key)."""
    try:
        memo = json.loads(_memo_path(p).read_text())
        return memo["sha256"] == sha256 and memo["stat"] == _stat_key(p)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remember(p: Path, sha256: str) -> None:
    """Record a verified hash (atomically; a read-only home just goes without)."""
    try:
        m = _memo_path(p)
        m.parent.mkdir(parents=True, exist_ok=True)
        tmp = m.with_name(f".{m.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(p.resolve()), "stat": _stat_key(p), "sha256": sha256}))
        os.replace(tmp, m)
    except OSError:
        pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped the artifacts (those importable here)."""
    from importlib import metadata

    out = {}
    for dist in ("edge-rag", "numpy", "onnx", "onnxruntime", "gguf", "safetensors", "tokenizers", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---- the typed manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What the runtime allocates for a generator: written at build from the memory plan.

    max_context: longest sequence (prompt + output) per request.
    max_batch: sequences a session preallocates / the engine runs at once.
    kv_blocks x kv_block_size: the paged KV pool in tokens, shared by all sequences (the plan's
      KV budget for the profile, capped at max_batch x max_context: more could never be used).
    kv_dtype: the KV cache element type the plan sized the pool for.
    plan_max_batch: the plan's own max_batch before the session cap (None: not planned)."""

    max_context: int
    max_batch: int = 1
    kv_blocks: int = 0  # 0 in a constructor call: derived (max_batch x blocks of max_context)
    kv_block_size: int = KV_BLOCK_SIZE
    kv_dtype: str = "fp16"
    plan_max_batch: int | None = None

    def __post_init__(self):
        if self.max_context < 1 or self.max_batch < 1 or self.kv_block_size < 1:
            raise BundleError(f"manifest limits: max_context {self.max_context}, max_batch {self.max_batch}, "
                              f"kv_block_size {self.kv_block_size} must all be >= 1", fix="rebuild the bundle")
        if self.kv_dtype not in KV_DTYPES:
            raise BundleError(f"manifest limits: kv_dtype {self.kv_dtype!r} not in {KV_DTYPES}", fix="rebuild the bundle")
        if self.kv_blocks == 0:
            object.__setattr__(self, "kv_blocks", self.max_batch * self.blocks_per_sequence)
        if self.kv_blocks < self.blocks_per_sequence:
            raise BundleError(f"manifest limits: {self.kv_blocks} KV blocks cannot hold one {self.max_context}-token sequence",
                              fix="rebuild the bundle")

    @property
    def blocks_per_sequence(self) -> int:
        """KV blocks one sequence of max_context tokens needs."""
        return -(-self.max_context // self.kv_block_size)

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.kv_block_size


@dataclass(frozen=True)
class Quant:
    """How the weights were quantized. recipe: fp32 | fp16 | int8 | int4 (group_size > 0 only
    for int4); method: none | rtn | awq | awq+gptq, or the embedder's SmoothQuant description."""

    recipe: str
    group_size: int = 0
    method: str = "none"
    requested: str | None = None  # what the user asked for (`auto` resolves to recipe)
    accuracy_level: int | None = None  # ORT MatMulNBits accuracy level of model.ort.onnx
    policy: dict[str, Any] = field(default_factory=dict)  # per-module precision (edge.quant.policy)
    report: dict[str, Any] | None = None  # per-layer errors (edge.quant.report)
    awq_alphas: list[float] | None = None
    details: dict[str, Any] = field(default_factory=dict)  # recipe-specific facts (embedder int8)

    @property
    def awq(self) -> bool:
        return self.method.startswith("awq")

    @property
    def gptq(self) -> bool:
        return "gptq" in self.method


@dataclass(frozen=True)
class Artifact:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TokenizerInfo:
    files: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json")
    source: str = "hf"  # hf | gguf
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None


@dataclass(frozen=True)
class Manifest:
    """manifest.json as data. `model` is the spec dict (edge.models.spec.ModelSpec for
    generators, edge.models.bert.EncoderSpec for embedders); `plan` is edge.plan's full report."""

    kind: str
    model: dict[str, Any]
    quant: Quant
    limits: Limits | None = None  # generators only
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    profile: str | None = None
    plan: dict[str, Any] | None = None
    planned_weight_bytes: int | None = None  # the plan's weight bytes for this build's quant
    source: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    tokenizer: TokenizerInfo | None = None
    onnx: dict[str, str] = field(default_factory=dict)  # form -> file (ort, trt)
    embedder_id: str | None = None  # embedders only: identifies the vectors an index holds
    graph: dict[str, Any] | None = None  # embedders: input/output description
    relevance_gate: dict[str, Any] | None = None  # embedders: thresholds calibrated at build (edge.build.relevance)
    random_weights: bool = False  # bench/random_bundle: speed-only bundles
    build_seconds: float | None = None
    notes: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    tools: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BundleError(f"manifest kind {self.kind!r} is not one of {KINDS}", fix="rebuild the bundle")
        if self.kind == "generator" and self.limits is None:
            raise BundleError("a generator manifest needs limits", fix="rebuild the bundle")

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        if self.tokenizer is not None:
            d["tokenizer"]["files"] = list(self.tokenizer.files)
            d["tokenizer"]["eos_token_ids"] = list(self.tokenizer.eos_token_ids)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        """Parse (and upgrade a version-1) manifest; one-line BundleError on anything malformed."""
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(f"{where}: bundle schema version {version!r}, this edge-rag reads {', '.join(map(str, READABLE_VERSIONS))}",
                              fix="rebuild the bundle with this version of edge-rag")
        try:
            d = _upgrade_v1(d) if version == 1 else dict(d)
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(d) - known)
            if unknown:
                raise BundleError(f"{where}: unknown manifest keys {', '.join(unknown)}", fix="rebuild the bundle with this version of edge-rag")
            d["quant"] = Quant(**d["quant"])
            d["limits"] = Limits(**d["limits"]) if d.get("limits") else None
            d["artifacts"] = {k: Artifact(**v) for k, v in (d.get("artifacts") or {}).items()}
            if d.get("tokenizer"):
                t = dict(d["tokenizer"])
                t["files"] = tuple(t.get("files", ()))
                t["eos_token_ids"] = tuple(t.get("eos_token_ids", ()))
                d["tokenizer"] = TokenizerInfo(**t)
            d["notes"] = tuple(d.get("notes") or ())
            d["onnx"] = d.get("onnx") or {}
            return cls(**d)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})", fix="rebuild the bundle") from None


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version-1 manifests: quant/limits were free-form dicts; the KV pool was not recorded."""
    d = dict(d)
    d["schema_version"] = SCHEMA_VERSION
    q = dict(d.get("quant") or {"recipe": "fp32"})
    for k in ("awq", "gptq"):
        q.pop(k, None)  # derived from method now
    known = {f.name for f in fields(Quant)}
    q["details"] = {**q.get("details", {}), **{k: q.pop(k) for k in list(q) if k not in known}}
    d["quant"] = q
    lim = d.get("limits")
    if lim:
        d["limits"] = {k: lim[k] for k in ("max_context", "max_batch", "kv_dtype", "plan_max_batch") if k in lim}
    if d.get("kind") == "generator" and not lim:
        spec = d.get("model") or {}
        d["limits"] = {"max_context": int(min(4096, spec.get("max_position", 4096))), "max_batch": 1}
    if d.get("plan") and q.get("recipe") != "fp32":
        row = [o for o in d["plan"].get("options", []) if o.get("quant") == q.get("recipe")
               and (q.get("recipe") != "int4" or o.get("group_size") == q.get("group_size"))]
        d["planned_weight_bytes"] = int(row[0]["weight_bytes"]) if row else None
    return d


# ---- the weights file --------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's raw little-endian bytes lie in a safetensors file."""

    location: str  # file name, relative to the bundle
    offset: int
    nbytes: int
    dtype: str  # safetensors dtype: F32, F16, I8, U8, ...
    shape: tuple[int, ...]


_ST_DTYPES = {"float32": "F32", "float16": "F16", "int8": "I8", "uint8": "U8", "int32": "I32", "int64": "I64", "float64": "F64"}


def _safetensors_header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """The length-prefixed header for (name, safetensors dtype, shape, nbytes) in file order (sorted
    by name), padded so that the data starts 8-byte aligned."""
    header: dict[str, Any] = {}
    offset = 0
    for n, dtype, shape, nbytes in entries:
        header[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(tensors: dict[str, Any], path: Path) -> None:
    """The safetensors format, streamed tensor by tensor: safetensors' own save_file first copies
    every tensor into one bytes object, twice the weights in memory at the build's peak."""
    import numpy as np

    names = sorted(tensors)
    entries = [(n, _ST_DTYPES[str(tensors[n].dtype)], list(tensors[n].shape), tensors[n].nbytes) for n in names]
    with open(path, "wb") as f:
        f.write(_safetensors_header(entries))
        for n in names:
            f.write(np.ascontiguousarray(tensors[n]).reshape(-1).view(np.uint8).data)  # no copy


class WeightsSpool:
    """A safetensors file written while a build produces its tensors, so that the build holds none
    of them: `add(name, array)` appends the bytes to `<file>.spool` at once (the caller drops the
    array); `finish()` writes the header and copies the bytes over in name order, the file that
    write_safetensors writes from a dict of the same tensors, byte for byte, and removes the spool.

        add(b) add(a) ...  ->  <file>.spool: [b bytes][a bytes]...
        finish()           ->  <file>: [header a, b][a bytes][b bytes]   (64 MiB copies)
    """

    COPY_CHUNK = 64 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self.spool = self.path.with_name(self.path.name + ".spool")
        self._f = open(self.spool, "wb")
        self._at: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, spool offset, nbytes)

    def add(self, name: str, array: Any) -> None:
        import numpy as np

        if name in self._at:
            raise ValueError(f"tensor {name} written twice")
        a = np.asarray(array)
        self._at[name] = (_ST_DTYPES[str(a.dtype)], list(a.shape), self._f.tell(), a.nbytes)
        self._f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)

    def finish(self) -> dict[str, StoredTensor]:
        """Write the weights file; returns where each tensor's bytes lie in it (weights_index)."""
        self._f.close()
        names = sorted(self._at)
        buf = bytearray(self.COPY_CHUNK)
        with open(self.spool, "rb") as src, open(self.path, "wb") as dst:
            dst.write(_safetensors_header([(n, self._at[n][0], self._at[n][1], self._at[n][3]) for n in names]))
            for n in names:
                _, _, offset, left = self._at[n]
                src.seek(offset)
                while left:
                    got = src.readinto(memoryview(buf)[: min(left, len(buf))])
                    if not got:
                        raise OSError(f"{self.spool}: ended inside tensor {n}")
                    dst.write(memoryview(buf)[:got])
                    left -= got
        os.remove(self.spool)
        return weights_index(self.path)


_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class MappedWeights(Mapping):
    """name -> read-only numpy view of a tensor of a safetensors file, memory-mapped on each access:
    the pages a caller reads leave the process with the array (a graph builder that only needs a
    few tensors' values and the others' shapes never holds the file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.index = weights_index(self.path)

    def __getitem__(self, name: str):
        import numpy as np

        st = self.index[name]
        if st.nbytes == 0:
            return np.zeros(st.shape, _NP_DTYPES[st.dtype])
        return np.memmap(self.path, dtype=_NP_DTYPES[st.dtype], mode="r", offset=st.offset, shape=st.shape or (1,)).reshape(st.shape)

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def weights_index(path: Path) -> dict[str, StoredTensor]:
    """name -> StoredTensor for every tensor of a safetensors file (reads the header only)."""
    import struct

    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    base = 8 + hlen
    return {n: StoredTensor(Path(path).name, base + m["data_offsets"][0], m["data_offsets"][1] - m["data_offsets"][0], m["dtype"], tuple(m["shape"]))
            for n, m in header.items() if n != "__metadata__"}


# ---- writing -----------------------------------------------------------------------------------


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove `.OUT.partial-PID` / `.OUT.old-PID` folders left by a killed build of `out` (their
    writer process is gone). Returns what was removed."""
    out = Path(out)
    gone: list[Path] = []
    if not out.parent.is_dir():
        return gone
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its build is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


class BundleWriter:
    """Write files into `<out>.partial-<pid>`, then `commit(manifest)` checksums and renames."""

    def __init__(self, out: Path, kind: str):
        if kind not in KINDS:
            raise ValueError(kind)
        self.out = Path(out)
        self.kind = kind
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        remove_stale_partials(self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def path(self, name: str) -> Path:
        """Where to write artifact `name` before commit."""
        return self.tmp / name

    def add_file(self, name: str, src: Path) -> None:
        shutil.copyfile(src, self.tmp / name)

    def weights_spool(self, name: str = "weights.safetensors") -> WeightsSpool:
        """Write the weights file tensor by tensor as they are made (WeightsSpool.finish() gives
        the same index as write_weights)."""
        return WeightsSpool(self.tmp / name)

    def write_weights(self, tensors: dict[str, Any], name: str = "weights.safetensors") -> dict[str, "StoredTensor"]:
        """Write the weights file; returns where each tensor's bytes lie in it (graphs built after
        this reference them as external data instead of holding a copy)."""
        write_safetensors(tensors, self.tmp / name)
        return weights_index(self.tmp / name)

    def commit(self, manifest: Manifest) -> Path:
        """Checksum every file, write manifest.json last, swap the bundle into place."""
        if manifest.kind != self.kind:
            raise ValueError(f"manifest kind {manifest.kind!r} != writer kind {self.kind!r}")
        artifacts = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.tmp).as_posix()
                artifacts[rel] = Artifact(sha256_file(p), p.stat().st_size)
        full = replace(manifest, artifacts=artifacts, schema_version=SCHEMA_VERSION,
                       created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), tools=tool_versions())
        tmp_manifest = self.tmp / (MANIFEST + ".tmp")
        tmp_manifest.write_text(full.to_json())
        os.replace(tmp_manifest, self.tmp / MANIFEST)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- reading -----------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the bundle at `path` (no checksums); BundleError when absent or malformed."""
    path = Path(path).expanduser()
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: not an engine bundle (no {MANIFEST})", fix="build one with `edge-rag build`")
    try:
        d = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: corrupt manifest ({e})", fix="rebuild the bundle") from None
    if not isinstance(d, dict):
        raise BundleError(f"{mpath}: corrupt manifest (not a JSON object)", fix="rebuild the bundle")
    return Manifest.from_dict(d, str(path))


@dataclass
class Bundle:
    """An opened, verified engine bundle."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, *, kind: str | None = None, verify: bool = True) -> "Bundle":
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        if kind is not None and manifest.kind != kind:
            raise BundleError(f"{path}: is a {manifest.kind!r} bundle, expected {kind!r}")
        b = cls(path, manifest)
        if verify:
            b.verify()
        return b

    @property
    def limits(self) -> Limits:
        if self.manifest.limits is None:
            raise BundleError(f"{self.path}: a {self.manifest.kind} bundle has no generator limits")
        return self.manifest.limits

    def verify(self, names: Iterable[str] | None = None, *, remembered: bool = True) -> None:
        """Check the presence, size and sha256 of every artifact, or of `names` only (a backend
        verifies what it loads: hashing a bundle's other graphs costs ~0.5 s on every cold start).
        A file hashed before and not written since (same size, mtime, ctime, inode) is not hashed again
        unless `remembered` is False (`edge-rag verify`): a 1.5B int8 engine's 2 GB took ~1.5 s of every
        cold `ask`."""
        artifacts = self.manifest.artifacts
        if names is not None:
            artifacts = {n: artifacts[n] for n in names if n in artifacts}
        for rel, meta in artifacts.items():
            p = self.path / rel
            if not p.is_file():
                raise BundleError(f"{self.path}: missing artifact {rel}", fix="rebuild the bundle")
            if p.stat().st_size != meta.bytes:
                raise BundleError(f"{self.path}: checksum mismatch for {rel} (corrupted or modified)", fix="rebuild the bundle")
            if remembered and _remembered(p, meta.sha256):
                continue
            if sha256_file(p) != meta.sha256:
                raise BundleError(f"{self.path}: checksum mismatch for {rel} (corrupted or modified)", fix="rebuild the bundle")
            _remember(p, meta.sha256)

    def file(self, name: str) -> Path:
        if name not in self.manifest.artifacts:
            raise BundleError(f"{self.path}: bundle has no artifact {name}")
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest.artifacts

    @property
    def spec(self):
        from edge.models.spec import ModelSpec

        return ModelSpec.from_dict(self.manifest.model)

    def load_weights(self, name: str = "weights.safetensors") -> dict[str, Any]:
        """All tensors as numpy arrays (see edge.quant.format for names and layouts)."""
        from safetensors.numpy import load_file

        return load_file(str(self.file(name)))
