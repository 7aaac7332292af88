"""The native CPU sentence encoder: an int8 embedder bundle's graph computed by csrc/encoder.c.

    enc = NativeEncoder.open(bundle)          # None-free: raises NativeUnavailable with the reason
    vecs = enc.run([[101, 7592, 102], ...])   # token ids of each text -> [n, dim] float32

Why it exists: ONNX Runtime runs the int8 graph as ~150 separate ops a call, and on a 2-core
AVX-512 VNNI EPYC (Zen 4, one thread, 2 x 184-token texts) only 47% of its time was the int8 GEMMs;
multi-head attention took 24%, the row-quantisation ops (Mul, Abs, ReduceMax, QuantizeLinear)
~14%, BiasGelu 9%, the adds and layer norms 5% (`docs/measurements.md`, "Ingest speed, session 16"). Here those
ops are fused into the GEMMs' passes and the texts of a call are not padded.

The vectors are the graph's: the weights, smoothing scales and per-row activation codes are the
same, so every int8 product is the one ONNX Runtime computes (exact in int32); float rounding in
layer norm, softmax and erf differs, and where it moves an activation across a code boundary the
vectors part by ~1e-4 (all-MiniLM-L6-v2: cosine >= 0.9994 to ONNX Runtime's on 200 varied texts; ONNX
Runtime against an exact numpy transcription of its own graph parts by as much). The weights are read
from the bundle's model.onnx (with the `onnx` package, which builds the bundle on this machine; cached:
graph_arrays), not stored in the bundle twice, by the names edge.build.encoder writes them under
(edge.models.bert_graph_names).

On x86 without AVX-512 VNNI (AVX2 + FMA: Haswell .. Zen 3) encoder.c's AVX2 kernels compute the same
integer products exactly (int16 vpmaddwd), where onnxruntime's u8 x s8 GEMM saturates: there the
vectors are within cosine 0.9994 of the VNNI path's (all-MiniLM-L6-v2, 200 varied texts), not the
0.969 onnxruntime gave on int8 weights, and bundles are built with int8 weights (int8_exact).
"""

from __future__ import annotations

import ctypes as C
import json
import logging
import os
import platform
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BackendError
from edge.models import bert_graph_names as names
from edge.runtime.cpu.abi import ISA_NAMES, Enc, EncLayer, EncLin

SOURCE = Path(__file__).parent / "csrc" / "encoder.c"
log = logging.getLogger(__name__)
NB = 64  # columns per packed block (encoder.c)


class NativeUnavailable(BackendError):
    """This bundle or this machine cannot use the native encoder (the reason is the message)."""


ISAS = {**{i: name for i, name in enumerate(ISA_NAMES) if i}, 4: "neon", 5: "avxvnni"}  # er_enc_isa's codes of the vector builds
INT16_ISAS = ("avx512", "avx2")  # x86 without VNNI: int16 weights (pack_weight16)
ARM_NEEDS = ("asimddp",)  # ARMv8.2 dot product (sdot): /proc/cpuinfo's Features on a Jetson Orin


@lru_cache(maxsize=2)
def load_lib(extra_flags: tuple[str, ...] = ()) -> C.CDLL:
    """encoder.c compiled for this CPU (cached like the native decode step: edge.runtime.cpu.build), or for the
    kernel path $EDGE_RAG_NATIVE_ISA names (avx2: what an AVX2-only x86 runs, on this one)."""
    from edge.runtime.cpu import abi
    from edge.runtime.cpu.build import build, forced_isa

    isa, isa_flags = forced_isa()
    if isa == "avx512":  # AVX-512 without VNNI, as -march=native compiles it on a Skylake-SP
        isa_flags = ("-march=skylake-avx512", "-mtune=generic")
    lib = C.CDLL(str(build(extra_flags + isa_flags, source=SOURCE)))
    abi.declare_encoder(lib)
    return lib


