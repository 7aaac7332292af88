"""gpt-fast (pytorch-labs/gpt-fast: torch.compile, CUDA graphs) as a GPU peer of bench_cuda.py, on
random weights of the same config. One JSON line per figure.

    python3 bench/gpt_fast_peer.py --gpt-fast DIR --config llama-3.2-1b --mode int4|bf16 [--batches 1,16] [--prefill 2048]

DIR holds gpt-fast's own model.py, quantize.py, generate.py and tokenizer.py (github
pytorch-labs/gpt-fast; carried, never part of this project). Its recipe as its generate.py runs
it: the inductor settings of generate.py (coordinate-descent tuning), `decode_one_token` compiled
with mode="reduce-overhead", fullgraph, and its prefill compiled with dynamic=True
(`--compile_prefill`). int4 is its WeightOnlyInt4QuantHandler (group 128, inner k tiles 8:
tinygemm `_weight_int4pack_mm`), every linear including the LM head; bf16 is the plain model.
Only the int4 weight packing call is adapted to this torch: `_convert_weight_to_int4pack` takes
nibbles packed two to a byte since torch 2.5 (gpt-fast's quantize.py still passes int32).

Figures (prompt 128, 127 decoded tokens as bench_cuda.py, greedy-equivalent cost: its sampler):
decode b1 tok/s, decode b16 aggregate tok/s (16 sequences of 128-token prompts), 2048-token
prefill ms (median of 5 after warm-up; gpt-fast's model computes logits for every position).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_bundle import CONFIGS  # noqa: E402

PROMPT, NEW = 128, 128


def model_args(name: str, ModelArgs):
    c = CONFIGS[name]
    rs = c.get("rope_scaling")
    return ModelArgs(
        block_size=4096, vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
        n_local_heads=c["num_key_value_heads"], dim=c["hidden_size"], intermediate_size=c["intermediate_size"],
        rope_base=c["rope_theta"], norm_eps=c["rms_norm_eps"],
        rope_scaling=None if not rs else {k: rs[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")},
    )


def build(name: str, mode: str):
    import torch
    import quantize as gq
    from model import Transformer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(model_args(name, __import__("model").ModelArgs))
    model = model.to(torch.bfloat16)
    if mode == "int4":
        orig = torch.ops.aten._convert_weight_to_int4pack

        def convert(w_int32, inner_k_tiles):  # torch >= 2.5 takes [n, k / 2] uint8 nibble pairs
            try:
                return orig(w_int32, inner_k_tiles)
            except RuntimeError:
                return orig((w_int32[:, ::2] << 4 | w_int32[:, 1::2]).to(torch.uint8), inner_k_tiles)

        def prepare(weight_bf16, groupsize, inner_k_tiles):
            w_int32, sz = gq.group_quantize_tensor(weight_bf16, n_bit=4, groupsize=groupsize)
            return convert(w_int32, inner_k_tiles), sz

        gq.prepare_int4_weight_and_scales_and_zeros = prepare
        h = gq.WeightOnlyInt4QuantHandler(model, groupsize=128, inner_k_tiles=8)
        sd = h.create_quantized_state_dict(use_cuda=True)
        model = h.convert_for_runtime()
        model.load_state_dict(sd, assign=True)
        model = model.to("cuda")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt-fast", type=Path, required=True)
    ap.add_argument("--config", default="llama-3.2-1b", choices=sorted(CONFIGS))
    ap.add_argument("--mode", default="int4", choices=("int4", "bf16"))
    ap.add_argument("--batches", default="1", help="decode batch sizes to time, e.g. 1,16 (each is one compile)")
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--device-name", default=None)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (a quick check of the setup, not a figure)")
    a = ap.parse_args()
    sys.path.insert(0, str(a.gpt_fast))
    import contextlib
    import io

    import torch

    torch.set_grad_enabled(False)  # generate.py's generate() runs under torch.no_grad()
    with contextlib.redirect_stdout(io.StringIO()):  # quantize.py prints a line per linear
        import generate as gg
        model = build(a.config, a.mode)
    dev = a.device_name or torch.cuda.get_device_name()
    decode_one = gg.decode_one_token if a.eager else torch.compile(gg.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prefill_c = gg.prefill if a.eager else torch.compile(gg.prefill, fullgraph=True, dynamic=True)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_sdpa = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731  (what decode_n_tokens asks for)
    except ImportError:
        math_sdpa = lambda: torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)  # noqa: E731
    common = dict(backend=f"gpt-fast-{a.mode}" + ("-eager" if a.eager else ""), device=dev, model=a.config, torch=torch.__version__,
                  recipe="int4 g128 tinygemm" if a.mode == "int4" else "bf16")

    def emit(**kw):
        print(json.dumps({**kw, **common}), flush=True)

    def run(batch: int) -> float:
        """prefill PROMPT tokens, then NEW - 1 decode steps; seconds of the decode steps."""
        with torch.device("cuda"):
            model.setup_caches(max_batch_size=batch, max_seq_length=PROMPT + NEW)
        prompt = torch.randint(0, 1000, (batch, PROMPT), device="cuda")
        pos = torch.arange(0, PROMPT, device="cuda")
        tok = gg.prefill(model, prompt, pos).clone()
        pos = torch.tensor([PROMPT], device="cuda", dtype=torch.int)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            with math_sdpa():
                nxt, _ = decode_one(model, tok.view(batch, -1), pos)
            pos += 1
            tok = nxt.clone()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for batch in (int(b) for b in a.batches.split(",") if b):
        t0 = time.perf_counter()
        run(batch)  # compile + capture
        compile_s = time.perf_counter() - t0
        ts = [run(batch) for _ in range(3)]
        tps = batch * (NEW - 1) / statistics.median(ts)
        if batch == 1:
            emit(figure="decode_b1", batch=1, prompt=PROMPT, new_tokens=NEW, decode_tok_s=round(tps, 1), compile_s=round(compile_s, 1))
        else:
            emit(figure="decode_b16", batch=batch, prompt=PROMPT, new_tokens=NEW, aggregate_tok_s=round(tps, 1), compile_s=round(compile_s, 1))
    if a.prefill:
        with torch.device("cuda"):
            model.setup_caches(max_batch_size=1, max_seq_length=a.prefill + 8)
        x = torch.randint(0, 1000, (1, a.prefill), device="cuda")
        pos = torch.arange(0, a.prefill, device="cuda")
        t0 = time.perf_counter()
        prefill_c(model, x, pos)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ts = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill_c(model, x, pos)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(ts[1:])
        emit(figure="prefill", tokens=a.prefill, prefill_ms=round(ms, 2), prefill_tok_s=round(a.prefill / ms * 1e3, 0), compile_s=round(compile_s, 1))


if __name__ == "__main__":
    main()
