"""Tiny seeded random decoders (Llama, Qwen2, Mistral, Qwen3, Gemma 3, Phi-3) turned into engine bundles, with
`transformers` as the oracle. Reusable by any test:

    hf = tiny_hf_model("qwen2")                              # torch model, eval mode
    bundle = make_tiny_bundle(tmp_path / "b", hf, "int4")    # engine bundle directory
    ref = reference_model(hf, "int4")                        # HF model holding the dequantized weights

The tokenizer is byte-level BPE over 252 byte symbols plus 4 specials (vocab 256) with a
ChatML chat template, built with the `tokenizers` library.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = 256
EOS_ID = 2  # <|im_end|>


SLIDING_WINDOW = 8  # tiny sliding windows: a 24-token test sequence crosses them


def tiny_hf_model(arch: str = "llama", *, seed: int = 0, tie: bool | None = None, rope_scaling: dict | None = None, max_position: int = 256,
                  hidden: int = 64):
    """A 2-layer, hidden-64, vocab-256 random model of `arch` ("llama" | "qwen2" | "mistral" |
    "qwen3" | "gemma3_text" (one sliding and one global layer, logit soft-capping) | "phi3" (LongRoPE)).
    4 heads, 2 kv heads, head_dim hidden / 4 (hidden 256: head_dim 64, what the cuda backend's
    flash prefill and split decode kernels take)."""
    import torch
    import transformers as tf

    hd = hidden // 4
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=max_position, rms_norm_eps=1e-5, initializer_range=0.1,
                  bos_token_id=0, eos_token_id=EOS_ID, pad_token_id=0)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True if tie is None else tie, rope_scaling=rope_scaling, attention_bias=False)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False if tie is None else tie)
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, rope_theta=10000.0, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False if tie is None else tie)
        cls = tf.MistralForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=hd, rope_theta=1000000.0, tie_word_embeddings=True if tie is None else tie)
        cls = tf.Qwen3ForCausalLM
    elif arch == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**common, head_dim=hd, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
                                  layer_types=["sliding_attention", "full_attention"],
                                  final_logit_softcapping=15.0, tie_word_embeddings=True if tie is None else tie,
                                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})
        cls = tf.Gemma3ForCausalLM
    elif arch == "phi3":
        half = hd // 2
        cfg = tf.Phi3Config(**{**common, "max_position_embeddings": 256}, original_max_position_embeddings=128, sliding_window=None,
                            tie_word_embeddings=False if tie is None else tie,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 128,
                                             "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.2 * i for i in range(half)]})
        cls = tf.Phi3ForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"  # soft-capping and sliding windows: the plain reference path
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms and biases away from their trivial init so that they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_spec(model):
    from edge.models.spec import spec_from_hf_config

    return spec_from_hf_config(model.config.to_dict())


def bundle_weights(model, recipe: str, group_size: int = 32) -> dict[str, np.ndarray]:
    """state_dict -> bundle-form numpy weights (edge.quant.format), precision per edge.quant.policy."""
    from edge.quant.format import quantize_int4_rtn, quantize_int8_rtn
    from edge.quant.policy import module_precision

    from edge.models.hf import fold_norm_offset, split_fused

    spec = hf_spec(model)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if spec.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd = fold_norm_offset(spec, split_fused(spec, sd))  # what the HF reader does
    fdt = np.float32 if recipe == "fp32" else np.float16
    out: dict[str, np.ndarray] = {}
    linears = {k[: -len(".weight")] for k in sd if k.endswith("_proj.weight")}
    if recipe in ("int4", "int8"):
        linears.add("lm_head")  # the head is quantized (a copy of the table when tied)
        if spec.tie_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    for k, v in sd.items():
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        if mod in linears and recipe in ("int4", "int8"):
            prec = module_precision(mod, recipe, group_size, v.shape[1])
            qt = quantize_int4_rtn(v, group_size) if prec.kind == "int4" else quantize_int8_rtn(v)
            out[mod + ".qweight"], out[mod + ".scales"] = qt.qweight, qt.scales
        else:
            out[k] = v.astype(fdt)
    return out


def dequantized_state(weights: dict[str, np.ndarray], group_size: int = 32) -> dict[str, np.ndarray]:
    """Bundle-form weights -> float32 HF state dict (the numpy dequantized reference)."""
    from edge.quant.format import dequantize_int4, dequantize_int8

    out = {}
    for k, v in weights.items():
        if k.endswith(".qweight"):
            mod = k[: -len(".qweight")]
            s = weights[mod + ".scales"]
            out[mod + ".weight"] = dequantize_int8(v, s) if v.dtype == np.int8 else dequantize_int4(v, s, group_size)
        elif not k.endswith(".scales"):
            out[k] = v.astype(np.float32)
    return out


def reference_model(model, recipe: str, group_size: int = 32, form: str = "ort"):
    """A copy of `model` holding exactly the weights the engine's `form` holds (dequantized, fp16-rounded)."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    state = dequantized_state(bundle_weights(model, recipe, group_size), group_size)
    if "lm_head.weight" in state and ref.config.tie_word_embeddings:
        ref.config.tie_word_embeddings = False  # the quantized head differs from the table
        ref.lm_head.weight = torch.nn.Parameter(torch.from_numpy(state["lm_head.weight"]).clone())
    sd = ref.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if k in sd:
                sd[k].copy_(torch.from_numpy(v))
    if "lm_head.weight" in state:
        ref.lm_head.weight.data = torch.from_numpy(state["lm_head.weight"]).clone()
        if model.config.tie_word_embeddings and form == "ort":
            # the ORT form gathers embeddings from the tied head's quantized data (GatherBlockQuantized)
            ref.model.embed_tokens.weight.data = torch.from_numpy(state["lm_head.weight"]).clone()
    return ref.eval()


