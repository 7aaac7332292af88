"""The native CPU backend on ARM: what a Jetson's Cortex-A78AE runs is native.c's portable C (no NEON
kernels yet). Built here with a cross compiler for aarch64 (armv8.2-a + fp16 + dotprod: Orin's cores) and
run under qemu-user, one er_linear gives the same bits as this machine's own build, on every kernel path
it has, for int4 and int8 linears at 1..9 rows, and a whole model's steps (a prompt, then decode steps that
read its KV cache) give this machine's logits bit for bit: the engine's numbers do not depend on the CPU family.
Skips where the cross compiler or qemu-aarch64 is missing (Debian: gcc-aarch64-linux-gnu, qemu-user)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge.cpu import is_x86
from edge.quant.format import quantize_int4_rtn, quantize_int8_rtn
from edge.runtime.cpu import kernels
from edge.runtime.cpu.weights import NativeLinear, pack_int4, pack_int8

CROSS, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
HERE = Path(__file__).parent
CSRC = HERE.parent / "edge" / "runtime" / "cpu" / "csrc"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(  # ~70 s: a static cross build, then qemu
    not is_x86() or not (CROSS and QEMU),
    reason="needs an x86 host with an aarch64 cross compiler and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)")]


@pytest.fixture(scope="module")
def arm_driver(tmp_path_factory) -> Path:
    """tests/data/native_driver.c for aarch64, with the backend's own flags (edge.runtime.cpu.build.FLAGS)."""
    from edge.runtime.cpu.build import FLAGS

    exe = tmp_path_factory.mktemp("arm") / "driver"
    flags = [f for f in FLAGS if f not in ("-march=native", "-shared", "-fPIC")]
    subprocess.run([CROSS, *flags, "-march=armv8.2-a+fp16+dotprod", "-static", f"-I{CSRC}", "-o", str(exe),
                    str(HERE / "data" / "native_driver.c")], check=True, capture_output=True)
    return exe


def _run_arm(exe: Path, mode: str, parts: list, work: Path) -> np.ndarray:
    (work / "in.bin").write_bytes(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))
    subprocess.run([QEMU, str(exe), mode, str(work / "in.bin"), str(work / "out.bin")], check=True, timeout=300)
    return np.fromfile(work / "out.bin", np.float32)


def _lin_blob(lin: NativeLinear) -> list:
    """native_driver.c's rd_lin: the header, then the packed arrays themselves."""
    head = np.array([lin.kind, lin.n, lin.k, lin.tiles, lin.w.nbytes, lin.s.size, lin.bias is not None], np.int32)
    return [head, lin.w, lin.s] + ([lin.bias] if lin.bias is not None else [])


def test_an_arm_build_gives_this_machines_bits(arm_driver, tmp_path):
    rng = np.random.default_rng(11)
    n, k = 203, 96  # the last tile partial (203 = 12 x 16 + 11)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    q4, q8 = quantize_int4_rtn(w, 32), quantize_int8_rtn(w)
    for name, lin in (("int4", pack_int4(q4.qweight, q4.scales, 32, bias)), ("int8", pack_int8(q8.qweight, q8.scales))):
        for m in (1, 4, 9):
            x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
            arm = _run_arm(arm_driver, "linear", [*_lin_blob(lin), np.array([m, 2], np.int32), x], tmp_path).reshape(m, n)
            assert np.isfinite(arm).all()
            for isa in kernels.available_isas():
                here = kernels.linear(lin, x, isa=isa, threads=2)
                assert np.array_equal(arm, here), f"{name}, {m} rows: aarch64 differs from this machine's {isa} by {np.abs(arm - here).max()}"


def _model_blob(be, steps) -> list:
    """The backend's model (native_driver.c's run_steps layout: its own arrays, found through the struct's
    pointers) and the steps' inputs."""
    import ctypes

    M, h, half = be.model, be.spec.hidden_size, be.spec.head_dim // 2
    lins = {lin.w.ctypes.data: lin for lin in be._keep if isinstance(lin, NativeLinear)}
    f32 = lambda ptr, n: np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n,))  # noqa: E731
    parts = [np.array([M.n_layers, M.hidden, M.n_heads, M.n_kv, M.head_dim, M.inter, M.vocab, M.block_size, M.num_blocks,
                       M.max_ctx, M.threads, M.kv_int8], np.int32), np.array([M.eps, M.attn_scale], np.float32),
             np.array([be.kv.nbytes], np.int32), f32(M.norm, h), f32(M.cos, M.max_ctx * half), f32(M.sin, M.max_ctx * half),
             *_lin_blob(lins[M.head.w])]
    for i in range(M.n_layers):
        L = M.layers[i]
        parts += [f32(L.ln1, h), f32(L.ln2, h), *(p for lin in (L.qkv, L.o, L.gu, L.down) for p in _lin_blob(lins[lin.w]))]
    parts.append(np.array([len(steps)], np.int32))
    for sb in steps:
        tables = np.ascontiguousarray(sb.block_tables, np.int32)
        parts += [np.array([len(sb.token_ids), len(sb.query_start) - 1, tables.shape[1]], np.int32),
                  be.embed[sb.token_ids].astype(np.float32), sb.positions, sb.slot_mapping, sb.query_start, tables,
                  np.asarray(sb.logits_rows, np.int32)]
    return parts


