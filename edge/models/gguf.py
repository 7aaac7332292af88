"""GGUF checkpoints (llama.cpp): metadata -> ModelSpec, tensors dequantized to float32 HF names.

Tensors of every type K-quant files use (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K, IQ4_NL, IQ4_XS, and the other types the `gguf` package's numpy dequantizer knows) are
dequantized with `gguf.quants.dequantize`, one tensor at a time when it is read: `load_gguf`
returns a lazy mapping over the memory-mapped file, so a build holds one layer in float32 at a
time (the quantizer walks the layers in order), never the whole model.

NOTE llama.cpp's converter permutes the rows of attn_q / attn_k for the `llama` architecture
(its RoPE rotates interleaved pairs (0,1),(2,3)... while HF rotates halves (i, i + d/2)); we
undo that permutation so the weights equal the HF checkpoint's. `qwen2`, `qwen3`, `gemma3` and
`phi3` GGUFs use NeoX RoPE and are stored unpermuted.

Per the architecture's features: the norms map to their roles (edge.models.arch.layer_norm_names:
a Gemma `ffn_norm` is the pre-feedforward norm, `post_attention_norm` / `post_ffw_norm` the
sandwich ones); fused tensors (Phi-3's attn_qkv, and ffn_up holding gate|up) are split into the
HF q/k/v and gate/up rows when read. llama.cpp's converter stores Gemma norms as 1 + w, which is
the folded form every lowering expects (edge.models.hf.fold_norm_offset), so they are taken as
they are. LongRoPE factor tensors are metadata (edge.models.spec.read_gguf_spec), not weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edge.errors import ModelError
from edge.models.checkpoint import LazyWeights, fused_rows, row_index
from edge.models.spec import ModelSpec, _gguf_reader, gguf_field, read_gguf_spec

# GGUF norm tensor (after `blk.N.`) -> its role (edge.models.arch.layer_norm_names)
_NORM_ROLES = {"attn_norm.weight": "attn_in", "ffn_norm.weight": "mlp_in", "post_attention_norm.weight": "attn_out",
               "post_ffw_norm.weight": "mlp_out"}
# the other GGUF tensors (after `blk.N.`) -> HF name (after `model.layers.N.`)
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_FUSED_NAMES = {  # with fused_qkv / fused_gate_up (Phi-3): the fused HF tensors
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
}
ROPE_FACTOR_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
def hf_name(gguf_name: str, features=None) -> str | None:
    """HF tensor name for a GGUF tensor name (per the architecture's features), None for
    tensors we do not know. Fused tensors keep their fused HF name (split when read)."""
    from edge.models.arch import Features, layer_norm_names

    f = features or Features()
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if not m:
        return None
    i, rest = m.group(1), m.group(2)
    norms = layer_norm_names(f)
    if rest in _NORM_ROLES:
        role = _NORM_ROLES[rest]
        return f"model.layers.{i}.{norms[role]}.weight" if role in norms else None
    if (rest == "attn_qkv.weight" and f.fused_qkv) or (rest == "ffn_up.weight" and f.fused_gate_up):
        return f"model.layers.{i}.{_FUSED_NAMES[rest]}"
    if rest in _LAYER_NAMES:
        return f"model.layers.{i}.{_LAYER_NAMES[rest]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: rows [n_heads * d] (any trailing dims).

    llama.cpp: w.reshape(n, 2, d/2, ...).swapaxes(1, 2)  (HF halves -> interleaved pairs).
    Inverse:   w.reshape(n, d/2, 2, ...).swapaxes(1, 2)
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t, path: Path, rows: slice | np.ndarray | None = None) -> np.ndarray:
    """Tensor `t` as float32 in HF orientation; with `rows`, only those rows (of the [N, K] form:
    GGUF blocks run along K, so a row dequantizes from its own bytes alone, to the same values)."""
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    data = t.data
    if rows is not None:
        data = data[rows]  # t.data is [N, K] elements or [N, bytes of a row]: the rows' bytes only
        shape = (data.shape[0], *shape[1:])
    try:
        out = dequantize(data, t.tensor_type)
    except NotImplementedError:
        raise ModelError(
            f"{path}: tensor {t.name} has GGUF type {t.tensor_type.name}, which cannot be dequantized here",
            fix="convert the model with an F16, Q8_0, Q4_0, Q4_1, Q4_K or Q6_K type",
        ) from None
    except (ValueError, IndexError) as e:
        raise ModelError(f"{path}: tensor {t.name} is corrupt or truncated ({e})", fix="re-download the file") from None
    # F32/F16 come back in the file's order; scalars / 1-D stay 1-D. GGUF ne = [K, N] -> [N, K].
    out = np.ascontiguousarray(out, dtype=np.float32).reshape(shape)
    _drop_mapped_pages(data)
    return out


def _drop_mapped_pages(a: np.ndarray) -> None:
    """Hand the memory-mapped file pages under `a` (a view of the GGUF's map) back to the page cache
    once read: a build reads each tensor once or twice, and the pages it touched would otherwise
    stay in its RSS to the end (the whole file, 1.1 GB for Qwen2.5-1.5B Q4_K_M). MADV_DONTNEED
    on a shared file mapping (numpy's mode "r") only unmaps: a later read faults the same bytes
    back in. No-op for arrays that are not views of a map (copies made by index arrays)."""
    import mmap

    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or a.nbytes == 0 or not a.flags.c_contiguous:
        return
    origin = np.frombuffer(base, np.uint8, count=1).ctypes.data
    first = a.ctypes.data - origin
    start = first - first % mmap.PAGESIZE
    base.madvise(mmap.MADV_DONTNEED, start, first + a.nbytes - start)


class GGUFWeights(LazyWeights):
    """HF name -> float32 array, dequantized from the memory-mapped GGUF on every access (no
    cache, except the last fused tensor, whose parts are read one after the other: the caller
    keeps what it needs). `shapes` gives every tensor's shape without reading it. Fused tensors
    appear as their split HF names (rows of the fused one). `rows(name, index)` dequantizes only
    the rows asked for (edge.models.checkpoint.read_rows)."""

    def __init__(self, path: Path, spec: ModelSpec, tensors: dict, permuted: bool):
        self.path, self.spec, self._permuted = path, spec, permuted
        self._t: dict[str, tuple] = {}  # HF name -> (GGUF tensor, rows or None)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for n, t in tensors.items():
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            parts = fused_rows(spec, n)
            if parts and shape[0] != max(b for _, b in parts.values()):
                raise ModelError(f"{path}: tensor {t.name} has {shape[0]} rows, the metadata implies {max(b for _, b in parts.values())}",
                                 fix="the file's metadata and tensors disagree; re-convert the model")
            for name, rows in (parts or {n: None}).items():
                self._t[name] = (t, rows)
                self.shapes[name] = shape if rows is None else (rows[1] - rows[0], *shape[1:])
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        t, rows = self._t[name]
        if rows is None:
            w = _dequantize(t, self.path)
        else:
            if self._last is None or self._last[0] != t.name:
                self._last = (t.name, _dequantize(t, self.path))
            w = np.ascontiguousarray(self._last[1][rows[0] : rows[1]])
        if self._permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            w = unpermute_rope_rows(w, self.spec.n_heads if ".attn_q." in t.name else self.spec.n_kv_heads)
        return w

    def rows(self, name: str, index: slice | np.ndarray) -> np.ndarray:
        """float32 rows `index` (a slice or an int array) of 2-D tensor `name`: equal to
        self[name][index], without dequantizing the other rows."""
        t, part = self._t[name]
        if self._permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            return self[name][index]  # the row permutation mixes rows across heads: read it whole
        return _dequantize(t, self.path, row_index(index, self.shapes[name][0], part[0] if part else 0, name))

    def __contains__(self, name) -> bool:
        return name in self._t  # Mapping's own would dequantize the tensor to answer

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def nbytes(self) -> int:
        """Bytes of the stored (quantized) tensors."""
        return int(sum(t.n_bytes for t in {id(t): t for t, _ in self._t.values()}.values()))


def load_gguf(path: str | Path) -> tuple[ModelSpec, GGUFWeights]:
    """(spec, lazy float32 weights in HF names and orientation) from a GGUF file. Unknown
    tensors, missing ones and shapes the metadata does not imply are refused up front."""
    from edge.models.arch import gguf_arch
    from edge.models.hf import check_weights

    path = Path(path)
    reader = _gguf_reader(path)
    spec = read_gguf_spec(path, reader)
    arch = gguf_arch(gguf_field(reader, "general.architecture", ""), str(path))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelError(
            f"{path}: llama3-style RoPE frequency scaling stored as a GGUF tensor is not supported",
            fix="build from the Hugging Face folder, whose config.json carries rope_scaling",
        )
    layer_tensors = [t for t in reader.tensors if t.name not in ROPE_FACTOR_TENSORS]  # those are metadata (read_gguf_spec)
    unknown = sorted(t.name for t in layer_tensors if hf_name(t.name, spec.features) is None)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ModelError(f"{path}: GGUF tensors {', '.join(unknown[:3])}{more} are unknown to the {arch.model_type} architecture",
                         fix="a variant of the architecture that edge-rag does not implement; it would run wrongly, so it is refused")
    tensors = {hf_name(t.name, spec.features): t for t in layer_tensors}
    if spec.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    weights = GGUFWeights(path, spec, tensors, arch.gguf_permuted_qk)
    check_weights(spec, weights.shapes, str(path))
    return spec, weights


def gguf_tokenizer_metadata(path: str | Path) -> dict:
    """bos/eos/chat template straight from the GGUF metadata (no transformers needed)."""
    r = _gguf_reader(Path(path))
    toks = r.fields.get("tokenizer.ggml.tokens")

    def token(i):
        if i is None or toks is None:
            return None
        return toks.contents(int(i))

    bos = gguf_field(r, "tokenizer.ggml.bos_token_id")
    eos = gguf_field(r, "tokenizer.ggml.eos_token_id")
    return {
        "model": gguf_field(r, "tokenizer.ggml.model"),
        "chat_template": gguf_field(r, "tokenizer.chat_template"),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "bos_token": token(bos),
        "eos_token": token(eos),
        "add_bos_token": bool(gguf_field(r, "tokenizer.ggml.add_bos_token", False)),
    }
