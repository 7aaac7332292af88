"""TensorRT plan building from the bundle's `model.trt.onnx` (TensorRT 10.x Python API).

TensorRT cannot be installed on the development machines; only JetPack (or NVIDIA's index)
provides it. So this module is split:

- pure derivation, tested everywhere: optimization-profile shapes from the ONNX graph's
  symbolic dims and the plan's limits (`derive_profile`), and the builder settings from the
  manifest and the device profile (`derive_build_config`);
- `build_plan()`, a thin call sequence over the documented API (OnnxParser ->
  IBuilderConfig -> build_serialized_network), exercised only where `import tensorrt` works.
  UNTESTED here: no machine we have can run it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.bundle import Manifest
from edge.errors import BackendError, BundleError

# Symbolic dim names the graph builders use, and what bounds each.
BATCH_DIMS = ("batch", "batch_size")
SEQ_DIMS = ("sequence", "sequence_length", "seq_len")
PAST_DIMS = ("past_sequence", "past_sequence_length", "past_len")
TOTAL_DIMS = ("total_sequence", "total_sequence_length", "total_len")


@dataclass(frozen=True)
class Shapes:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass
class BuildConfig:
    """Everything build_plan() sets on IBuilderConfig, as plain data."""

    workspace_bytes: int
    strongly_typed: bool  # network precision comes from the Q/DQ + cast nodes of the graph
    fp16: bool
    int8: bool
    dla_core: int | None = None  # Orin's DLA runs only dense conv/fc graphs; decoders stay on GPU
    profiles: list[dict[str, Shapes]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [{k: asdict(v) for k, v in p.items()} for p in self.profiles]
        return d


def _bound(dim: str, *, batch: tuple[int, int, int], seq: tuple[int, int, int], past: tuple[int, int, int]) -> tuple[int, int, int]:
    key = dim.lower()
    if key in BATCH_DIMS:
        return batch
    if key in SEQ_DIMS:
        return seq
    if key in PAST_DIMS:
        return past
    raise BundleError(f"model.trt.onnx: unknown symbolic dimension '{dim}'", fix="rebuild the bundle with this edge-rag")


def graph_inputs(onnx_path: Path) -> dict[str, list[int | str]]:
    """Input name -> dims (int or symbolic name), read without loading weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = dims
    return out


def derive_profile(inputs: dict[str, list[int | str]], *, max_batch: int, max_context: int, opt_batch: int = 1, opt_prefill: int = 512) -> list[dict[str, Shapes]]:
    """Two optimization profiles: prefill (profile 0: seq up to max_context, past 0 up to
    max_context - 1, so chunked prefill and multi-turn continuation fit) and decode (profile 1:
    seq 1, past 1 up to max_context - 1). Splitting them lets TensorRT pick GEMM tactics for
    prefill and GEMV-like tactics for decode instead of one compromise.

    NOTE: the decode profile's past starts at 1, so a first step with an empty cache must
    use the prefill profile.
    """
    if max_batch < 1 or max_context < 2:
        raise ValueError("max_batch >= 1 and max_context >= 2 required")
    opt_prefill = min(opt_prefill, max_context)
    b = (1, min(opt_batch, max_batch), max_batch)
    phases = {
        "prefill": dict(batch=b, seq=(1, opt_prefill, max_context), past=(0, 0, max_context - 1)),
        "decode": dict(batch=b, seq=(1, 1, 1), past=(1, max_context // 2, max_context - 1)),
    }
    profiles = []
    for bounds in phases.values():
        prof = {}
        for name, dims in inputs.items():
            lo, opt, hi = [], [], []
            for d in dims:
                if isinstance(d, int) and d > 0:
                    lo.append(d), opt.append(d), hi.append(d)
                    continue
                if isinstance(d, str) and d.lower() in TOTAL_DIMS:
                    s, p = bounds["seq"], bounds["past"]
                    lo.append(max(1, s[0] + p[0])), opt.append(s[1] + p[1]), hi.append(min(max_context, s[2] + p[2]))
                    continue
                if not isinstance(d, str):
                    raise BundleError(f"model.trt.onnx: input {name} has an unnamed dynamic dimension")
                r = _bound(d, **bounds)
                lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
            prof[name] = Shapes(tuple(lo), tuple(opt), tuple(hi))
        profiles.append(prof)
    return profiles


DEFAULT_WORKSPACE_BYTES = 512 << 20  # TensorRT tactic scratch; the plan's runtime workspace is separate


def derive_build_config(manifest: Manifest, inputs: dict[str, list[int | str]], *, workspace_bytes: int | None = None) -> BuildConfig:
    """Builder settings from the bundle manifest (quant recipe, limits)."""
    if manifest.limits is None:
        raise BundleError("a TensorRT plan needs a generator bundle (its manifest has no limits)")
    max_batch, max_context = manifest.limits.max_batch, manifest.limits.max_context
    recipe = manifest.quant.recipe
    ws = int(workspace_bytes or DEFAULT_WORKSPACE_BYTES)
    return BuildConfig(
        workspace_bytes=ws,
        # NOTE: model.trt.onnx computes in float32 and carries the weight-only quantization as
        # explicit DequantizeLinear nodes. A strongly typed network would pin every op to those
        # fp32 types, so the network is weakly typed and the FP16 flag lets TensorRT lower the
        # GEMMs and attention; the DQ nodes keep the weights INT4/INT8 either way.
        strongly_typed=False,
        fp16=recipe != "fp32",
        int8=False,  # explicit Q/DQ only; implicit INT8 calibration is deprecated in TRT 10
        profiles=derive_profile(inputs, max_batch=max_batch, max_context=max_context),
    )


def build_plan(bundle_path: Path, out: Path) -> Path:  # pragma: no cover - needs TensorRT
    """Parse model.trt.onnx, build a serialized engine for this GPU, write it to `out` (the plan
    cache: edge.runtime.trt_cache.ensure_plan; a bundle is never written to).

    UNTESTED on our machines (TensorRT is not installable there); written against the
    TensorRT 10 Python API documentation.
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed", fix="run this on a Jetson with JetPack 6 (TensorRT 10.3)") from None
    import tempfile

    from edge.bundle import Bundle

    bundle = Bundle.open(bundle_path, kind="generator")
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".trt-onnx-") as work:
        onnx_path = trt_onnx(bundle, Path(work))
        return _build_plan(trt, bundle, onnx_path, Path(out))


def trt_onnx(bundle, work: Path) -> Path:
    """The bundle's model.trt.onnx, or (bundles store their weights once) the TensorRT form derived
    from weights.safetensors into `work`: the same builder, the same bytes as a build-time copy."""
    if bundle.has("model.trt.onnx"):
        return bundle.file("model.trt.onnx")
    from edge.build.onnx_decoder import build_decoder_onnx

    return build_decoder_onnx(bundle.spec, bundle.load_weights(), bundle.manifest.quant, work, "trt",
                              max_context=bundle.limits.max_context)


def _build_plan(trt, bundle, onnx_path: Path, out: Path) -> Path:  # pragma: no cover - needs TensorRT
    cfg = derive_build_config(bundle.manifest, graph_inputs(onnx_path))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if cfg.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if cfg.fp16 and not cfg.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    for prof_shapes in cfg.profiles:
        prof = builder.create_optimization_profile()
        for name, s in prof_shapes.items():
            prof.set_shape(name, s.min, s.opt, s.max)
        config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT failed to build the engine (see the log above)")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out)
    return out
