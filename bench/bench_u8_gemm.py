"""Can an exact u8 x u8 int8 GEMM beat ONNX Runtime's on an x86 CPU without VNNI? (issue #15)

The default int8 embedder (all-MiniLM-L6-v2) computes every linear as MatMulIntegerToFloat on
uint8 activations (row-scaled, zero point 128) and uint8 per-channel asymmetric weights. Without
VNNI, MLAS widens both to int16 and multiplies with vpmaddwd. A native encoder that must give the
SAME vectors has to compute the same integers, exactly, in int32. This times, for the bundle's
own weights and linear shapes, one thread, process CPU time (least of --rounds):

  peer       MatMulIntegerToFloat + the row-scale Mul, as in the bundle's graph (ORT, 1 thread)
  exact16    a register-blocked int16 kernel (C, compiled here with cc -O3 -march=native):
             weights minus zero point prepacked as int16 pairs, activations minus 128 as int16,
             one vpmaddwd + one vpaddd per 32 (zmm) or 16 (ymm) multiply-adds; MR x NR tiles
  ceiling    a loop of independent vpmaddwd + vpaddd pairs (no loads): the multiply-add rate this
             core gives any exact form that needs a widening multiply and a separate add (an fp32
             FMA form is one instruction per 16 products: the same rate per vector instruction)

One JSON line per figure: per shape, us per call and G MAC per CPU-second of each kernel, the
ratio to the peer, and the largest difference from the exact integer result; then the ceiling.

    python bench/bench_u8_gemm.py --embedder BUNDLE [--rows 5888] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_ort_ops import cpu_us  # noqa: E402  (least process CPU time per call)

# (name, vector width in int32 lanes, rows MR, column vectors NR): with AVX-512 32 vector registers
# (accumulators MR x NR + NR weight vectors + 1 broadcast); AVX2 alone has 16, hence ymm 4x3 there
VARIANTS_AVX512 = (("zmm_12x2", 16, 12, 2), ("zmm_6x4", 16, 6, 4), ("ymm_6x4", 8, 6, 4))
VARIANTS_AVX2 = (("ymm_4x3", 8, 4, 3),)


def kernel_source(name: str, w: int, mr: int, nr: int) -> str:
    if w == 16:
        V, F, p, ld = "__m512i", "__m512", "_mm512", "_mm512_loadu_si512"
    else:
        V, F, p, ld = "__m256i", "__m256", "_mm256", "_mm256_loadu_si256"
    z = f"{p}_setzero_si512()" if w == 16 else f"{p}_setzero_si256()"
    lines = [f"static void kern_{name}(const int16_t *A, int K, int rows, const int16_t *B, int KP, float *C, int ldc,"
             " const float *sc, const float *rs) {"]
    lines += [f"  {V} c{r}_{c} = {z};" for r in range(mr) for c in range(nr)]
    lines += ["  const int32_t *a32 = (const int32_t *)A; int ka = K / 2;", "  for (int p = 0; p < KP; p++) {"]
    lines += [f"    {V} b{c} = {ld}((const void *)(B + ((size_t){c} * KP + p) * {2 * w}));" for c in range(nr)]
    for r in range(mr):
        lines.append(f"    {{ {V} a = {p}_set1_epi32(a32[{r} * ka + p]);")
        lines += [f"      c{r}_{c} = {p}_add_epi32(c{r}_{c}, {p}_madd_epi16(a, b{c}));" for c in range(nr)]
        lines.append("    }")
    lines.append("  }")
    for r in range(mr):
        lines.append(f"  if ({r} < rows) {{ {F} rr = {p}_set1_ps(rs[{r}]);")
        lines += [f"    {p}_storeu_ps(C + (size_t){r} * ldc + {w * c}, {p}_mul_ps({p}_mul_ps({p}_cvtepi32_ps(c{r}_{c}),"
                  f" {p}_loadu_ps(sc + {w * c})), rr));" for c in range(nr)]
        lines.append("  }")
    lines.append("}")
    lines.append(f"""void gemm_{name}(const int16_t *A, int M, int K, const int16_t *bp, int N, const float *sc, const float *rs, float *C) {{
  int KP = K / 2;
  for (int j = 0; j < N / {w}; j += {nr})
    for (int m = 0; m < M; m += {mr})
      kern_{name}(A + (size_t)m * K, K, M - m < {mr} ? M - m : {mr}, bp + (size_t)j * KP * {2 * w}, KP,
                  C + (size_t)m * N + j * {w}, N, sc + j * {w}, rs + m);
}}""")
    return "\n".join(lines)


CEILING = r"""
static double now(void) { struct timespec t; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define PZ(i, j) "vpmaddwd %%zmm1, %%zmm0, %%zmm" #i "\n vpaddd %%zmm" #i ", %%zmm" #j ", %%zmm" #j "\n"
#define PY(i, j) "vpmaddwd %%ymm1, %%ymm0, %%ymm" #i "\n vpaddd %%ymm" #i ", %%ymm" #j ", %%ymm" #j "\n"
#define CLOB "xmm10","xmm11","xmm12","xmm13","xmm14","xmm15","xmm16","xmm17","xmm18","xmm19","xmm20","xmm21","xmm22","xmm23","xmm24","xmm25","xmm26","xmm27","xmm28","xmm29"
/* G multiply-adds per CPU-second of n x 10 independent vpmaddwd + vpaddd pairs */
double ceiling_zmm(long n) { double t = now(); for (long i = 0; i < n; i++) __asm__ volatile(PZ(10,20)PZ(11,21)PZ(12,22)PZ(13,23)PZ(14,24)PZ(15,25)PZ(16,26)PZ(17,27)PZ(18,28)PZ(19,29) ::: CLOB); return n * 10.0 * 32 / (now() - t) / 1e9; }
/* ymm: registers 0-15 only, so that it runs on AVX2 without AVX-512VL */
double ceiling_ymm(long n) { double t = now(); for (long i = 0; i < n; i++) __asm__ volatile(PY(2,8)PY(3,9)PY(4,10)PY(5,11)PY(6,12)PY(7,13) ::: "xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12","xmm13"); return n * 6.0 * 16 / (now() - t) / 1e9; }
"""


def pack_weights(wq: np.ndarray, zw: np.ndarray, w: int) -> np.ndarray:
    """[K, N] uint8 weights, [N] zero points -> int16 (w - zw) pairs, [N/w][K/2][w][2]."""
    k, n = wq.shape
    d = wq.astype(np.int16) - zw.astype(np.int16)  # [-255, 255]
    return np.ascontiguousarray(d.reshape(k // 2, 2, n // w, w).transpose(2, 0, 3, 1))


def build(flags: set[str], out: Path) -> tuple[ctypes.CDLL, list[tuple[str, int, int, int]]]:
    avx512 = {"avx512bw", "avx512vl"} <= flags
    variants = list(VARIANTS_AVX512 if avx512 else VARIANTS_AVX2)
    ceiling = CEILING if avx512 else "\n".join(line for line in CEILING.splitlines() if "ceiling_zmm" not in line)
    src = "#include <stdint.h>\n#include <time.h>\n#include <immintrin.h>\n" + "\n".join(kernel_source(*v) for v in variants) + ceiling
    (out / "u8gemm.c").write_text(src)
    so = out / "u8gemm.so"
    subprocess.run(["cc", "-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", str(out / "u8gemm.c"), "-o", str(so)], check=True)
    return ctypes.CDLL(str(so)), variants


def exact16(lib: ctypes.CDLL, variant: str, w: int, xq: np.ndarray, wq: np.ndarray, zw: np.ndarray, sw: np.ndarray,
            r: np.ndarray) -> Callable[[], np.ndarray]:
    """A call of the candidate kernel on uint8 activations xq [M, K] (zero point 128, scale 1/127, rows
    scaled by r [M, 1]) and uint8 weights wq [K, N] (zero points zw, scales sw): the graph's
    MatMulIntegerToFloat + row-scale Mul. Prepacking is done here, once, not timed."""
    m, k = xq.shape
    n = wq.shape[1]
    a16 = np.zeros((m + 16, k), np.int16)  # padded rows: a tile reads MR rows
    a16[:m] = xq.astype(np.int16) - 128
    bp = pack_weights(wq, zw, w)
    sc = (sw * np.float32(1 / 127)).astype(np.float32)
    rs = np.ones(m + 16, np.float32)
    rs[:m] = r[:, 0]
    out = np.empty((m, n), np.float32)
    fn = getattr(lib, f"gemm_{variant}")
    P = ctypes.c_void_p

    def call() -> np.ndarray:
        fn(a16.ctypes.data_as(P), m, k, bp.ctypes.data_as(P), n, sc.ctypes.data_as(P), rs.ctypes.data_as(P), out.ctypes.data_as(P))
        return out

    return call


def bundle_linears(path: Path) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """One linear of each (K, N) shape of the embedder graph: (uint8 weights [K, N], zero points, scales, name)."""
    import onnx
    from onnx import numpy_helper as nh

    g = onnx.load(str(path / "model.onnx")).graph
    inits = {t.name: t for t in g.initializer}
    found = {}
    for node in g.node:
        if node.op_type == "MatMulIntegerToFloat":
            wq = nh.to_array(inits[node.input[1]])
            found.setdefault(wq.shape, (wq, nh.to_array(inits[node.input[5]]), nh.to_array(inits[node.input[3]]), node.name))
    return found


def peer(wq: np.ndarray, zw: np.ndarray, sw: np.ndarray, threads: int = 1) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """ONNX Runtime on the graph's own two nodes for this linear: MatMulIntegerToFloat (activation
    scale 1/127, zero point 128) and the row-scale Mul."""
    import onnx
    import onnxruntime as ort
    from onnx import helper as h
    from onnx import numpy_helper as nh

    k, n = wq.shape
    node = h.make_node("MatMulIntegerToFloat", ["x", "w", "sa", "sw", "za", "zw"], ["y0"], domain="com.microsoft")
    g = h.make_graph([node, h.make_node("Mul", ["y0", "r"], ["y"])], "g",
                     [h.make_tensor_value_info("x", onnx.TensorProto.UINT8, [None, k]),
                      h.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [None, 1])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, n])],
                     [nh.from_array(wq, "w"), nh.from_array(sw, "sw"), nh.from_array(zw, "zw"),
                      nh.from_array(np.array(1 / 127, np.float32), "sa"), nh.from_array(np.array(128, np.uint8), "za")])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # what onnxruntime >= 1.20 loads (onnx writes its newest IR: 1.23 writes one that onnxruntime 1.30 refuses)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda x, r: sess.run(["y"], {"x": x, "r": r})[0]


def exact_reference(xq: np.ndarray, wq: np.ndarray, zw: np.ndarray, sw: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The integer products in int64, then the graph's scaling in float64."""
    acc = (xq.astype(np.int64) - 128) @ (wq.astype(np.int64) - zw.astype(np.int64))
    return acc.astype(np.float64) * (sw.astype(np.float64) * np.float64(np.float32(1 / 127))) * r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embedder", required=True, help="an int8 embedder bundle (uint8-weight format)")
    ap.add_argument("--rows", type=int, default=5888, help="activation rows (5888 = 32 texts x 184 tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import onnxruntime as ort

    from edge.cpu import cpu_flags

    flags = set(cpu_flags())
    if "avx2" not in flags:
        sys.exit("bench_u8_gemm: needs an x86 CPU with AVX2")
    linears = bundle_linears(Path(args.embedder))
    if not linears:
        sys.exit(f"bench_u8_gemm: {args.embedder} has no MatMulIntegerToFloat (not a uint8-weight int8 embedder)")
    lib, variants = build(flags, Path(tempfile.mkdtemp(prefix="u8gemm-")))
    isas = ("zmm", "ymm") if {"avx512bw", "avx512vl"} <= flags else ("ymm",)
    for isa in isas:
        getattr(lib, f"ceiling_{isa}").restype = ctypes.c_double
        getattr(lib, f"ceiling_{isa}").argtypes = [ctypes.c_long]
    ceiling = lambda isa: max(getattr(lib, f"ceiling_{isa}")(20_000_000) for _ in range(args.rounds))  # noqa: E731
    rng = np.random.default_rng(0)
    m = args.rows
    print(json.dumps({"figure": "setup", "rows": m, "threads": 1, "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
                      "avx512bw": "avx512bw" in flags, "ort": ort.__version__, "load": round(os.getloadavg()[0], 2)}))
    ceil = {isa: ceiling(isa) for isa in isas}
    for (k, n), (wq, zw, sw, name) in sorted(linears.items()):
        xq = rng.integers(1, 256, (m, k), dtype=np.uint8)  # the graph's range: round(x / amax * 127) + 128
        r = (rng.random((m, 1)) + 0.5).astype(np.float32)
        exact = exact_reference(xq, wq, zw, sw, r)
        scale = float(np.abs(exact).max())
        ort_call = peer(wq, zw, sw)
        calls = {"peer": lambda: ort_call(xq, r)}
        for v, w, _, _ in variants:
            calls[v] = exact16(lib, v, w, xq, wq, zw, sw, r)
        times = {name_: [] for name_ in calls}
        for _ in range(2):  # alternate, so that load from elsewhere hits all alike
            for name_, fn in calls.items():
                times[name_].append(cpu_us(fn, n=3, rounds=args.rounds))
        for name_, fn in calls.items():
            y = fn()
            us = min(times[name_])
            gmac = m * k * n / us / 1e3
            print(json.dumps({"figure": "gemm", "linear": name, "M": m, "K": k, "N": n, "kernel": name_, "cpu_us": round(us),
                              "gmac_per_cpu_s": round(gmac, 1), "vs_peer": round(min(times["peer"]) / us, 3),
                              "of_ceiling": round(gmac / ceil[isas[0]], 3),
                              "max_rel_err_vs_exact": float(f"{float(np.abs(y - exact).max()) / scale:.2e}")}))
    for isa in isas:  # again at the end: the spread says how steady the machine was
        print(json.dumps({"figure": "ceiling", "form": f"{isa} vpmaddwd+vpaddd", "gmac_per_cpu_s_start": round(ceil[isa], 1),
                          "gmac_per_cpu_s_end": round(ceiling(isa), 1), "load": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
