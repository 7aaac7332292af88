"""`edge-rag build` for decoders: checkpoint -> plan -> quantized weights -> ONNX -> bundle.

    read checkpoint (HF folder | GGUF)     edge.models.checkpoint.load_checkpoint
    plan for the profile                   edge.plan.plan_model (limits, `auto` recipe)
    tokenizer files                        edge.models.tokenizer_export
    calibration + quantization (+AWQ)      edge.quant.calib / edge.quant.quantize, layer by layer
    weights.safetensors                    edge.bundle.WeightsSpool: each tensor written as it is made
    model.ort.onnx (weights by reference)  edge.build.onnx_decoder.build_decoder_onnx
    [model.trt.onnx: derived on the target when TensorRT builds its plan, edge.build.trt_plan]
    manifest.json (commit: checksums, atomic rename)   edge.bundle.Manifest

The quantized weights are the source of truth and are stored once: model.ort.onnx references their
bytes in weights.safetensors (ONNX external data; ONNX Runtime folds the layout changes at load),
and the TensorRT form is derived from them on the device (`forms=("ort", "trt")` stores it too).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edge.bundle import BundleWriter, Limits, MappedWeights, Manifest, Quant, TokenizerInfo
from edge.errors import PlanError, UsageError
from edge.quant.format import INT4_GROUP_SIZES

QUANTS = ("auto", "int4", "int8", "fp16", "fp32")
ONNX_FORMS = ("ort", "trt")
DEFAULT_FORMS = ("ort",)  # the TensorRT form is derived from the weights on the target (edge.build.trt_plan)
DEFAULT_CONTEXT = 4096
GPTQ_CALIB_SEQS = 64  # x 128 tokens: calibration sequences for AWQ+GPTQ builds (RTN/AWQ keep calib.DEFAULT_SEQS)
DEFAULT_MAX_BATCH_CAP = 8  # the plan's max_batch is an upper bound; sessions preallocate this many


def validate_options(quant: str, group_size: int | None) -> None:
    """One-line UsageErrors for values the CLI cannot check by type alone."""
    if quant not in QUANTS:
        raise UsageError(f"unsupported quant {quant!r}", fix=f"use one of {', '.join(QUANTS)}")
    if group_size is not None and group_size not in INT4_GROUP_SIZES:
        raise UsageError(f"unsupported group size {group_size}", fix=f"use one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    if group_size is not None and quant in ("int8", "fp16", "fp32"):
        raise UsageError(f"--group-size applies to int4 builds, not {quant}", fix="drop --group-size or use --quant int4")


def default_group_size(hidden_size: int) -> int:
    """The largest int4 group that tiles the hidden size (so q/k/v/o/gate/up stay int4)."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if hidden_size % g == 0:
            return g
    return min(INT4_GROUP_SIZES)


def source_info(path: Path) -> dict[str, Any]:
    """Where the weights came from: GGUF file sha256, or the HF folder's config sha256 + files."""
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(1 << 22):
                h.update(b)
        return {"path": str(path.resolve()), "format": "gguf", "sha256": h.hexdigest(), "bytes": path.stat().st_size}
    cfg = path / "config.json"
    files = sorted(p.name for p in path.glob("*.safetensors"))
    return {
        "path": str(path.resolve()),
        "format": "hf",
        "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(),
        "weight_files": {f: (path / f).stat().st_size for f in files},
    }


