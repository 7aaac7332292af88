"""The single source of truth for each module's precision under a build recipe.

Recipes: "fp16", "int8" (per-channel weight-only), "int4" (block-wise weight-only, group 32/64/128;
RTN or AWQ only changes the values, not the layout).

Policy, and why:
- decoder linear layers take the recipe; an int4 layer whose in_features is not a multiple of the
  group falls back to int8 (blocks must tile K exactly for MatMulNBits and INT4 DequantizeLinear).
- the LM head is int8 for int4 and int8 recipes: it is the single most error-sensitive matmul
  (it writes the logits) and int8 per-channel costs little there; fp16 otherwise. When embeddings
  are tied, the head is a separate quantized copy (`lm_head.*`) of the embedding table.
- the token embedding table stays fp16: a gather reads one row per token, so it costs memory but
  no bandwidth per step; norms and biases stay fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.models.spec import ModelSpec

RECIPES = ("fp16", "int8", "int4")
# Unquantized float32 weights: a reference build for correctness tests (engine logits vs the
# checkpoint's), never a deployment option, so it is kept out of RECIPES (what the planner offers).
REFERENCE_RECIPE = "fp32"


@dataclass(frozen=True)
class Precision:
    kind: str  # "fp16" | "int8" | "int4" | "fp32" (reference builds)
    group_size: int = 0  # int4 only

    def weight_bytes(self, n: int, k: int) -> int:
        """Stored bytes of an [N, K] weight in the edge.quant.format layout (scales fp16)."""
        if self.kind == "fp32":
            return 4 * n * k
        if self.kind == "fp16":
            return 2 * n * k
        if self.kind == "int8":
            return n * k + 2 * n
        return n * k // 2 + 2 * n * (k // self.group_size)


def module_precision(module: str, recipe: str, group_size: int, k: int) -> Precision:
    """Precision of linear `module` (HF name without `.weight`) with `k` input features."""
    if recipe == REFERENCE_RECIPE:
        return Precision("fp32")
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} not in {RECIPES}")
    if recipe == "fp16":
        return Precision("fp16")
    if module == "lm_head":
        return Precision("int8")
    if recipe == "int4" and k % group_size == 0:
        return Precision("int4", group_size)
    return Precision("int8")


def linear_modules(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Every quantizable linear as HF module name -> (N, K), LM head included."""
    out = {}
    for i in range(spec.n_layers):
        for name, shape in spec.linear_shapes.items():
            out[f"model.layers.{i}.{name}"] = shape
    out["lm_head"] = (spec.vocab_size, spec.hidden_size)
    return out


def weight_bytes(spec: ModelSpec, recipe: str, group_size: int = 128) -> dict[str, int]:
    """Stored bytes by part: decoder linears, lm_head, embeddings, norms+biases."""
    layers = head = 0
    for name, (n, k) in linear_modules(spec).items():
        b = module_precision(name, recipe, group_size, k).weight_bytes(n, k)
        if name == "lm_head":
            head = b
        else:
            layers += b
    small = 2 * spec.norm_bias_params  # fp16: every norm weight (sandwich and q/k norms included) and bias
    return {"layers": layers, "lm_head": head, "embeddings": 2 * spec.embedding_params, "norms_biases": small}


def bytes_read_per_token(spec: ModelSpec, recipe: str, group_size: int = 128) -> int:
    """Weight bytes one decode step reads (the gathered embedding row is negligible)."""
    wb = weight_bytes(spec, recipe, group_size)
    return wb["layers"] + wb["lm_head"] + wb["norms_biases"] + 2 * spec.hidden_size
