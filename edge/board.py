"""Board awareness on a Jetson: `tegrastats` lines, `nvpmodel -q`, and the sysfs files both read.

    parse_tegrastats(line) -> TegraStats     RAM, swap, per-core CPU load and clock, GPU (GR3D) load
                                             and clocks, EMC, temperatures, power rails
    parse_nvpmodel(text)   -> NvpMode        the live power mode: name and id
    power_mode_check(live, profile)          the live mode against the profile's (what the plan assumed)
    read_thermal() / read_power_rails()      the same temperatures and rails straight from sysfs
                                             (no subprocess, no root: what /metrics scrapes)

tegrastats changed its format between JetPack releases; the parser takes every form quoted in
tests/test_board.py (JetPack 5 and 6, Orin Nano / NX / AGX):
    JetPack 5 (L4T r35): CPU@44.562C ... tj@44.343C, GR3D_FREQ 0%@[0,0], rails `NAME 2340mW/2340mW`
    JetPack 6 (L4T r36): cpu@50.031C gpu@49.031C tj@50.25C, GR3D_FREQ 0% or 0%@[305]
    older (JetPack 4):   rails `NAME 14025/14416` without the unit, GR3D_FREQ 0%@76
A sensor that reads -256C is absent (JetPack 5 prints CV0@-256C on modules without it): dropped.
Fields a line lacks are None / empty; a line with neither RAM nor a rail is refused (ValueError).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

# ---- tegrastats -------------------------------------------------------------------------------

_TIME = re.compile(r"^(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB(?: \(lfb (\d+)x(\d+)([kKM]B)\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_GR3D = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# `VDD_IN 4824mW/4824mW` (JetPack 5/6) or `VDD_IN 14025/14416` (JetPack 4): current / average mW
_RAIL = re.compile(r"\b((?:VDD|VIN|POM|NC|VDDQ)[A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?\b")
ABSENT_SENSOR_C = -256.0


@dataclass
class CpuCore:
    load_pct: int | None  # None: the core is offline ('off')
    freq_mhz: int | None


@dataclass
class TegraStats:
    """One tegrastats line. Memory in MB as tegrastats prints it (MiB), power in mW."""

    time: str | None = None
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    swap_cached_mb: int | None = None
    cpus: list[CpuCore] = field(default_factory=list)
    gpu_load_pct: int | None = None
    gpu_freq_mhz: list[int] = field(default_factory=list)  # one per GPC where printed
    emc_load_pct: int | None = None
    emc_freq_mhz: int | None = None
    temps_c: dict[str, float] = field(default_factory=dict)  # lower-case sensor name -> Celsius
    power_mw: dict[str, int] = field(default_factory=dict)  # rail -> instantaneous mW
    power_avg_mw: dict[str, int] = field(default_factory=dict)  # rail -> average since tegrastats started

    @property
    def cpu_load_pct(self) -> float | None:
        """Mean load of the online cores."""
        loads = [c.load_pct for c in self.cpus if c.load_pct is not None]
        return sum(loads) / len(loads) if loads else None

    @property
    def total_power_mw(self) -> int | None:
        """The module's input power: VDD_IN (Orin Nano/NX), VIN_SYS_5V0 (AGX Orin), POM_5V_IN (Nano)."""
        for rail in ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN"):
            if rail in self.power_mw:
                return self.power_mw[rail]
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_load_pct"] = self.cpu_load_pct
        d["total_power_mw"] = self.total_power_mw
        return d


def parse_tegrastats(line: str) -> TegraStats:
    """One line of `tegrastats` output -> TegraStats (see the module docstring for the forms)."""
    s = TegraStats()
    text = line.strip()
    if m := _TIME.match(text):
        s.time = m.group(1)
    if m := _RAM.search(text):
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(text):
        s.swap_used_mb, s.swap_total_mb = int(m.group(1)), int(m.group(2))
        s.swap_cached_mb = int(m.group(3)) if m.group(3) else None
    if m := _CPU.search(text):
        shared_freq = int(m.group(2)) if m.group(2) else None  # old form: CPU [3%,5%]@1036
        for core in m.group(1).split(","):
            core = core.strip()
            if core == "off":
                s.cpus.append(CpuCore(None, None))
            elif c := _CORE.match(core):
                s.cpus.append(CpuCore(int(c.group(1)), int(c.group(2)) if c.group(2) else shared_freq))
    if m := _GR3D.search(text):
        s.gpu_load_pct = int(m.group(1)) if m.group(1) else None
        s.gpu_freq_mhz = [int(f) for f in m.group(2).split(",") if f] if m.group(2) else []
    if m := _EMC.search(text):
        s.emc_load_pct = int(m.group(1))
        s.emc_freq_mhz = int(m.group(2)) if m.group(2) else None
    for name, value in _TEMP.findall(text):
        v = float(value)
        if v > ABSENT_SENSOR_C:
            s.temps_c[name.lower()] = v
    for rail, cur, avg in _RAIL.findall(text):
        s.power_mw[rail] = int(cur)
        s.power_avg_mw[rail] = int(avg)
    if s.ram_total_mb is None and not s.power_mw:
        raise ValueError(f"not a tegrastats line: {line[:80]!r}")
    return s