def make_tokenizer_files(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json: byte-level BPE, vocab 256, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # keep bytes 0..251 of the GPT-2 byte->unicode table (ASCII and Latin-1 letters stay in)
    byte_chars = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(VOCAB - len(SPECIALS)):
        vocab[byte_chars[b]] = len(vocab)
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"chat_template": CHAT_TEMPLATE, "bos_token": None, "eos_token": "<|im_end|>", "unk_token": "<unk>",
           "pad_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": 256}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tiny_bundle(out: Path, model, recipe: str = "fp32", *, group_size: int = 32, max_context: int = 128,
                     max_batch: int = 4, forms: tuple[str, ...] = ("ort", "trt"), accuracy_level: int | None = None,
                     kv_dtype: str = "fp16") -> Path:
    """Write a generator bundle for `model` with the ONNX forms requested."""
    import tempfile

    from edge.bundle import BundleWriter, Limits, Manifest, Quant
    from edge.build.onnx_decoder import build_decoder_onnx

    spec = hf_spec(model)
    weights = bundle_weights(model, recipe, group_size)
    quant = Quant(recipe=recipe, group_size=group_size if recipe == "int4" else 0, method="rtn" if recipe in ("int4", "int8") else "none")
    w = BundleWriter(Path(out), "generator")
    stored = w.write_weights(weights)
    for form in forms:  # as the builder does: the ORT form references the weights file
        build_decoder_onnx(spec, weights, quant, w.tmp, form, accuracy_level=accuracy_level, max_context=max_context,
                           stored=stored if form == "ort" else None)
    with tempfile.TemporaryDirectory() as td:
        make_tokenizer_files(Path(td))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            w.add_file(f, Path(td) / f)
    return w.commit(Manifest(kind="generator", model=spec.to_dict(), quant=quant,
                             limits=Limits(max_context=max_context, max_batch=max_batch, kv_dtype=kv_dtype)))


# ---- tiny sentence-transformers embedder (BERT) -------------------------------------------

_WORDS = ("the robot battery error code charge dock lidar safety network firmware update map zone "
          "speed stop field part number wheel belt motor sensor fleet server port value check "
          "replace clean calibrate warning fault critical and or of to in is on at for with").split()


def _tiny_vocab() -> list[str]:
    """256 WordPiece entries: specials, characters, ## continuations, a few words."""
    v = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + ".,;:!?-_()[]{}=+*/'\"#@%&<>")
    v += chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    v += [w for w in _WORDS if w not in v]
    i = 0
    while len(v) < 256:  # pad with deterministic pseudo-words
        v.append(f"w{i}")
        i += 1
    return v[:256]


