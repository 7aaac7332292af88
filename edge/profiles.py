"""Device profiles: one YAML file per device in profiles/, validated into a frozen DeviceProfile.

A profile states what the planner needs to size engines for a device: memory and what the OS
keeps, memory bandwidth per power mode (decode speed is bandwidth-bound), compute capability,
tensor/DLA cores, supported precisions, the JetPack/CUDA/TensorRT versions it targets, and the
strings that identify it on a running machine (device-tree `compatible`, CUDA device names).

A file with a missing, unknown or wrong field is refused with a ProfileError naming the file,
the field and what is allowed. Sizes in profiles are GiB (2**30 bytes); bandwidth is GB/s
(10**9 bytes/s), as data sheets state it.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from edge.errors import ProfileError, UsageError
from edge.paths import profiles_dir

GIB = 2**30
KINDS = ("jetson", "gpu", "cpu")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4_weight_only")

# ---- sizes --------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """'5.5GB' -> 5_500_000_000 bytes. GB/MB/KB (and G/M/K) are decimal, GiB/MiB/KiB (Gi/Mi/Ki)
    binary, a bare number is bytes. Raises UsageError on anything else."""
    if isinstance(text, bool):
        raise UsageError(f"not a size: {text!r}", fix="write it like 5.5GB, 512MiB or 2000000000")
    if isinstance(text, (int, float)):
        if text < 0:
            raise UsageError(f"size {text} is negative", fix="give a size >= 0")
        return int(text)
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise UsageError(
            f"not a size: {text!r}",
            fix="write it like 5.5GB, 512MiB or 2000000000 (GB/MB decimal, GiB/MiB binary)",
        )
    return int(round(float(m.group(1)) * _SIZE_UNITS[unit]))


def format_size(n: float) -> str:
    """Bytes as GiB/MiB text, e.g. '5.20 GiB'. Negative values keep their sign."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    if n >= GIB:
        return f"{sign}{n / GIB:.2f} GiB"
    if n >= 2**20:
        return f"{sign}{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{sign}{n / 2**10:.1f} KiB"
    return f"{sign}{int(n)} B"


# ---- the dataclasses ----------------------------------------------------------------------


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel power mode (or the single mode of a GPU/CPU host)."""

    name: str
    watts: float | None  # None: unconstrained (MAXN / MAXN_SUPER)
    gpu_max_mhz: int | None
    bandwidth_gbps: float  # peak memory bandwidth in this mode, 10**9 B/s

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gbps * 1e9


@dataclass(frozen=True)
class DeviceProfile:
    """A device the planner can size engines for. Built only by load_profile (validated)."""

    name: str
    display_name: str
    kind: str  # "jetson" | "gpu" | "cpu"
    memory_bytes: int  # total physical memory (the GPU's own memory for kind "gpu")
    os_reserve_bytes: int  # what the OS, carve-outs and a CUDA context keep
    unified_memory: bool  # CPU and GPU share memory (Jetson, CPU host)
    compute_capability: str | None  # "8.7" on Orin
    cuda_cores: int
    tensor_cores: int
    dla_cores: int
    precisions: tuple[str, ...]
    power_modes: tuple[PowerMode, ...]
    default_power_mode: str
    jetpack: str | None
    cuda: str | None
    tensorrt: str | None
    device_tree_compatible: tuple[str, ...]
    gpu_names: tuple[str, ...]
    sources: tuple[str, ...] = ()
    notes: str = ""
    path: str = ""

    @property
    def usable_bytes(self) -> int:
        """Memory left for engines, index and workspace before the user's own reserve."""
        return max(0, self.memory_bytes - self.os_reserve_bytes)

    def power_mode(self, name: str | None = None) -> PowerMode:
        """The named power mode (case-insensitive), or the profile's default."""
        want = name or self.default_power_mode
        for m in self.power_modes:
            if m.name.lower() == str(want).lower():
                return m
        names = [m.name for m in self.power_modes]
        close = difflib.get_close_matches(str(want), names, n=3, cutoff=0.3)
        raise ProfileError(
            f"profile '{self.name}' has no power mode '{want}'",
            fix=f"choose one of: {', '.join(names)}" + (f" (closest: {', '.join(close)})" if close else ""),
        )

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("precisions", "device_tree_compatible", "gpu_names", "sources"):
            d[k] = list(d[k])
        d["power_modes"] = [asdict(m) for m in self.power_modes]
        d["usable_bytes"] = self.usable_bytes
        return d