def machine_refusal() -> str | None:
    """Why the embedder's cpu backend runs onnxruntime rather than the native encoder on this machine,
    or None (checked without compiling anything: `edge-rag doctor`). The same checks as the decode step's
    (edge.runtime.cpu.backend.machine_refusal): encoder.c has AVX-512 VNNI, AVX-VNNI, AVX2 and ARM dot-product kernels."""
    from edge.cpu import cpu_flags, is_x86
    from edge.runtime.cpu.build import ISA_NEEDS, compiler

    flags = cpu_flags()
    if is_x86():
        if not any(all(f in flags for f in ISA_NEEDS[isa]) for isa in ("vnni", "avx2")):
            return ("no AVX2 or AVX-512 VNNI on this CPU (the native encoder's vector kernels need one; its portable C "
                    "is slower than onnxruntime)")
    elif platform.machine().lower() not in ("aarch64", "arm64") or any(f not in flags for f in ARM_NEEDS):
        return ("not an x86 CPU with AVX2 or an ARM one with dot products (asimddp): the native encoder has no vector "
                "kernels for it")
    elif os.environ.get(native_env(), "").strip() != "1":
        # NOTE: its NEON kernels are checked under qemu (tests/test_native_arm.py), never timed on an ARM chip
        return (f"its ARM kernels are not yet measured against onnxruntime on a real ARM CPU: {native_env()}=1 "
                "uses them")
    try:
        compiler()
    except BackendError:
        return "no C compiler (cc) to build the native encoder's kernels"
    return None


def native_env() -> str:
    from edge.runtime.embedder import NATIVE_ENV

    return NATIVE_ENV


def vector_isa() -> str | None:
    """"vnni", "avx512", "avxvnni", "avx2" or "neon": the kernels encoder.c runs on this CPU, else None (its portable C is for tests:
    slower than onnxruntime)."""
    if machine_refusal() is not None:
        return None
    return ISAS.get(load_lib().er_enc_isa())


def int8_exact() -> bool:
    """Whether this machine's embedder computes an int8 bundle's u8 x s8 products exactly: onnxruntime where its
    GEMM cannot saturate (edge.cpu.u8s8_exact: VNNI, ARM), or the native encoder (exact on its AVX2 kernels too:
    encoder.c). Decides the weight type of the embedder bundles built here (edge.build.encoder.int8_weight_type);
    EDGE_RAG_U8S8=exact|saturates builds for another CPU."""
    from edge.cpu import U8S8_ENV, u8s8_exact

    if u8s8_exact() or os.environ.get(U8S8_ENV, "").strip().lower() in ("exact", "saturates"):
        return u8s8_exact()
    return os.environ.get(native_env(), "").strip() != "0" and machine_refusal() is None


