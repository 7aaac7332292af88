"""The native CPU backend on ARM: what a Jetson's Cortex-A78AE runs is native.c's portable C (no NEON
kernels yet). Built here with a cross compiler for aarch64 (armv8.2-a + fp16 + dotprod: Orin's cores) and
run under qemu-user, one er_linear gives the same bits as this machine's own build, on every kernel path
it has, for int4 and int8 linears at 1..9 rows, and a whole model's steps (a prompt, then decode steps that
read its KV cache) give this machine's logits bit for bit: the engine's numbers do not depend on the CPU family.
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


def _cross_build(tmp_path_factory, driver: str) -> Path:
    from edge.runtime.cpu.build import FLAGS

    exe = tmp_path_factory.mktemp("arm") / driver
    flags = [f for f in FLAGS if f not in ("-march=native", "-shared", "-fPIC")]
    subprocess.run([CROSS, *flags, "-march=armv8.2-a+fp16+dotprod", "-static", f"-I{CSRC}", "-o", str(exe),
                    str(HERE / "data" / f"native_{driver}_driver.c")], check=True, capture_output=True)
    return exe


@pytest.fixture(scope="module")
def arm_driver(tmp_path_factory) -> Path:
    return _cross_build(tmp_path_factory, "linear")


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


def _lin_blob(L) -> list:
    """An abi.Lin's header and arrays, read back through its pointers (native.c's tile layout sizes)."""
    import ctypes

    wb = L.tiles * 16 * L.k // (2 if L.kind == 4 else 1)
    sn = L.tiles * 16 * (L.k // 32 if L.kind == 4 else 1)
    out = [np.array([L.kind, L.n, L.k, L.tiles, wb, sn, bool(L.bias)], np.int32),
           ctypes.string_at(L.w, wb), ctypes.string_at(L.s, 4 * sn)]
    return out + ([ctypes.string_at(L.bias, 4 * L.n)] if L.bias else [])


def _model_blob(be, steps) -> bytes:
    """The backend's model (native_step_driver.c's layout) and the steps' inputs."""
    import ctypes

    M, h = be.model, be.spec.hidden_size
    f32 = lambda ptr, n: ctypes.string_at(ptr, 4 * n)  # noqa: E731
    half = be.spec.head_dim // 2
    parts = [np.array([M.n_layers, M.hidden, M.n_heads, M.n_kv, M.head_dim, M.inter, M.vocab, M.block_size, M.num_blocks,
                       M.max_ctx, M.threads, M.kv_int8], np.int32), np.array([M.eps, M.attn_scale], np.float32),
             np.array([be.kv.nbytes], np.int32), f32(M.norm, h), f32(M.cos, M.max_ctx * half), f32(M.sin, M.max_ctx * half),
             *_lin_blob(M.head)]
    for i in range(M.n_layers):
        L = M.layers[i]
        parts += [f32(L.ln1, h), f32(L.ln2, h), *_lin_blob(L.qkv), *_lin_blob(L.o), *_lin_blob(L.gu), *_lin_blob(L.down)]
    parts.append(np.array([len(steps)], np.int32))
    for sb in steps:
        t, r = len(sb.token_ids), len(sb.query_start) - 1
        tables = np.ascontiguousarray(sb.block_tables, np.int32)
        parts += [np.array([t, r, tables.shape[1]], np.int32), be.embed[sb.token_ids].astype(np.float32), sb.positions,
                  sb.slot_mapping, sb.query_start, tables, np.ascontiguousarray(sb.logits_rows, np.int32)]
    return b"".join(p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes() for p in parts)


def test_an_arm_build_gives_this_machines_logits_for_whole_steps(tmp_path_factory, tmp_path):
    """A prompt of 13 tokens in one step, then 3 decode steps reading its KV cache (a block table out of
    order), fp16 and int8 KV pools: the aarch64 build's logits equal this machine's bit for bit."""
    from edge.bundle import Bundle
    from edge.runtime.cpu.backend import NativeBackend
    from edge.runtime.step import StepBatch
    from helpers_tiny import make_tiny_bundle, tiny_hf_model

    exe = _cross_build(tmp_path_factory, "step")
    path = make_tiny_bundle(tmp_path / "int4", tiny_hf_model("llama", seed=5), "int4", forms=(), max_context=64, max_batch=4)
    b = Bundle.open(path, verify=False)
    ids = np.random.default_rng(9).integers(0, 256, 16).astype(np.int32)
    table = np.array([[2, 0, 3, -1]], np.int32)
    for kv in ("fp16", "int8"):
        be = NativeBackend(b, threads=2, kv_dtype=kv)
        bs, one = be.block_size, np.ones(1, np.int32)

        def batch(lo, hi):
            p = np.arange(lo, hi, dtype=np.int32)
            slots = (table[0, p // bs] * bs + p % bs).astype(np.int32)
            return StepBatch(bs, ids[lo:hi].copy(), p, slots, np.array([0, hi - lo], np.int32), np.array([hi], np.int32), table,
                             one, np.zeros(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.int32), np.zeros(1, np.float32), one.copy())

        steps = [batch(0, 13)] + [batch(i, i + 1) for i in range(13, 16)]
        blob = _model_blob(be, steps)  # before any step: the pool the driver starts from is zeros, as this one
        here = np.stack([be.execute(sb).logits[0].copy() for sb in steps])
        (tmp_path / "in.bin").write_bytes(blob)
        subprocess.run([QEMU, str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=300)
        arm = np.fromfile(tmp_path / "out.bin", np.float32).reshape(here.shape)
        assert np.isfinite(here).all() and here.std() > 0
        assert np.array_equal(arm, here), f"kv {kv}: aarch64 logits differ by {np.abs(arm - here).max()}"