def test_an_arm_build_gives_this_machines_logits_for_whole_steps(arm_driver, tmp_path):
    """A prompt of 13 tokens in one step, then 3 decode steps reading its KV cache (a block table out of
    order), fp16 and int8 KV pools: the aarch64 build's logits equal this machine's bit for bit."""
    from helpers_tiny import make_tiny_bundle, tiny_hf_model

    from edge.bundle import Bundle
    from edge.runtime.cpu.backend import NativeBackend
    from edge.runtime.step import StepBatch

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
        parts = _model_blob(be, steps)  # before any step: the driver's pool starts as zeros, as this one's
        here = np.stack([be.execute(sb).logits[0].copy() for sb in steps])
        arm = _run_arm(arm_driver, "step", parts, tmp_path).reshape(here.shape)
        assert np.isfinite(here).all() and here.std() > 0
        assert np.array_equal(arm, here), f"kv {kv}: aarch64 logits differ by {np.abs(arm - here).max()}"


def _encoder_blob(enc, ids: list[list[int]]) -> list:
    """encoder_driver.c's input: a NativeEncoder's model (its own arrays, found through the struct's pointers;
    force_scalar, so the weights are in pack_weight's int8 layout) and the texts."""
    import ctypes

    M = enc.model
    h = M.hidden

    def arr(ptr, n, ctype=ctypes.c_float):
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)), (n,))

    def lin(L) -> list:
        parts = [np.array([L.n, L.k, bool(L.smooth)], np.int32), arr(L.w, L.n * L.k, ctypes.c_int8), arr(L.corr, L.n, ctypes.c_int32),
                 arr(L.mult, L.n), arr(L.bias, L.n)]
        return parts + ([arr(L.smooth, L.k)] if L.smooth else [])

    parts = [np.array([M.n_layers, h, M.n_heads, M.head_dim, M.inter, M.vocab, M.max_pos], np.int32),
             np.array([M.ln_eps, M.emb_ln_eps, M.qscale, M.qeps, M.norm_eps], np.float32),
             arr(M.word, M.vocab * h), arr(M.pos, M.max_pos * h), arr(M.emb_ln_w, h), arr(M.emb_ln_b, h)]
    for i in range(M.n_layers):
        L = M.layers[i]
        parts += [p for x in (L.qkv, L.o, L.up, L.down) for p in lin(x)]
        parts += [arr(L.ln1_w, h), arr(L.ln1_b, h), arr(L.ln2_w, h), arr(L.ln2_b, h)]
    flat = np.array([t for x in ids for t in x], np.int32)
    return parts + [np.array([len(ids)], np.int32), np.array([len(x) for x in ids], np.int32), flat]


@pytest.mark.parametrize("heads", [2, 4])  # head_dim 32: the vector attention; 16: the portable one
def test_the_arm_encoder_sdot_kernels_compute_the_graph(tmp_path, heads, monkeypatch):
    """encoder.c for Orin's cores (armv8.2-a + dotprod: its NEON path, sdot GEMMs) under qemu gives this machine's
    vectors: within cosine 0.99999 of its portable C (the same integer products; float sums in another order)."""
    import random

    from helpers_tiny import _WORDS, make_tiny_st

    from edge.build.encoder import build_embedder_bundle
    from edge.bundle import Bundle
    from edge.runtime.cpu.build import FLAGS
    from edge.runtime.cpu.encoder import NativeEncoder
    from edge.runtime.embedder import Embedder

    exe = tmp_path / "encoder_driver"
    flags = [f for f in FLAGS if f not in ("-march=native", "-shared", "-fPIC", "-pthread")]
    subprocess.run([CROSS, *flags, "-march=armv8.2-a+fp16+dotprod", "-static", f"-I{CSRC}", "-o", str(exe),
                    str(HERE / "data" / "encoder_driver.c"), "-lm"], check=True, capture_output=True)
    monkeypatch.setenv("EDGE_RAG_U8S8", "exact")  # int8 weights, as built on ARM
    folder = make_tiny_st(tmp_path / "st", "mean", True, seed=3, heads=heads)
    path = build_embedder_bundle(folder, tmp_path / "int8", quant="int8", progress=False)
    rng = random.Random(7)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 60))) for _ in range(9)]
    ids = Embedder.from_bundle(path, backend="onnxruntime")._encode(texts)
    here = NativeEncoder.open(Bundle.open(path), force_scalar=True)
    (tmp_path / "in.bin").write_bytes(b"".join(np.ascontiguousarray(p).tobytes() for p in _encoder_blob(here, ids)))
    subprocess.run([QEMU, str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=300)
    out = np.fromfile(tmp_path / "out.bin", np.int32)
    assert out[0] == 4, "the aarch64 build did not take its NEON (sdot) path"
    arm = out[1:].view(np.float32).reshape(len(ids), -1)
    ref = here.run(ids)
    cos = (arm * ref).sum(1) / np.linalg.norm(arm, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.isfinite(arm).all() and cos.min() > 0.99999, f"aarch64 vs this machine: min cosine {cos.min()}"