def pack_weight(w: np.ndarray) -> np.ndarray:
    """[K, N] int8 -> [N / 64][K / 4][64][4]: element [nb][k4][c][t] = w[4 k4 + t][64 nb + c]."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k // 4, 4, n // NB, NB).transpose(2, 0, 3, 1))


def pack_weight16(w: np.ndarray) -> np.ndarray:
    """[K, N] int8 -> int16 [N / 16][K / 2][16][2] (encoder.c's AVX2 GEMM, vpmaddwd): element [nb][k2][c][t] =
    w[2 k2 + t][16 nb + c]."""
    k, n = w.shape
    return np.ascontiguousarray(w.astype(np.int16).reshape(k // 2, 2, n // 16, 16).transpose(2, 0, 3, 1))


def read_graph(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The initializers of an embedder graph and the attributes encoder.c needs."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise NativeUnavailable("the native encoder reads model.onnx with the `onnx` package, which is not installed") from None
    model = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    attrs: dict[str, Any] = {"ops": {n.op_type for n in model.graph.node}}
    for node in model.graph.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        if node.op_type == "EmbedLayerNormalization":
            attrs["emb_ln_eps"] = a.get("epsilon", 1e-12)
        elif node.op_type == "LayerNormalization":
            attrs["ln_eps"] = a.get("epsilon", 1e-5)
        elif node.op_type == "MultiHeadAttention":
            attrs["n_heads"] = int(a["num_heads"])
    return arrays, attrs


def graph_arrays(bundle: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """read_graph of the bundle's model.onnx, through a cache: importing `onnx` alone takes ~0.9 s
    (measured on the 2-core EPYC), which every `ask` would pay. The first open writes the graph's
    arrays and attributes to $EDGE_RAG_HOME/native/encoder-<model.onnx sha256>.safetensors (a temp file
    renamed into place); later opens read that with safetensors (~0.1 s)."""
    from safetensors.numpy import load_file, save_file

    from edge.paths import home

    art = bundle.manifest.artifacts.get("model.onnx")
    cache = home() / "native" / f"encoder-{art.sha256[:24]}.safetensors" if art else None
    if cache is not None and cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), framework="np") as f:
                meta = f.metadata() or {}
            attrs = json.loads(meta["attrs"])
            attrs["ops"] = set(attrs["ops"])
            return load_file(str(cache)), attrs
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.info("native encoder cache %s unreadable (%s); reading model.onnx", cache, e)
    arrays, attrs = read_graph(bundle.file("model.onnx"))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=cache.parent)
            os.close(fd)
            meta = {"attrs": json.dumps({**attrs, "ops": sorted(attrs["ops"])})}
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=meta)
            os.replace(tmp, cache)
        except OSError as e:  # a read-only or full home: run without the cache
            log.info("cannot write the native encoder cache %s (%s)", cache, e)
            Path(tmp).unlink(missing_ok=True)
    return arrays, attrs


# the ops of the int8 per-row graph (edge.build.encoder: quantize_linears_per_row, attention "mha"
# or "mha-unpadded", _add_layer_norm, mean pooling, L2): a graph with any other op is not this one
GRAPH_OPS = {"EmbedLayerNormalization", "Mul", "Abs", "ReduceMax", "Max", "Reciprocal", "QuantizeLinear",
             "MatMulIntegerToFloat", "MultiHeadAttention", "Add", "LayerNormalization", "BiasGelu", "Cast",
             "Unsqueeze", "ReduceSum", "Div", "ReduceL2", "Identity"}


class NativeEncoder:
    """The encoder of one int8 embedder bundle on this CPU. `run` may be called from several threads
    at once (each call has its own scratch; the weights are only read)."""

    def __init__(self, arrays: dict[str, np.ndarray], attrs: dict[str, Any], *, pooling: str = "mean",
                 normalize: bool = True, force_scalar: bool = False):
        if pooling != "mean" or not normalize:
            raise NativeUnavailable(f"the native encoder computes mean pooling with L2 normalisation, not {pooling}"
                                    f"{'' if normalize else ' unnormalised'}")
        extra = attrs["ops"] - GRAPH_OPS
        if extra or "MatMulIntegerToFloat" not in attrs["ops"]:
            raise NativeUnavailable(f"the graph is not the int8 per-row graph (ops {sorted(extra) or 'without int8 GEMMs'})")
        self.lib = load_lib()
        self.isa = "scalar" if force_scalar else ISAS.get(self.lib.er_enc_isa(), "scalar")
        self._keep: list[np.ndarray] = []  # every array a pointer of the structs points into

        def get(name: str) -> np.ndarray:
            if name not in arrays:
                raise NativeUnavailable(f"the graph has no {name}")
            return arrays[name]

        def keep(a: np.ndarray, dtype: Any = np.float32) -> int:
            a = np.ascontiguousarray(a, dtype=dtype)
            self._keep.append(a)
            return a.ctypes.data

        def scalar(name: str, default: float | None = None) -> float:
            v = get(name) if default is None else arrays.get(name, np.float32(default))
            return np.asarray(v).reshape(-1)[0].item()  # 0-d in the graph, [1] or 0-d from the cache

        qscale = np.float32(scalar(names.ROW_QUANT_SCALE))
        if int(scalar(names.ROW_QUANT_ZERO_POINT)) != 128:
            raise NativeUnavailable("the graph's activation zero point is not 128")
        word, pos = get(names.WORD_EMBEDDINGS), get(names.POSITION_EMBEDDINGS)
        hidden = int(word.shape[1])
        n_heads = int(attrs.get("n_heads", 0))
        if not n_heads or hidden % n_heads:
            raise NativeUnavailable("the graph has no MultiHeadAttention head count")
        n_layers = 0
        while names.bias(names.layer_key(n_layers, names.QKV)) in arrays:
            n_layers += 1
        if not n_layers:
            raise NativeUnavailable("the graph has no layers the native encoder knows")

        def lin(keys: list[str], bias: np.ndarray, smooth: str | None) -> EncLin:
            """One GEMM of the int8 linears `keys` (q, k, v: their weights side by side)."""
            ws, ss = [], []
            for key in keys:
                w = get(names.weight_quantized(key))
                if w.dtype != np.int8 or np.any(get(names.weight_zero_point(key)) != 0):
                    raise NativeUnavailable(f"{key}: weights are {w.dtype} with a zero point; the native encoder "
                                            "takes int8 weights (edge.build.encoder.int8_weight_type)")
                ws.append(w)
                ss.append(get(names.weight_scale(key)).astype(np.float32))
            w = np.concatenate(ws, axis=1) if len(ws) > 1 else ws[0]
            k, n = w.shape
            if k % 4 or n % NB:
                raise NativeUnavailable(f"{', '.join(keys)}: a {k} x {n} weight is not a multiple of 4 x {NB}")
            mult = (qscale * np.concatenate(ss)).astype(np.float32)
            corr = (128 * w.astype(np.int32).sum(axis=0)).astype(np.int32)
            sm = keep(get(smooth)) if smooth else None
            packed = keep(pack_weight16(w), np.int16) if self.isa in INT16_ISAS else keep(pack_weight(w), np.int8)
            return EncLin(n, k, packed, keep(corr, np.int32), keep(mult), keep(bias), sm)

        layers = (EncLayer * n_layers)()
        inter = 0
        for i in range(n_layers):
            qkv, o, up, down, attn_ln, mlp_ln = (names.layer_key(i, part) for part in
                                                 (names.QKV, names.O_PROJ, names.MLP_UP, names.MLP_DOWN, names.ATTN_LN, names.MLP_LN))
            q_k_v = [names.qkv_key(i, t) for t in names.QKV_PARTS]
            inter = int(get(names.weight_quantized(up)).shape[1])
            # smoothing vectors are named after the first node reading the smoothed input: the q MatMul for q, k, v
            layers[i] = EncLayer(
                lin(q_k_v, get(names.bias(qkv)), names.smooth_inv(names.matmul_node(q_k_v[0]))),
                lin([o], get(names.bias(o)), None),
                lin([up], get(names.bias(up)), names.smooth_inv(names.matmul_node(up))),
                lin([down], get(names.bias(down)), None),
                keep(get(names.weight(attn_ln))), keep(get(names.bias(attn_ln))),
                keep(get(names.weight(mlp_ln))), keep(get(names.bias(mlp_ln))),
            )
        self._layers = layers
        self.dim = hidden
        self.max_pos = int(pos.shape[0])
        self.model = Enc(n_layers, hidden, n_heads, hidden // n_heads, inter, int(word.shape[0]), self.max_pos,
                         int(force_scalar), float(attrs.get("ln_eps", 1e-12)), float(attrs.get("emb_ln_eps", 1e-12)), float(qscale),
                         scalar(names.ROW_QUANT_EPS), scalar(names.EPS_NORM, 1e-12),
                         keep(word), keep(pos), keep(get(names.EMBED_LN_WEIGHT)), keep(get(names.EMBED_LN_BIAS)),
                         C.cast(layers, C.POINTER(EncLayer)))

    @classmethod
    def open(cls, bundle: Any, **kw: Any) -> "NativeEncoder":
        """The native encoder of an embedder bundle, or NativeUnavailable with why not."""
        m = bundle.manifest
        if m.quant.recipe != "int8":
            raise NativeUnavailable(f"the native encoder runs int8 bundles, not {m.quant.recipe}")
        arrays, attrs = graph_arrays(bundle)
        return cls(arrays, attrs, pooling=m.model.get("pooling", "mean"), normalize=bool(m.model.get("normalize", True)), **kw)

    def run(self, batch: list[list[int]]) -> np.ndarray:
        """[len(batch), dim] float32: one unit vector per text of token ids ([CLS] ... [SEP])."""
        lens = np.array([len(x) for x in batch], np.int32)
        if len(lens) == 0:
            return np.empty((0, self.dim), np.float32)
        if lens.min() < 1 or lens.max() > self.max_pos:
            raise BackendError(f"a text of {lens.min() if lens.min() < 1 else lens.max()} tokens: the encoder takes 1..{self.max_pos}")
        ids = np.fromiter((t for x in batch for t in x), np.int32, int(lens.sum()))
        out = np.empty((len(batch), self.dim), np.float32)
        work = np.empty(self.lib.er_encode_work_bytes(C.byref(self.model), int(lens.sum()), int(lens.max())), np.uint8)
        rc = self.lib.er_encode(C.byref(self.model), len(batch), lens.ctypes.data, ids.ctypes.data,
                                out.ctypes.data, work.ctypes.data)
        if rc != 0:
            raise BackendError("the native encoder was given a token id outside its vocabulary")
        return out
