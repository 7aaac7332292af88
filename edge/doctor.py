"""`edge-rag doctor`: what this machine is and which backends it can use.

Every probe is guarded: a missing library or driver is reported, never raised. The result is a
plain dict (JSON-able) so that scripts and bug reports can carry it as is.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from edge import profiles as _profiles
from edge.profiles import detect_profile, list_profiles, match_compatible, read_compatible


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\0", "").strip() or None
    except OSError:
        return None


def _jetson() -> dict[str, Any] | None:
    """Module model and compatible strings from the device tree, L4T release, power mode."""
    compatible = read_compatible()
    if not any(c.startswith("nvidia,") for c in compatible):
        return None
    info: dict[str, Any] = {
        "model": _read_text(Path("/proc/device-tree/model")),
        "compatible": compatible,
        "l4t_release": _read_text(Path("/etc/nv_tegra_release")),
    }
    status = _read_text(Path("/var/lib/nvpmodel/status"))  # "pmode:0002 fmode:..."
    if status:
        info["nvpmodel_status"] = status
    try:
        info["profile"] = match_compatible(compatible, list_profiles())
    except Exception as e:  # a broken profile file must not break doctor
        info["profile_error"] = str(e)
    return info


def _cuda() -> dict[str, Any]:
    """CUDA devices through cupy when importable (name, compute capability, memory)."""
    out: dict[str, Any] = {"binding": None, "devices": []}
    try:
        import cupy

        out["binding"] = f"cupy {cupy.__version__}"
        rt = cupy.cuda.runtime
        out["runtime_version"] = rt.runtimeGetVersion()
        out["driver_version"] = rt.driverGetVersion()
        for i in range(rt.getDeviceCount()):
            p = rt.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            out["devices"].append(
                {"index": i, "name": name, "compute_capability": f"{p['major']}.{p['minor']}", "memory_bytes": int(p["totalGlobalMem"])}
            )
    except ImportError:
        out["error"] = "cupy is not installed (pip install 'edge-rag[cuda]')"
    except Exception as e:  # no driver / no device
        out["error"] = f"{type(e).__name__}: {e}"
    if not out["devices"]:
        names = _profiles.cuda_device_names()  # nvidia-smi fallback: names only
        out["devices"] = [{"index": i, "name": n} for i, n in enumerate(names)]
    return out


def _onnxruntime() -> dict[str, Any] | None:
    try:
        import onnxruntime as ort

        return {"version": ort.__version__, "providers": list(ort.get_available_providers())}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _tensorrt() -> dict[str, Any] | None:
    try:
        import tensorrt as trt

        return {"version": trt.__version__}
    except ImportError:
        return None
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _runtime_probe() -> Any:
    """edge.runtime.cuda.probe() when that backend exists (written in another issue)."""
    try:
        from edge.runtime import cuda as cuda_backend
    except ImportError:
        return None
    probe = getattr(cuda_backend, "probe", None)
    if probe is None:
        return None
    try:
        return probe()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _power_mode(profile: str | None) -> dict[str, Any] | None:
    """The live nvpmodel mode against the profile's (None where nvpmodel is absent)."""
    from edge.board import power_mode_check, query_nvpmodel

    live = query_nvpmodel()
    if live is None:
        return None
    try:
        return power_mode_check(live, _profiles.load_profile(profile)) if profile else {"live": live.name, "live_id": live.id}
    except Exception as e:  # a broken profile file must not break doctor
        return {"live": live.name, "live_id": live.id, "error": str(e)}


def diagnose() -> dict[str, Any]:
    """Everything `edge-rag doctor` reports, as a JSON-able dict."""
    import psutil

    jetson = _jetson()
    cuda = _cuda()
    ort = _onnxruntime()
    trt = _tensorrt()
    kind = "jetson" if jetson else ("cuda-gpu" if cuda["devices"] else "cpu")
    try:
        profile: str | None = detect_profile()
        profile_error = None
    except Exception as e:
        profile, profile_error = None, str(e)
    ort_ok = bool(ort and "version" in ort)
    from edge.runtime.cpu.backend import machine_refusal

    native_why = machine_refusal()  # None: `auto` runs int4 / int8 llama-family engines on it (no GPU)
    from edge.runtime.cpu.encoder import machine_refusal as encoder_refusal

    encoder_why = encoder_refusal()
    from edge.runtime.cpu.build import kernel_path
    backends = {
        "onnxruntime": ort_ok,
        "native": native_why is None,
        "onnxruntime_cuda": ort_ok and "CUDAExecutionProvider" in ort.get("providers", []),
        "cuda": bool(cuda["binding"] and any("compute_capability" in d for d in cuda["devices"])),
        "tensorrt": bool(trt and "version" in trt),
    }
    report: dict[str, Any] = {
        "machine": {
            "kind": kind,
            "platform": platform.platform(),
            "arch": platform.machine(),
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "memory_bytes": int(psutil.virtual_memory().total),
        },
        "jetson": jetson,
        "cuda": cuda,
        "onnxruntime": ort,
        "tensorrt": trt,
        "backends": backends,
        "native": {"auto_picks": native_why is None and not backends["cuda"], "reason": native_why,
                   "kernels": kernel_path() if native_why is None else None},
        # the embedder's cpu backend (edge.runtime.embedder.resolve_backend): int8 bundles on the native encoder
        "native_encoder": {"cpu_picks": encoder_why is None, "reason": encoder_why, "kernels": kernel_path(encoder=True) if encoder_why is None else None},
        "profile": profile,
    }
    if profile_error:
        report["profile_error"] = profile_error
    power = _power_mode(profile)
    if power is not None:
        report["power_mode"] = power
    probe = _runtime_probe()
    if probe is not None:
        report["cuda_runtime_probe"] = probe
    return report