class _Stages:
    """A rich progress bar over build stages (and the layers of the quantization stage)."""

    def __init__(self, enabled: bool, n_layers: int, n_forms: int, on_stage: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.on_stage = on_stage
        self.n_layers = n_layers
        self.n_forms = n_forms
        self.progress = None
        self.task = None

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.plain = False
        if self.enabled:
            from rich.console import Console

            if not Console(stderr=True).is_terminal:
                # NOTE: rich draws nothing when stderr is a pipe or a log file (`make demo | tee`,
                # systemd): say each stage on its own line instead, with the time so far
                self.plain = True
                return self
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.progress.__enter__()
            # stages: read, plan, tokenizer, calibrate, layers (+ head), weights, onnx forms, commit
            self.task = self.progress.add_task("build", total=6 + self.n_forms + self.n_layers + 1)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _line(self, description: str | None) -> None:
        if self.on_stage is not None and description:
            self.on_stage(description)
        if self.plain and description:
            sys.stderr.write(f"  build: {description} ({time.perf_counter() - self.t0:.0f} s)\n")
            sys.stderr.flush()

    def step(self, description: str | None = None, advance: int = 1) -> None:
        self._line(description)
        if self.progress is not None:
            kw = {"description": description} if description else {}
            self.progress.update(self.task, advance=advance, **kw)

    def layer_done(self, i: int) -> None:
        """Layer i quantized (i == n_layers: the LM head); the bar advances, on_stage hears what is next."""
        self.step()
        if self.on_stage is not None and i < self.n_layers:
            self.on_stage(f"layer {i + 1}" if i + 1 < self.n_layers else "LM head")

    def describe(self, description: str) -> None:
        self._line(description)
        if self.progress is not None:
            self.progress.update(self.task, description=description)


def _plan(spec, profile: str, context: int):
    """The planner's MemoryPlan, or None with a note when edge.plan is not available."""
    try:
        from edge.plan import plan_model
    except ImportError:
        return None
    return plan_model(spec, profile, context=context)


def _limits(plan, recipe: str, group_size: int, context: int, explicit_context: bool, spec,
            kv_dtype: str | None = None) -> tuple[Limits, int | None]:
    """The runtime's limits for the chosen build from the plan's row of that option, and the
    plan's weight bytes for it (None when unplanned or fp32). kv_dtype "int8": the plan's int8-KV
    column (the native CPU backend allocates it; the others hold the same bytes in fp16)."""
    if plan is None:
        return Limits(max_context=context, max_batch=1, kv_dtype=kv_dtype or "fp16"), None
    from edge.plan import KV_BLOCK_TOKENS

    quant = "fp16" if recipe == "fp32" else recipe  # fp32 reference builds are sized like fp16 (lower bound)
    row = plan.row(quant, group_size if quant == "int4" else 0)
    if kv_dtype == "int8":  # the plan offers int8 KV for information only (RUNTIME_KV_DTYPES): asked for, it fits like fp16 does
        need = -(-plan.context // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS * plan.concurrency
        kv = "int8" if row.supported and row.kv_tokens["int8"] >= need else None
    else:
        kv = next((d for d in ("fp16", "int8") if row.fits.get(d)), None)
    if kv is None:
        raise PlanError(
            f"{spec.name or spec.arch} at {quant}{f'-g{group_size}' if quant == 'int4' else ''} does not fit {plan.profile} with a {context}-token context",
            fix=plan.advice.splitlines()[0] if plan.advice else "use a smaller --context, --quant int4 or a larger profile",
        )
    max_ctx = int(context if explicit_context else row.max_context[kv])
    max_batch = int(max(1, min(row.max_batch[kv], DEFAULT_MAX_BATCH_CAP)))
    per_seq = -(-max_ctx // KV_BLOCK_TOKENS)
    # the plan's KV budget in blocks, capped at what max_batch sequences of max_context can use
    blocks = max(per_seq, min(row.kv_tokens[kv] // KV_BLOCK_TOKENS, max_batch * per_seq))
    limits = Limits(max_context=max_ctx, max_batch=max_batch, kv_blocks=int(blocks), kv_block_size=KV_BLOCK_TOKENS,
                    kv_dtype=kv, plan_max_batch=int(row.max_batch[kv]))
    return limits, (int(row.weight_bytes) if recipe != "fp32" else None)


def build_generator_bundle(
    model: str | Path,
    out: str | Path,
    *,
    profile: str | None = None,
    quant: str = "auto",
    group_size: int | None = None,
    calib: Path | None = None,
    awq: bool = True,
    gptq: bool = True,
    context: int | None = None,
    progress: bool = True,
    report: bool = True,
    forms: tuple[str, ...] = DEFAULT_FORMS,
    on_stage: Callable[[str], None] | None = None,
    kv_dtype: str | None = None,
) -> Path:
    """Build a generator engine bundle at `out` from an HF folder, a .gguf file or 'default'.

    quant: auto (the planner's recommendation) | int4 (AWQ+GPTQ; awq=False: plain RTN; gptq=False:
    plain AWQ) | int8 | fp16 |
    fp32 (unquantized reference). kv_dtype: None (the plan's: fp16) | "fp16" | "int8" (int8 K and V with
    one fp16 scale per token and kv head: what the native CPU backend allocates). on_stage(description) is called as each stage (and each layer of
    the quantization, "layer i") begins (bench/build_memory.py). Returns the bundle path (written
    atomically)."""
    from edge.models.defaults import resolve_model
    from edge.models.spec import read_spec

    validate_options(quant, group_size)
    if kv_dtype not in (None, "fp16", "int8"):
        raise UsageError(f"--kv-dtype {kv_dtype!r} is not one of fp16, int8", fix="use --kv-dtype int8 or leave it out (fp16)")
    t0 = time.time()
    src = resolve_model(model)
    spec = read_spec(src)
    if profile is None:
        from edge.profiles import detect_profile

        profile = detect_profile()
    else:
        from edge.profiles import load_profile

        profile = load_profile(profile).name
    explicit_context = context is not None
    ctx = int(context) if context is not None else min(DEFAULT_CONTEXT, spec.max_position)
    if ctx < 1 or ctx > spec.max_position:
        raise UsageError(f"context {ctx} is outside 1..{spec.max_position} (the model's maximum)", fix=f"use --context {min(DEFAULT_CONTEXT, spec.max_position)}")
    if calib is not None and not Path(calib).is_file():
        raise UsageError(f"--calib {calib}: no such file", fix="give a UTF-8 text file")

    plan = _plan(spec, profile, ctx)
    notes: list[str] = []
    if plan is None:
        notes.append("edge.plan unavailable: limits not planned")
    recipe = quant
    if quant == "auto":
        if plan is None or plan.recommendation is None:
            if plan is not None:
                raise PlanError(f"{spec.name or spec.arch} does not fit {profile} at any precision", fix=plan.advice.splitlines()[0] if plan.advice else None)
            recipe = "int4"
        else:
            recipe = plan.recommendation.quant
            if recipe == "int4" and group_size is None:
                group_size = plan.recommendation.group_size
    g = int(group_size or default_group_size(spec.hidden_size)) if recipe == "int4" else 0
    use_awq = bool(awq and recipe == "int4")
    use_gptq = bool(use_awq and gptq)
    method = "awq+gptq" if use_gptq else "awq" if use_awq else ("rtn" if recipe in ("int8", "int4") else "none")
    limits, planned_weight_bytes = _limits(plan, recipe, g, ctx, explicit_context, spec, kv_dtype)

    writer = BundleWriter(Path(out), "generator")
    try:
        with _Stages(progress, spec.n_layers, len(forms), on_stage) as bar:
            bar.describe(f"reading {src.name}")
            from edge.models.checkpoint import load_checkpoint

            spec, weights = load_checkpoint(src)
            bar.step("planned")
            bar.step("tokenizer")
            from edge.models.tokenizer_export import export_tokenizer

            tok_cfg = export_tokenizer(src, writer.tmp, spec)
            bar.step("calibrating")
            cal = None
            if recipe in ("int8", "int4"):
                from edge.quant.calib import make_calibration_set

                # GPTQ's Hessian over-fits a small set (SmolLM2 g64: 1024 tokens 13.1, 8192 tokens 11.9 ppl)
                n_seqs = GPTQ_CALIB_SEQS if use_gptq else None
                cal = make_calibration_set(writer.path("tokenizer.json"), Path(calib) if calib else None, **({"n_seqs": n_seqs} if n_seqs else {}))
            bar.step(f"quantizing ({recipe}{f' g{g}' if g else ''}{' ' + method.upper() if use_awq else ''})")
            from edge.quant.quantize import quantize_model

            # each tensor goes to the weights file as it is made: the build holds one layer, not the model
            spool = writer.weights_spool()
            res = quantize_model(spec, weights, recipe, g or 128, calib=cal, awq=use_awq, gptq=use_gptq, on_layer=bar.layer_done,
                                 sink=spool.add)
            del weights
            bar.step("writing weights")
            stored = spool.finish()
            tensors = MappedWeights(writer.path("weights.safetensors"))  # read back on demand, never all at once
            from edge.build import onnx_decoder
            from edge.build.onnx_decoder import build_decoder_onnx

            quant_info = Quant(
                recipe=recipe,
                group_size=g,
                method=method,
                requested=quant,
                # MatMulNBits accuracy level of the ORT graph (recorded so that results can be compared)
                accuracy_level=onnx_decoder.DEFAULT_ACCURACY_LEVEL if recipe in ("int8", "int4") else None,
                policy={
                    "linears": recipe,
                    "int4_fallback": "int8 where in_features is not a multiple of the group size",
                    "lm_head": "int8" if recipe in ("int8", "int4") else recipe,
                    "embeddings": "fp32" if recipe == "fp32" else "fp16",
                    "norms_biases": "fp32" if recipe == "fp32" else "fp16",
                    "tied_lm_head_copy": bool(spec.tie_embeddings and recipe in ("int8", "int4")),
                },
                report=res.report.to_dict(),
                awq_alphas=res.awq_alphas if use_awq else None,
            )
            onnx_files: dict[str, str] = {}
            for form in forms:
                bar.step(f"ONNX ({form})")
                # the ORT form references the weights file's bytes (external data): each weight stored once
                p = build_decoder_onnx(spec, tensors, quant_info, writer.tmp, form, max_context=limits.max_context,
                                       stored=stored if form == "ort" else None)
                onnx_files[form] = Path(p).name
            bar.step("commit")
            manifest = Manifest(
                kind="generator",
                model=spec.to_dict(),
                quant=quant_info,
                limits=limits,
                profile=profile,
                plan=plan.to_dict() if plan is not None else None,
                planned_weight_bytes=planned_weight_bytes,
                source=source_info(src),
                calibration=cal.to_dict() if cal is not None else None,
                tokenizer=TokenizerInfo(source=tok_cfg.source, eos_token_ids=tuple(tok_cfg.eos_token_ids),
                                        bos_token_id=tok_cfg.bos_token_id),
                onnx=onnx_files,
                build_seconds=round(time.time() - t0, 1),
                notes=tuple(notes),
            )
            path = writer.commit(manifest)
            bar.step("done", advance=0)
    except BaseException:
        writer.abort()
        raise
    if progress:
        from rich.console import Console

        con = Console(stderr=True)
        if report and recipe in ("int8", "int4"):
            res.report.print(con)
        con.print(f"[green]built[/green] {path} ({recipe}{f' g{g}' if g else ''}{', ' + method.upper() if use_awq else ''}; "
                  f"max_context {limits.max_context}, max_batch {limits.max_batch}; {time.time() - t0:.0f}s)")
    return path
