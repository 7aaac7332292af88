"""MemoryPlan: will this model fit this device, and how should it be built?

Plain arithmetic over a ModelSpec and a DeviceProfile; no weights are loaded. Weight bytes come
from edge.quant.policy (the single source of truth for per-module precision and the stored
layout of edge.quant.format); this module only adds up what else has to live in memory:

    device memory
      - OS reserve (profile: L4T, carve-outs, CUDA context)
      - the user's --reserve (their robotics stack)
      - embedding engine (all-MiniLM-L6-v2, fp32) + its activations (batch 16 x 256 tokens)
      - vector index for N chunks (384-dim float32 vectors + SQLite text/FTS), default 10k chunks
      - runtime: fixed backend overhead + decoder activations for one prefill chunk
      = available for the generator
      - weights (per build option)
      = KV cache budget -> tokens -> max context x concurrency

Decode speed is bounded by memory bandwidth: every step reads all decode weights once (plus
the KV cache of each sequence), so tok/s <= bandwidth / bytes read per token, per power mode.

The recommendation is the highest-precision option that meets the requested context and
concurrency: fp16 > int8 > int4 g32 > g64 > g128, with fp16 KV. The plan never chooses int8 KV
itself (RUNTIME_KV_DTYPES: what every backend allocates); `edge-rag build --kv-dtype int8` writes the
int8-KV column into the manifest, which the native CPU backend allocates as int8 K/V (one fp16
scale per token and KV head) and the other backends hold as fp16 of the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge.errors import UsageError
from edge.models.spec import ModelSpec
from edge.profiles import GIB, DeviceProfile, format_size, list_profiles, load_profile, parse_size
from edge.quant.format import INT4_GROUP_SIZES
from edge.quant.policy import bytes_read_per_token, weight_bytes

__all__ = ["BuildOption", "MemoryPlan", "OptionRow", "parse_size", "plan_model", "embedder_bytes"]

# ---- stated constants (each one is a modelling choice; change here, nowhere else) ----------

# all-MiniLM-L6-v2: 22.7M parameters. Counted at fp32 (4 B/param), an upper bound: the default
# engine is int8 with fp32 FFN-down layers (edge.engines.DEFAULT_EMBEDDER_QUANT), 65 MiB on disk.
EMBEDDER_PARAMS = 22_713_216
EMBEDDER_BYTES_PER_PARAM = 4
EMBEDDER_SHAPE = {"hidden": 384, "intermediate": 1536, "heads": 12}  # used when its config is absent
EMBED_BATCH, EMBED_SEQ = 16, 256  # ingestion batch the embedder's activations are sized for
EMBED_DIM = 384
# Per indexed chunk: one float32 vector in FAISS plus the SQLite store. Measured on the 31,008
# chunks of bench/scale_corpus.py (200-token chunks): 5,031 bytes of SQLite files per chunk: the
# text (~0.8 KB), its FTS5 index, metadata, and a float32 copy of the vector (1,536 B: the store is
# the source of truth that repairs the index and re-ranks IVF-PQ). The old figure, 2,560, had no
# vector copy. Counted as resident: the index is memory-mapped and searches touch the store.
SQLITE_BYTES_PER_CHUNK = 5_120
DEFAULT_INDEX_CHUNKS = 10_000
# Backend session, kernels / TensorRT plan activations arena, tokenizer, Python: fixed overhead.
RUNTIME_FIXED_BYTES = 256 * 2**20
PREFILL_CHUNK = 512  # tokens per prefill step (chunked prefill bounds activations)
ATTN_KEY_BLOCK = 1024  # attention scores are formed over key blocks of this many tokens (flash-style)
KV_BLOCK_TOKENS = 16  # paged KV cache block size: capacity is counted in whole blocks
KV_DTYPES = ("fp16", "int8")
RUNTIME_KV_DTYPES = ("fp16",)  # what every backend allocates; int8 KV only when the build asks for it (--kv-dtype int8)
_QUANT_PRECISION = {"fp16": "fp16", "int8": "int8", "int4": "int4_weight_only"}


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOption:
    """How to build the generator: weight recipe, int4 group size (0 otherwise), KV dtype."""

    quant: str  # "fp16" | "int8" | "int4"
    group_size: int = 0
    kv_dtype: str = "fp16"  # "fp16" | "int8"

    @property
    def label(self) -> str:
        w = f"int4-g{self.group_size}" if self.quant == "int4" else self.quant
        return f"{w} weights, {self.kv_dtype} KV"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OptionRow:
    """One weight build option and what it leaves for the KV cache, for both KV dtypes."""

    quant: str
    group_size: int
    supported: bool  # the profile supports this precision
    weight_bytes: int
    weight_parts: dict[str, int]  # layers, lm_head, embeddings, norms_biases
    bytes_read_per_token: int  # weights one decode step reads
    kv_bytes_per_token: dict[str, int]  # per KV dtype, all layers, K and V
    kv_tokens: dict[str, int]  # KV capacity in tokens (whole blocks), per KV dtype
    max_context: dict[str, int]  # longest context per sequence at the requested concurrency
    max_batch: dict[str, int]  # most sequences at the requested context
    fits: dict[str, bool]  # meets context x concurrency
    decode_tok_s: dict[str, float]  # per power mode: batch 1, empty cache (upper bound)
    decode_tok_s_at_context: dict[str, float]  # per power mode: batch 1, fp16 KV of `context` tokens

    @property
    def label(self) -> str:
        return f"int4-g{self.group_size}" if self.quant == "int4" else self.quant

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryPlan:
    """What fits: the budget, one row per build option, the recommendation and its limits."""

    model: dict[str, Any]
    profile: str
    power_mode: str
    context: int
    concurrency: int
    reserve_bytes: int
    budget: dict[str, int]
    options: tuple[OptionRow, ...]
    recommendation: BuildOption | None
    advice: str
    speed: dict[str, float] = field(default_factory=dict)  # recommendation: tok/s upper bound per mode

    @property
    def fits(self) -> bool:
        return self.recommendation is not None

    def row(self, quant: str, group_size: int = 0) -> OptionRow:
        for r in self.options:
            if r.quant == quant and (quant != "int4" or r.group_size == group_size):
                return r
        raise KeyError(f"no option {quant} g{group_size}")

    @property
    def limits(self) -> dict[str, int]:
        """max_context (per sequence, at the requested concurrency) and max_batch (sequences at
        the requested context) for the recommendation; zeros when nothing fits."""
        rec = self.recommendation
        if rec is None:
            return {"max_context": 0, "max_batch": 0}
        r = self.row(rec.quant, rec.group_size)
        return {"max_context": r.max_context[rec.kv_dtype], "max_batch": r.max_batch[rec.kv_dtype]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; this is what engine manifests store under "plan"."""
        rec = self.recommendation
        kv = {}
        if rec is not None:
            r = self.row(rec.quant, rec.group_size)
            kv = {
                "kv_dtype": rec.kv_dtype,
                "kv_tokens": r.kv_tokens[rec.kv_dtype],
                "kv_block_tokens": KV_BLOCK_TOKENS,
                "kv_blocks": r.kv_tokens[rec.kv_dtype] // KV_BLOCK_TOKENS,
                "kv_bytes_per_token": r.kv_bytes_per_token[rec.kv_dtype],
            }
        return {
            "schema": 1,
            "model": dict(self.model),
            "profile": self.profile,
            "power_mode": self.power_mode,
            "request": {"context": self.context, "concurrency": self.concurrency, "reserve_bytes": self.reserve_bytes},
            "budget": dict(self.budget),
            "options": [r.to_dict() for r in self.options],
            "recommendation": rec.to_dict() if rec else None,
            "limits": {**self.limits, **kv},
            "speed_tok_s": dict(self.speed),
            "advice": self.advice,
            "assumptions": _assumptions(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _assumptions() -> dict[str, Any]:
    return {
        "embedder": "all-MiniLM-L6-v2, fp32 engine",
        "embed_activation_batch": [EMBED_BATCH, EMBED_SEQ],
        "index_vector": f"{EMBED_DIM}-dim float32",
        "sqlite_bytes_per_chunk": SQLITE_BYTES_PER_CHUNK,
        "runtime_fixed_bytes": RUNTIME_FIXED_BYTES,
        "prefill_chunk_tokens": PREFILL_CHUNK,
        "attention_key_block": ATTN_KEY_BLOCK,
        "kv_int8": "int8 K and V with one fp16 scale per token and KV head",
        "weights": "edge.quant.policy: LM head int8 under int8/int4, embeddings fp16, norms fp16",
        "decode_bound": "bandwidth / bytes read per token (weights, + KV of the context where stated)",
    }


# ---- the pieces -----------------------------------------------------------------------------


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str) -> int:
    """K and V of every layer for one token. int8 stores one fp16 scale per token and KV head."""
    if kv_dtype == "fp16":
        return int(spec.kv_bytes_per_token(2.0))
    if kv_dtype == "int8":
        return 2 * spec.n_layers * spec.n_kv_heads * (spec.head_dim + 2)
    raise ValueError(f"kv dtype {kv_dtype!r} not in {KV_DTYPES}")


def embedder_bytes(folder: Path | None = None) -> int:
    """Stored size of the embedding engine: the default embedder's weight files when the
    package is installed, else EMBEDDER_PARAMS x 4 bytes (fp32)."""
    try:
        if folder is None:
            from edge.models.defaults import default_embedder_path

            folder = default_embedder_path()
        files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("*.bin"))
        if files:
            return sum(f.stat().st_size for f in files)
    except Exception:  # package absent (ModelError) or unreadable folder: use the stated constant
        pass
    return EMBEDDER_PARAMS * EMBEDDER_BYTES_PER_PARAM