# ---- validation ---------------------------------------------------------------------------
# field -> (required, checker, what is allowed). A checker returns the converted value or
# raises ValueError; the loader turns that into one message naming file, field and allowed.


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError
    return v


def _opt_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)  # an unquoted `cuda: 12.6`
    return _str(v)


def _nonneg_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError
    return v


def _pos_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValueError
    return float(v)


def _nonneg_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError
    return float(v)


def _memory(v: Any) -> float | str:
    if v == "auto":
        return v
    return _pos_number(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError
    return v


def _kind(v: Any) -> str:
    if v not in KINDS:
        raise ValueError
    return v


def _cc(v: Any) -> str | None:
    if v is None:
        return None
    # A string, not a YAML float: an unquoted 8.10 would read as 8.1.
    if not isinstance(v, str) or not re.fullmatch(r"\d+\.\d+", v):
        raise ValueError
    return v


def _precisions(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or any(p not in PRECISIONS for p in v):
        raise ValueError
    return tuple(v)


def _str_list(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or any(not isinstance(s, str) or not s for s in v):
        raise ValueError
    return tuple(v)


_MODE_FIELDS = {"name", "watts", "gpu_max_mhz", "bandwidth_gbps"}


def _power_modes(v: Any) -> tuple[PowerMode, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError
    out = []
    for m in v:
        if not isinstance(m, dict) or set(m) != _MODE_FIELDS:
            raise ValueError
        watts = None if m["watts"] is None else _pos_number(m["watts"])
        mhz = None if m["gpu_max_mhz"] is None else _nonneg_int(m["gpu_max_mhz"])
        out.append(PowerMode(_str(str(m["name"])), watts, mhz, _pos_number(m["bandwidth_gbps"])))
    if len({m.name.lower() for m in out}) != len(out):
        raise ValueError
    return tuple(out)


_SOFTWARE_FIELDS = {"jetpack", "cuda", "tensorrt"}


def _software(v: Any) -> dict[str, str | None]:
    if not isinstance(v, dict) or set(v) != _SOFTWARE_FIELDS:
        raise ValueError
    return {k: _opt_str(v[k]) for k in _SOFTWARE_FIELDS}


_FIELDS: dict[str, tuple[bool, Callable[[Any], Any], str]] = {
    "name": (True, _str, "the file's name without .yaml"),
    "display_name": (True, _str, "a non-empty string"),
    "kind": (True, _kind, f"one of {', '.join(KINDS)}"),
    "memory_gib": (True, _memory, "a positive number of GiB, or 'auto' (read from this machine)"),
    "os_reserve_gib": (True, _nonneg_number, "a number of GiB >= 0, below memory_gib"),
    "unified_memory": (True, _bool, "true or false"),
    "compute_capability": (True, _cc, "a quoted 'major.minor' string like \"8.7\", or null"),
    "cuda_cores": (True, _nonneg_int, "an integer >= 0"),
    "tensor_cores": (True, _nonneg_int, "an integer >= 0"),
    "dla_cores": (True, _nonneg_int, "an integer >= 0"),
    "precisions": (True, _precisions, f"a non-empty list of: {', '.join(PRECISIONS)}"),
    "default_power_mode": (True, _str, "the name of one of power_modes"),
    "power_modes": (
        True,
        _power_modes,
        "a non-empty list of {name, watts (number or null), gpu_max_mhz (integer or null), "
        "bandwidth_gbps (number > 0)} with distinct names",
    ),
    "software": (True, _software, "a mapping with exactly jetpack, cuda, tensorrt (version strings or null)"),
    "device_tree_compatible": (True, _str_list, "a list of device-tree compatible strings (may be empty)"),
    "gpu_names": (True, _str_list, "a list of CUDA device-name substrings (may be empty)"),
    "sources": (False, _str_list, "a list of strings"),
    "notes": (False, _opt_str, "a string"),
}


def _machine_memory_bytes() -> int:
    import psutil  # runtime dependency, light

    return int(psutil.virtual_memory().total)


def parse_profile(data: Any, where: str, stem: str | None = None) -> DeviceProfile:
    """Validate a profile mapping (already loaded from YAML) into a DeviceProfile."""

    def bad(field: str, allowed: str, got: Any = None, missing: bool = False) -> ProfileError:
        what = "is missing" if missing else f"is invalid ({got!r})"
        return ProfileError(f"{where}: field '{field}' {what}", fix=f"allowed: {allowed}")

    if not isinstance(data, dict):
        raise ProfileError(f"{where}: not a mapping of fields", fix=f"fields: {', '.join(_FIELDS)}")
    unknown = sorted(set(map(str, data)) - set(_FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(_FIELDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ProfileError(f"{where}: unknown field '{unknown[0]}'{hint}", fix=f"allowed fields: {', '.join(_FIELDS)}")
    values: dict[str, Any] = {}
    for field, (required, check, allowed) in _FIELDS.items():
        if field not in data:
            if required:
                raise bad(field, allowed, missing=True)
            continue
        try:
            values[field] = check(data[field])
        except (ValueError, TypeError, KeyError):
            raise bad(field, allowed, data[field]) from None

    if stem is not None and values["name"] != stem:
        raise bad("name", f"'{stem}' (the file's name without .yaml)", values["name"])
    kind = values["kind"]
    if values["memory_gib"] == "auto" and kind != "cpu":
        raise bad("memory_gib", "a positive number of GiB ('auto' only for kind cpu)", "auto")
    memory = _machine_memory_bytes() if values["memory_gib"] == "auto" else int(values["memory_gib"] * GIB)
    reserve = int(values["os_reserve_gib"] * GIB)
    if reserve >= memory:
        raise bad("os_reserve_gib", f"a number of GiB below the memory ({memory / GIB:.2f} GiB)", values["os_reserve_gib"])
    modes = values["power_modes"]
    if values["default_power_mode"] not in {m.name for m in modes}:
        raise bad("default_power_mode", f"one of {', '.join(m.name for m in modes)}", values["default_power_mode"])
    if kind == "jetson" and not values["device_tree_compatible"]:
        raise bad("device_tree_compatible", "at least one compatible string for a jetson profile", [])
    if kind != "cpu" and values["compute_capability"] is None:
        raise bad("compute_capability", "a 'major.minor' string for jetson and gpu profiles", None)
    sw = values["software"]
    return DeviceProfile(
        name=values["name"],
        display_name=values["display_name"],
        kind=kind,
        memory_bytes=memory,
        os_reserve_bytes=reserve,
        unified_memory=values["unified_memory"],
        compute_capability=values["compute_capability"],
        cuda_cores=values["cuda_cores"],
        tensor_cores=values["tensor_cores"],
        dla_cores=values["dla_cores"],
        precisions=values["precisions"],
        power_modes=modes,
        default_power_mode=values["default_power_mode"],
        jetpack=sw["jetpack"],
        cuda=sw["cuda"],
        tensorrt=sw["tensorrt"],
        device_tree_compatible=values["device_tree_compatible"],
        gpu_names=values["gpu_names"],
        sources=values.get("sources", ()),
        notes=values.get("notes") or "",
        path=where,
    )


def load_profile_file(path: Path) -> DeviceProfile:
    """Read and validate one profile file."""
    import yaml  # runtime dependency

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({str(e).splitlines()[0]})", fix="fix the syntax; see profiles/orin-nano-8gb.yaml") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read ({e.strerror})") from None
    return parse_profile(data, str(path), stem=path.stem)


def _profile_files() -> dict[str, Path]:
    d = profiles_dir()
    if not d.is_dir():
        raise ProfileError(f"no profiles folder at {d}", fix="set EDGE_RAG_PROFILES to the folder holding the *.yaml profiles")
    return {p.stem: p for p in sorted(d.glob("*.yaml"))}


def profile_names() -> list[str]:
    """Names of the profiles on disk (files are not validated)."""
    return list(_profile_files())


def load_profile(name: str | DeviceProfile) -> DeviceProfile:
    """The validated profile `name` (a file stem in profiles/, or a path to a .yaml file)."""
    if isinstance(name, DeviceProfile):
        return name
    name = str(name)
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return load_profile_file(Path(name))
    files = _profile_files()
    if name not in files:
        close = difflib.get_close_matches(name, list(files), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ProfileError(
            f"unknown profile '{name}'",
            fix=f"{hint}known profiles: {', '.join(files)} (`edge-rag profiles` lists them)",
        )
    return load_profile_file(files[name])


_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}


def list_profiles() -> list[DeviceProfile]:
    """Every profile, validated: Jetson modules by memory, then GPU hosts, then the CPU host."""
    profiles = [load_profile_file(p) for p in _profile_files().values()]
    return sorted(profiles, key=lambda p: (_KIND_ORDER[p.kind], p.memory_bytes, p.name))


# ---- detection ----------------------------------------------------------------------------

DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")


def read_compatible(path: Path | None = None) -> list[str]:
    """The device-tree compatible strings of this machine (NUL-separated in the file)."""
    try:
        raw = Path(path or DEVICE_TREE_COMPATIBLE).read_bytes()
    except OSError:
        return []
    return [s for s in raw.decode("ascii", "replace").split("\0") if s]


def cuda_device_names() -> list[str]:
    """Names of the CUDA devices: through cupy when importable, else `nvidia-smi`; [] if none."""
    try:
        import cupy  # optional GPU binding

        n = cupy.cuda.runtime.getDeviceCount()
        names = []
        for i in range(n):
            name = cupy.cuda.runtime.getDeviceProperties(i)["name"]
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception:  # not installed, no driver, no device
        pass
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def match_compatible(compatible: list[str], profiles: list[DeviceProfile]) -> str | None:
    """The Jetson profile whose device-tree strings appear in `compatible` (board ids such as
    'nvidia,p3768-0000+p3767-0005' are matched on their module part too)."""
    items = set(compatible)
    for s in compatible:  # 'nvidia,p3768-0000+p3767-0005' -> also 'nvidia,p3767-0005'
        if "+" in s:
            vendor = s.split(",", 1)[0]
            items.update(f"{vendor},{part}" for part in s.split(",", 1)[-1].split("+"))
    for p in profiles:
        if p.kind == "jetson" and items & set(p.device_tree_compatible):
            return p.name
    return None


def match_gpu(names: list[str], profiles: list[DeviceProfile]) -> str | None:
    """The GPU profile whose name substrings match a CUDA device (longest substring wins)."""
    best: tuple[int, str] | None = None
    for dev in names:
        for p in profiles:
            for sub in p.gpu_names if p.kind == "gpu" else ():
                if sub.lower() in dev.lower() and (best is None or len(sub) > best[0]):
                    best = (len(sub), p.name)
    return best[1] if best else None


def detect_profile(*, compatible_path: Path | None = None, gpu_names: list[str] | None = None) -> str:
    """The profile that applies to this machine: $EDGE_RAG_PROFILE if set, else the Jetson module
    from the device tree, else a CUDA GPU profile if one matches, else "cpu"."""
    forced = os.environ.get("EDGE_RAG_PROFILE")
    if forced:
        return load_profile(forced).name
    profiles = list_profiles()
    name = match_compatible(read_compatible(compatible_path or DEVICE_TREE_COMPATIBLE), profiles)
    if name:
        return name
    name = match_gpu(cuda_device_names() if gpu_names is None else gpu_names, profiles)
    return name or "cpu"
