"""The native CPU backend on ARM: what a Jetson's Cortex-A78AE runs is native.c's portable C (no NEON
kernels yet). Built here with a cross compiler for aarch64 (armv8.2-a + fp16 + dotprod: Orin's cores) and
run under qemu-user, one er_linear gives the same bits as this machine's own build, on every kernel path
it has, for int4 and int8 linears at 1..9 rows: the engine's numbers do not depend on the CPU family.
Skips where the cross compiler or qemu-aarch64 is missing (Debian: gcc-aarch64-linux-gnu, qemu-user)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge.quant.format import quantize_int4_rtn, quantize_int8_rtn
from edge.runtime.cpu import kernels
from edge.runtime.cpu.weights import pack_int4, pack_int8

CROSS, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
HERE = Path(__file__).parent
CSRC = HERE.parent / "edge" / "runtime" / "cpu" / "csrc"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(  # ~40 s: a static cross build, then qemu
    platform.machine().lower() in ("aarch64", "arm64") or not (CROSS and QEMU),
    reason="needs an aarch64 cross compiler and qemu-user on a non-ARM host (apt-get install gcc-aarch64-linux-gnu qemu-user)")]


@pytest.fixture(scope="module")
def arm_driver(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("arm") / "linear"
    from edge.runtime.cpu.build import FLAGS

    flags = [f for f in FLAGS if f not in ("-march=native", "-shared", "-fPIC")]
    subprocess.run([CROSS, *flags, "-march=armv8.2-a+fp16+dotprod", "-static", f"-I{CSRC}", "-o", str(exe),
                    str(HERE / "data" / "native_linear_driver.c")], check=True, capture_output=True)
    return exe


def _run_arm(exe: Path, lin, x: np.ndarray, threads: int, work: Path) -> np.ndarray:
    m = x.shape[0]
    head = np.array([lin.kind, lin.n, lin.k, lin.tiles, m, lin.bias is not None, lin.w.nbytes, lin.s.size, threads], np.int32)
    parts = [head, lin.w, lin.s] + ([lin.bias] if lin.bias is not None else []) + [np.ascontiguousarray(x, np.float32)]
    (work / "in.bin").write_bytes(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))
    subprocess.run([QEMU, str(exe), str(work / "in.bin"), str(work / "out.bin")], check=True, timeout=120)
    return np.fromfile(work / "out.bin", np.float32).reshape(m, lin.n)


def test_an_arm_build_gives_this_machines_bits(arm_driver, tmp_path):
    rng = np.random.default_rng(11)
    n, k = 203, 96  # the last tile partial (203 = 12 x 16 + 11)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q4, q8 = quantize_int4_rtn(w, 32), quantize_int8_rtn(w)
    for name, lin in (("int4", pack_int4(q4.qweight, q4.scales, 32, bias)), ("int8", pack_int8(q8.qweight, q8.scales))):
        for m in (1, 4, 9):
            x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
            arm = _run_arm(arm_driver, lin, x, 2, tmp_path)
            assert np.isfinite(arm).all()
            for isa in kernels.available_isas():
                here = kernels.linear(lin, x, isa=isa, threads=2)
                assert np.array_equal(arm, here), f"{name}, {m} rows: aarch64 differs from this machine's {isa} by {np.abs(arm - here).max()}"