def _embedder_shape(folder: Path | None = None) -> dict[str, int]:
    try:
        if folder is None:
            from edge.models.defaults import default_embedder_path

            folder = default_embedder_path()
        cfg = json.loads((Path(folder) / "config.json").read_text())
        return {"hidden": int(cfg["hidden_size"]), "intermediate": int(cfg["intermediate_size"]), "heads": int(cfg["num_attention_heads"])}
    except Exception:
        return dict(EMBEDDER_SHAPE)


def embedder_workspace_bytes(folder: Path | None = None) -> int:
    """fp32 activations of one embedding batch: hidden states, FFN and attention scores."""
    s = _embedder_shape(folder)
    per_token = 4 * s["hidden"] + s["intermediate"] + s["heads"] * EMBED_SEQ
    return EMBED_BATCH * EMBED_SEQ * per_token * 4


def index_bytes(chunks: int) -> int:
    """FAISS float32 vectors + SQLite text/FTS for `chunks` chunks."""
    return chunks * (EMBED_DIM * 4 + SQLITE_BYTES_PER_CHUNK)


# The vector index may take this share of a device's usable memory (rag.index.choose_index picks
# flat / HNSW / IVF-PQ under it): Orin Nano 4GB 50 MB, 8GB 130 MB, AGX Orin 64GB 1.3 GB.
INDEX_MEMORY_SHARE = 0.02