def make_tiny_st(root: Path, pooling: str, normalize: bool, max_seq_length: int = 48, seed: int = 0, *,
                 heads: int = 4, max_position: int = 64) -> Path:
    """A seeded random BertModel (2 layers, hidden 64, vocab 256) saved as a sentence-transformers folder."""
    import warnings

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    hf = root / "hf"
    hf.mkdir(parents=True)
    (hf / "vocab.txt").write_text("\n".join(_tiny_vocab()) + "\n")
    # positional: transformers 4 names it vocab_file, 5 vocab (and ignores vocab_file=: every word was [UNK])
    tok = BertTokenizerFast(str(hf / "vocab.txt"), do_lower_case=True)
    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=128, max_position_embeddings=max_position, type_vocab_size=2)
    model = BertModel(cfg)
    with torch.no_grad():  # larger than the 0.02 init so that layers matter and texts differ
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(-0.1, 0.1)
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    with warnings.catch_warnings():  # sentence-transformers 6 moved the module classes
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import models
    mods = [models.Transformer(str(hf), max_seq_length=max_seq_length), models.Pooling(64, pooling_mode=pooling)]
    if normalize:
        mods.append(models.Normalize())
    out = root / "st"
    SentenceTransformer(modules=mods, device="cpu").save(str(out))
    return out


def make_tiny_embedder_bundle(out: Path, *, pooling: str = "mean", normalize: bool = True, seed: int = 0) -> Path:
    """An embedder bundle (fp32) of a tiny seeded BERT sentence-transformers model, built in out's parent."""
    from edge.build.encoder import build_embedder_bundle

    st = make_tiny_st(Path(out).parent / f".{Path(out).name}-st", pooling, normalize, seed=seed)
    return build_embedder_bundle(st, Path(out), progress=False)


def greedy_decode(path, spec, form: str, prompt: np.ndarray, n: int, ctx: int) -> list[int]:
    """Greedy tokens from a decoder graph (form "ort" | "trt"), one session, KV cache carried step
    to step (the ORT form's buffers hold `ctx` positions)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if form == "trt":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    past = 0 if form == "trt" else ctx
    kv = {f"past_key_values.{i}.{t}": np.zeros((1, spec.n_kv_heads, past, spec.head_dim), np.float32)
          for i in range(spec.n_layers) for t in ("key", "value")}
    out_ids, chunk, pos = [], np.asarray(prompt), 0
    for _ in range(n):
        m = len(chunk)
        if form == "ort":
            feeds = {"input_ids": chunk[None], "seqlens_k": np.array([pos + m - 1], np.int32), "total_sequence_length": np.array(pos + m, np.int32)}
        else:
            feeds = {"input_ids": chunk[None], "position_ids": np.arange(pos, pos + m)[None], "attention_mask": np.ones((1, pos + m), np.int64)}
        out = dict(zip(names, s.run(None, {**feeds, **kv})))
        kv = {k: out[k.replace("past_key_values", "present")] for k in kv}
        pos += m
        nxt = int(np.argmax(out["logits"][0]))
        out_ids.append(nxt)
        chunk = np.array([nxt])
    return out_ids


def logits_ort(path, spec, ids: np.ndarray, n_prefill: int, ctx: int) -> np.ndarray:
    """ORT-form logits: prefill ids[:n_prefill], then decode the rest one by one -> [T - n_prefill + 1, V]."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    kv = {f"past_key_values.{i}.{t}": np.zeros((1, spec.n_kv_heads, ctx, spec.head_dim), np.float32)
          for i in range(spec.n_layers) for t in ("key", "value")}
    got, pos = [], 0
    for chunk in [ids[:n_prefill]] + [ids[t:t + 1] for t in range(n_prefill, len(ids))]:
        pos += len(chunk)
        out = dict(zip(names, s.run(None, {"input_ids": chunk[None], "seqlens_k": np.array([pos - 1], np.int32),
                                          "total_sequence_length": np.array(pos, np.int32), **kv})))
        kv = {k: out[k.replace("past_key_values", "present")] for k in kv}
        got.append(out["logits"][0])
    return np.stack(got)


def resident_bytes(*arrays: np.ndarray) -> int:
    """Resident bytes of the pages under numpy buffers (Linux mincore; anonymous-mmap KV buffers)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    ps, total = mmap.PAGESIZE, 0
    for a in arrays:
        start = a.ctypes.data // ps * ps
        n = -(-(a.ctypes.data + a.nbytes - start) // ps)
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(start, n * ps, vec) == 0
        total += sum(v & 1 for v in vec) * ps
    return total