def tegrastats_lines(interval_ms: int = 1000, exe: str | None = None) -> Iterator[str]:
    """Lines from a running `tegrastats --interval MS` (stopped when the iterator is closed)."""
    exe = exe or shutil.which("tegrastats")
    if not exe:
        raise FileNotFoundError("tegrastats")
    proc = subprocess.Popen([exe, "--interval", str(int(interval_ms))], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                yield line
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- nvpmodel ---------------------------------------------------------------------------------

_NVP_MODE = re.compile(r"^NV Power Mode:\s*(\S+)\s*$")


@dataclass(frozen=True)
class NvpMode:
    name: str
    id: int | None


def parse_nvpmodel(text: str) -> NvpMode:
    """`nvpmodel -q` output -> the live mode. The tool prints `NV Power Mode: NAME` and the id on
    the next line, possibly after `NVPM WARN:` / `NVPM VERB:` lines (ignored)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "NV Power Mode:" in ln:
            m = _NVP_MODE.match(ln[ln.index("NV Power Mode:"):])
            if not m:
                break
            mode_id = None
            for nxt in lines[i + 1:]:
                if nxt.startswith("NVPM"):
                    continue
                mode_id = int(nxt) if nxt.isdigit() else None
                break
            return NvpMode(m.group(1), mode_id)
    raise ValueError(f"no 'NV Power Mode:' line in nvpmodel output: {text[:80]!r}")


def query_nvpmodel(exe: str | None = None, timeout: float = 10) -> NvpMode | None:
    """The live power mode from `nvpmodel -q`; None where nvpmodel is absent or fails."""
    exe = exe or shutil.which("nvpmodel")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return parse_nvpmodel(out.stdout + "\n" + out.stderr)
    except ValueError:
        return None


def _mode_key(name: str) -> str:
    """'MODE_30W' and '30W', 'maxn_super' and 'MAXN_SUPER' name the same mode."""
    key = name.strip().upper()
    return key[len("MODE_"):] if key.startswith("MODE_") else key


def power_mode_check(live: NvpMode | None, profile) -> dict[str, Any]:
    """The live power mode against the profile's default (the mode its plan and bandwidth assume).
    {"live", "profile_mode", "match": bool | None, "warning": str | None}; match None: not known."""
    want = profile.default_power_mode
    out: dict[str, Any] = {"live": None if live is None else live.name, "live_id": None if live is None else live.id,
                           "profile": profile.name, "profile_mode": want, "match": None, "warning": None}
    if live is None:
        return out
    out["match"] = _mode_key(live.name) == _mode_key(want)
    if not out["match"]:
        known = {_mode_key(m.name): m for m in profile.power_modes}
        planned = profile.power_mode(want)
        got = known.get(_mode_key(live.name))
        slower = (f"; memory bandwidth {got.bandwidth_gbps:g} GB/s instead of {planned.bandwidth_gbps:g}: decode "
                  f"up to {100 * (1 - got.bandwidth_gbps / planned.bandwidth_gbps):.0f}% slower"
                  if got and got.bandwidth_gbps < planned.bandwidth_gbps else "")
        out["warning"] = (f"power mode {live.name} is live, profile {profile.name} plans for {want}{slower} "
                          f"(set it with `sudo nvpmodel -m <id of {want}>`, ids in /etc/nvpmodel.conf)")
    return out


# ---- sysfs ------------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_thermal(root: str | Path = "/") -> dict[str, float]:
    """Thermal zones: {type (lower-case, '-therm'/'-thermal' dropped): Celsius}. Any Linux has
    /sys/class/thermal; on Orin the zones are cpu, gpu, cv0.., soc0.., tj (JetPack 6 names)."""
    out: dict[str, float] = {}
    for zone in sorted(Path(root, "sys/class/thermal").glob("thermal_zone*")):
        kind, temp = _read(zone / "type"), _read(zone / "temp")
        if not kind or temp is None:
            continue
        try:
            c = int(temp) / 1000.0
        except ValueError:
            continue
        if c <= ABSENT_SENSOR_C:
            continue
        name = re.sub(r"[-_]?therm(al)?$", "", kind.lower()) or kind.lower()
        out[name] = c
    return out


def read_power_rails(root: str | Path = "/") -> dict[str, int]:
    """INA3221 rails from hwmon: {label: mW} = in*_input (mV) x curr*_input (mA) / 1000. The labels
    are the tegrastats rail names (VDD_IN, VDD_CPU_GPU_CV, VDD_SOC on Orin Nano/NX)."""
    out: dict[str, int] = {}
    for hw in sorted(Path(root, "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
        for label_file in sorted(hw.glob("in*_label")):
            n = label_file.name[2:-len("_label")]
            label, mv, ma = _read(label_file), _read(hw / f"in{n}_input"), _read(hw / f"curr{n}_input")
            if not label or mv is None or ma is None or label.upper() == "NC":
                continue
            try:
                out[label] = int(round(int(mv) * int(ma) / 1000.0))
            except ValueError:
                continue
    return out