def index_budget_bytes(profile: DeviceProfile | str | None = None) -> int:
    """Memory budget of the vector index on `profile` (default: the detected device)."""
    from edge.profiles import detect_profile

    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile or detect_profile())
    return int(prof.usable_bytes * INDEX_MEMORY_SHARE)


def decoder_workspace_bytes(spec: ModelSpec, concurrency: int) -> int:
    """Decoder activations of the largest step: a prefill chunk (or the decode batch if larger).

    fp16 per token: residual, norm and attention outputs (3 x H), q/k/v, gate/up/act (3 x I);
    fp32 attention scores n_heads x tokens x ATTN_KEY_BLOCK; fp32 last-token logits per sequence.
    """
    t = max(PREFILL_CHUNK, concurrency)
    per_token = 3 * spec.hidden_size + spec.q_size + 2 * spec.kv_size + 3 * spec.intermediate_size
    scores = spec.n_heads * t * ATTN_KEY_BLOCK * 4
    logits = concurrency * spec.vocab_size * 4
    return t * per_token * 2 + scores + logits


def _blocks(tokens: int) -> int:
    return -(-tokens // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def _weight_options() -> list[tuple[str, int]]:
    """Build options in precision order: fp16, int8 per-channel, int4 by group size."""
    return [("fp16", 0), ("int8", 0)] + [("int4", g) for g in INT4_GROUP_SIZES]


# ---- the planner ----------------------------------------------------------------------------


def plan_model(
    spec: ModelSpec,
    profile: DeviceProfile | str,
    *,
    context: int = 4096,
    concurrency: int = 1,
    reserve_bytes: int = 0,
    power_mode: str | None = None,
    index_chunks: int = DEFAULT_INDEX_CHUNKS,
    with_embedder: bool = True,
    suggest_devices: bool = True,
) -> MemoryPlan:
    """Plan `spec` on `profile` for `concurrency` sequences of `context` tokens each."""
    prof = load_profile(profile) if isinstance(profile, str) else profile
    mode = prof.power_mode(power_mode)
    if context < 1 or concurrency < 1:
        raise UsageError(f"context ({context}) and concurrency ({concurrency}) must be >= 1")
    if context > spec.max_position:
        raise UsageError(
            f"context {context} exceeds the model's maximum ({spec.max_position} positions)",
            fix=f"use --context {spec.max_position} or less",
        )
    if reserve_bytes < 0 or index_chunks < 0:
        raise UsageError("reserve and index chunks must be >= 0")

    budget = {
        "memory": prof.memory_bytes,
        "os_reserve": prof.os_reserve_bytes,
        "user_reserve": int(reserve_bytes),
        "embedder": embedder_bytes() if with_embedder else 0,
        "embedder_workspace": embedder_workspace_bytes() if with_embedder else 0,
        "index": index_bytes(index_chunks) if with_embedder else 0,
        "index_chunks": index_chunks if with_embedder else 0,
        "runtime_fixed": RUNTIME_FIXED_BYTES,
        "workspace": decoder_workspace_bytes(spec, concurrency),
    }
    overhead = sum(budget[k] for k in ("os_reserve", "user_reserve", "embedder", "embedder_workspace", "index", "runtime_fixed", "workspace"))
    available = prof.memory_bytes - overhead
    budget["available_for_model"] = available
    need_tokens = _blocks(context) * concurrency

    rows = []
    for quant, g in _weight_options():
        parts = weight_bytes(spec, quant, g or 128)
        wbytes = sum(parts.values())
        read = bytes_read_per_token(spec, quant, g or 128)
        kv_budget = available - wbytes
        per_tok = {d: kv_bytes_per_token(spec, d) for d in KV_DTYPES}
        kv_tokens, max_ctx, max_batch, fits = {}, {}, {}, {}
        supported = prof.supports(_QUANT_PRECISION[quant])
        for d in KV_DTYPES:
            toks = max(0, kv_budget) // per_tok[d] // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
            kv_tokens[d] = int(toks)
            max_ctx[d] = int(min(spec.max_position, toks // concurrency // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS))
            max_batch[d] = int(toks // _blocks(context))
            ok_dtype = d in RUNTIME_KV_DTYPES
            fits[d] = bool(supported and ok_dtype and kv_budget > 0 and toks >= need_tokens)
        speed = {m.name: round(m.bandwidth_bytes_s / read, 1) for m in prof.power_modes}
        speed_ctx = {m.name: round(m.bandwidth_bytes_s / (read + per_tok["fp16"] * context), 1) for m in prof.power_modes}
        rows.append(OptionRow(quant, g, supported, wbytes, parts, read, per_tok, kv_tokens, max_ctx, max_batch, fits, speed, speed_ctx))

    recommendation = None
    for r in rows:  # rows are in precision order; within one, fp16 KV before int8 KV
        d = next((d for d in KV_DTYPES if r.fits[d]), None)
        if d is not None:
            recommendation = BuildOption(r.quant, r.group_size, d)
            break

    model = {"name": spec.name, "arch": spec.arch, "n_params": spec.n_params, "max_position": spec.max_position}
    plan = MemoryPlan(
        model=model,
        profile=prof.name,
        power_mode=mode.name,
        context=context,
        concurrency=concurrency,
        reserve_bytes=int(reserve_bytes),
        budget=budget,
        options=tuple(rows),
        recommendation=recommendation,
        advice="",
    )
    speed = {}
    if recommendation is not None:
        r = plan.row(recommendation.quant, recommendation.group_size)
        per = r.kv_bytes_per_token[recommendation.kv_dtype]
        speed = {m.name: round(m.bandwidth_bytes_s / (r.bytes_read_per_token + per * context), 1) for m in prof.power_modes}
    advice = _advice(plan, spec, prof, mode.name, speed, suggest_devices, index_chunks, with_embedder)
    return replace(plan, advice=advice, speed=speed)


def _advice(
    plan: MemoryPlan,
    spec: ModelSpec,
    prof: DeviceProfile,
    mode: str,
    speed: dict[str, float],
    suggest_devices: bool,
    index_chunks: int,
    with_embedder: bool,
) -> str:
    """One paragraph: what is recommended and why, or what would fit and how far off it is."""
    ctx, conc = plan.context, plan.concurrency
    rec = plan.recommendation
    if rec is not None:
        r = plan.row(rec.quant, rec.group_size)
        per = r.kv_bytes_per_token[rec.kv_dtype]
        spare = plan.budget["available_for_model"] - r.weight_bytes - _blocks(ctx) * conc * per
        text = (
            f"Build {rec.label}: {format_size(r.weight_bytes)} of weights and "
            f"{format_size(_blocks(ctx) * conc * per)} of KV for {conc} x {ctx} tokens fit on {prof.name} "
            f"with {format_size(spare)} spare; limits: context up to {plan.limits['max_context']} at "
            f"concurrency {conc}, or {plan.limits['max_batch']} sequences of {ctx}. "
            f"Decode upper bound at {mode}: {speed[mode]:.0f} tok/s per sequence."
        )
        fitting = [o for o in plan.options if o.fits[rec.kv_dtype]]
        fastest = min(fitting, key=lambda o: o.bytes_read_per_token)
        if fastest is not r and fastest.bytes_read_per_token < r.bytes_read_per_token:
            gain = r.bytes_read_per_token / fastest.bytes_read_per_token
            text += f" {fastest.label} would bound decode {gain:.1f}x higher at some quality cost."
        return text

    smallest = min((r for r in plan.options if r.supported), key=lambda r: r.weight_bytes)
    avail = plan.budget["available_for_model"]
    kvd = "int8" if prof.supports("int8") else "fp16"
    per = smallest.kv_bytes_per_token[kvd]
    if smallest.weight_bytes + _blocks(min(ctx, 512)) * per > avail:
        need = smallest.weight_bytes + _blocks(ctx) * conc * per
        short = need - avail
        taken = (
            f"the OS ({format_size(prof.os_reserve_bytes)}), your reserve ({format_size(plan.reserve_bytes)}), "
            f"the embedder, index and workspace"
        )
        left = (
            f"only {format_size(avail)} is left after {taken}" if avail > 0
            else f"{taken} already take {format_size(-avail)} more than the device's {format_size(prof.memory_bytes)}"
        )
        text = (
            f"Nothing fits on {prof.name}: the smallest build ({smallest.label}, {format_size(smallest.weight_bytes)} "
            f"of weights) with {conc} x {ctx} tokens of {kvd} KV needs {format_size(need)}, but {left}: "
            f"{short / GIB:.2f} GiB short."
        )
    else:
        best_ctx = smallest.max_context[kvd]
        best_batch = smallest.max_batch[kvd]
        text = (
            f"Nothing meets {conc} x {ctx} tokens on {prof.name}: the weights fit as {smallest.label} but the "
            f"KV cache does not. With {kvd} KV it fits context {best_ctx} at concurrency {conc}"
            + (f", or concurrency {best_batch} at context {ctx}" if best_batch >= 1 else "")
            + f" (lower --context or --concurrency)."
        )
    if suggest_devices:
        for other in list_profiles():
            if other.kind != prof.kind or other.name == prof.name or other.memory_bytes <= prof.memory_bytes:
                continue
            alt = plan_model(
                spec, other, context=ctx, concurrency=conc, reserve_bytes=plan.reserve_bytes,
                index_chunks=index_chunks, with_embedder=with_embedder, suggest_devices=False,
            )
            if alt.fits:
                text += f" The smallest larger device it fits: {other.name} ({alt.recommendation.label})."
                break
    return text
