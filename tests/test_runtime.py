"""ORT session, tokenizer and generator on tiny bundles, transformers as the oracle."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers_tiny import EOS_ID, make_tiny_bundle, reference_model, tiny_hf_model

from edge.bundle import Bundle
from edge.errors import ContextLengthError, UsageError
from edge.runtime.generator import Generator, StopMatcher
from edge.runtime.ort_session import OrtDecoderSession
from edge.runtime.sampler import SamplingParams
from edge.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama", seed=5)


@pytest.fixture(scope="module")
def fp32_bundle(llama, tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "fp32", llama, "fp32", forms=("ort",), max_context=64, max_batch=4)


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- session ------------------------------------------------------------------------------------
def test_session_prefill_decode_and_continuation_match_transformers(llama, fp32_bundle):
    s = OrtDecoderSession(Bundle.open(fp32_bundle), max_batch=2)
    assert s.max_context == 64  # from the manifest's limits
    ids = np.random.default_rng(0).integers(0, 256, 30)
    want = hf_logits(llama, ids)
    s.add_sequence(1)
    got = [s.prefill(1, ids[:9])]
    got.append(s.prefill(1, ids[9:20]))  # a second prefill continues the same sequence (multi-turn)
    for t in range(20, 30):
        got.append(s.decode([1], ids[t:t + 1])[0])
    assert s.length(1) == 30
    assert rel_err(np.stack(got), want[[8, 19, *range(20, 30)]]) < 1e-3


def test_chunked_prefill_equals_one_shot(fp32_bundle):
    ids = np.random.default_rng(3).integers(0, 256, 40)
    out = []
    for chunk in (5, 128):
        s = OrtDecoderSession(Bundle.open(fp32_bundle, verify=False), prefill_chunk=chunk)
        s.add_sequence(0)
        out.append((s.prefill(0, ids), s.decode([0], np.array([3]))[0]))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-5)


def test_kv_cache_is_updated_in_place(fp32_bundle):
    s = OrtDecoderSession(Bundle.open(fp32_bundle), max_batch=2)
    bufs = [id(b) for b in s.k]
    ptr = s.k[0].ctypes.data
    s.add_sequence(0)
    s.prefill(0, np.arange(5))
    s.decode([0], np.array([7]))
    assert [id(b) for b in s.k] == bufs and s.k[0].ctypes.data == ptr
    slot0 = s.k[0][0]
    assert np.abs(slot0[:, :6]).sum() > 0 and np.abs(slot0[:, 6:]).sum() == 0  # 6 positions written
    assert np.abs(s.k[0][1]).sum() == 0  # the other slot is untouched


def test_batched_decode_of_different_lengths_equals_each_alone(fp32_bundle):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, n) for n in (3, 11, 7)]
    steps = [rng.integers(0, 256, 5) for _ in prompts]

    def alone(p, st):
        s = OrtDecoderSession(Bundle.open(fp32_bundle, verify=False), max_batch=1)
        s.add_sequence(0)
        s.prefill(0, p)
        return np.stack([s.decode([0], st[i:i + 1])[0] for i in range(len(st))])

    want = [alone(p, st) for p, st in zip(prompts, steps)]
    s = OrtDecoderSession(Bundle.open(fp32_bundle, verify=False), max_batch=4)
    for i, p in enumerate(prompts):
        s.add_sequence(10 + i)
        s.prefill(10 + i, p)
    order = [12, 10, 11]  # any order of seq ids
    for t in range(5):
        out = s.decode(order, np.array([steps[sid - 10][t] for sid in order]))
        for row, sid in enumerate(order):
            np.testing.assert_allclose(out[row], want[sid - 10][t], rtol=1e-4, atol=1e-5)
    # a released slot in the middle: the remaining sequences run as two slot runs
    s.release(11)
    s.add_sequence(20)
    s.prefill(20, prompts[1])
    assert s.length(20) == len(prompts[1]) and s.length(10) == 3 + 5


def test_session_limits(fp32_bundle):
    s = OrtDecoderSession(Bundle.open(fp32_bundle), max_batch=1, max_context=16)
    s.add_sequence(0)
    with pytest.raises(UsageError, match="slots"):
        s.add_sequence(1)
    with pytest.raises(ContextLengthError, match="16"):
        s.prefill(0, np.zeros(17, np.int64))
    s.prefill(0, np.zeros(16, np.int64))
    with pytest.raises(ContextLengthError):
        s.decode([0], np.array([1]))
    with pytest.raises(UsageError, match="out of range"):
        s.prefill(0, np.array([300]))
    with pytest.raises(UsageError, match="not live"):
        s.decode([5], np.array([1]))


# ---- tokenizer -------------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_chat_template_match_transformers(fp32_bundle):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_bundle(Bundle.open(fp32_bundle))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(fp32_bundle / "tokenizer.json"))
    hf.chat_template = tok.chat_template
    text = "Héllo, wörld! ça va? 12+3"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.encode_chat(msgs)[:1] == [tok.tok.token_to_id("<|im_start|>")]
    assert EOS_ID in tok.eos_token_ids


def test_incremental_detokenizer_never_splits_characters(fp32_bundle):
    tok = Tokenizer.from_bundle(Bundle.open(fp32_bundle))
    text = "naïve café — ok"
    ids = tok.encode(text)
    d = tok.detokenizer()
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)


def test_stop_matcher_holds_back_prefixes():
    m = StopMatcher(["STOP", "\n\n"])
    out = [m.feed(x) for x in ["abc S", "TO", "P tail"]]
    assert out[0] == ("abc ", False) and out[1] == ("", False) and out[2] == ("", True)
    m = StopMatcher(["xyz"])
    assert m.feed("ax")[0] == "a" and m.feed("b")[0] == "xb"


# ---- generator -----------------------------------------------------------------------------------------
def test_greedy_generation_equals_transformers(llama, fp32_bundle):
    gen = Generator.from_bundle(fp32_bundle, backend="onnxruntime")
    prompt = "Once upon"
    ids = gen.tokenizer.encode(prompt)
    with torch.no_grad():
        out = llama.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    want_ids = out[0, len(ids):].tolist()
    deltas = list(gen.stream(prompt, SamplingParams(max_tokens=20, temperature=0)))
    st = gen.stats
    # the same tokens (EOS excluded: the generator stops there)
    n = next((i for i, t in enumerate(want_ids) if t in gen.tokenizer.eos_token_ids), len(want_ids))
    assert st.n_generated == n
    assert "".join(deltas) == gen.tokenizer.decode(want_ids[:n])
    assert st.n_prompt == len(ids) and st.ttft_s > 0 and st.finish_reason in ("length", "stop")


def test_int4_generator_matches_dequantized_reference(llama, tmp_path):
    b = make_tiny_bundle(tmp_path / "int4", llama, "int4", forms=("ort",), accuracy_level=1)
    gen = Generator.from_bundle(b, backend="onnxruntime")
    ref = reference_model(llama, "int4", 32)
    ids = gen.tokenizer.encode("abc")
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    n = next((i for i, t in enumerate(want) if t in gen.tokenizer.eos_token_ids), len(want))
    gen.generate("abc", SamplingParams(max_tokens=12, temperature=0))
    assert gen.stats.n_generated == n


def test_stop_strings_seed_and_chat(fp32_bundle):
    gen = Generator.from_bundle(fp32_bundle, backend="onnxruntime")
    p = SamplingParams(max_tokens=30, temperature=1.0, seed=11)
    a = gen.generate("xy", p)
    assert a == gen.generate("xy", p)  # same seed, same text
    if len(a) > 3:
        stop = a[2:4]
        cut = gen.generate("xy", SamplingParams(max_tokens=30, temperature=1.0, seed=11, stop=[stop]))
        assert cut == a[: a.find(stop)] and gen.stats.finish_reason == "stop"
    reply = gen.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5, temperature=0))
    assert isinstance(reply, str) and gen.stats.n_prompt == len(gen.tokenizer.encode_chat([{"role": "user", "content": "hi"}]))


def test_prompt_longer_than_context(fp32_bundle):
    gen = Generator.from_bundle(fp32_bundle, backend="onnxruntime", max_context=32)
    long = "a" * 50  # one token per byte in the tiny tokenizer
    with pytest.raises(ContextLengthError) as e:
        gen.generate(long, SamplingParams(max_tokens=4))
    assert "50" in str(e.value) and "32" in str(e.value) and "--truncate" in str(e.value)
    out = gen.generate(long, SamplingParams(max_tokens=4, temperature=0), truncate=True)
    assert gen.stats.truncated == 50 - gen.stats.n_prompt and gen.stats.n_prompt + 4 <= 32 and isinstance(out, str)


def test_generation_stops_at_context_end(fp32_bundle):
    gen = Generator.from_bundle(fp32_bundle, backend="onnxruntime", max_context=12)
    gen.generate("abcdefghij", SamplingParams(max_tokens=50, temperature=1.0, seed=0))
    assert gen.stats.n_prompt + gen.stats.n_generated <= 12 + 1
    assert gen.stats.finish_reason in ("context", "stop")


def test_unknown_backend_is_a_usage_error(fp32_bundle):
    with pytest.raises(UsageError, match="backend"):
        Generator.from_bundle(fp32_bundle, backend="tpu")


def test_runtime_imports_no_torch_or_transformers(fp32_bundle):
    code = (
        "import sys\n"
        "import edge.runtime.generator, edge.runtime.ort_session, edge.runtime.sampler, edge.runtime.tokenizer\n"
        f"from edge.runtime.generator import Generator\n"
        f"g = Generator.from_bundle({str(fp32_bundle)!r}, backend='onnxruntime')\n"
        "g.generate('hi', edge.runtime.sampler.SamplingParams(max_tokens=3, temperature=0))\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- the real default model (slow): SmolLM2-135M-Instruct GGUF, fp32 engine vs transformers ----------
SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
]


@pytest.fixture(scope="module")
def smol_hf():
    import torch
    from transformers import AutoModelForCausalLM

    from edge.models.defaults import default_generator_path

    g = default_generator_path()
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, torch_dtype=torch.float32).eval()


@pytest.mark.slow
def test_smollm2_fp32_logits_match_transformers(smollm2_fp32, smol_hf):
    b = Bundle.open(smollm2_fp32)
    tok = Tokenizer.from_bundle(b)
    ids = np.array(tok.encode_chat([{"role": "user", "content": SMOL_PROMPTS[0]}]) + tok.encode(" The capital of France is Paris."))
    with torch.no_grad():
        want = smol_hf(torch.from_numpy(ids[None])).logits[0].numpy()
    s = OrtDecoderSession(b, max_context=256)
    s.add_sequence(0)
    n = len(ids) - 8
    got = [s.prefill(0, ids[:n])] + [s.decode([0], ids[t:t + 1])[0] for t in range(n, len(ids))]
    got, ref = np.stack(got), want[n - 1:]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= 1e-3, f"max rel err {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOL_PROMPTS)
def test_smollm2_greedy_64_tokens_match_transformers(smollm2_fp32, smol_hf, prompt):
    """The same 64 greedy tokens (EOS not special: both run on for 64 steps)."""
    b = Bundle.open(smollm2_fp32, verify=False)
    tok = Tokenizer.from_bundle(b)
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    with torch.no_grad():  # plain greedy loop: generate() would stop at (or suppress) EOS
        out = smol_hf(torch.tensor([ids]), use_cache=True)
        want = [int(out.logits[0, -1].argmax())]
        while len(want) < 64:
            out = smol_hf(torch.tensor([[want[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            want.append(int(out.logits[0, -1].argmax()))
    s = OrtDecoderSession(b, max_context=512)
    s.add_sequence(0)
    got = [int(np.argmax(s.prefill(0, np.array(ids))))]
    while len(got) < 64:
        got.append(int(np.argmax(s.decode([0], np.array([got[-1]]))[0])))
    assert got == want, f"first difference at {next(i for i, (a, c) in enumerate(zip(got, want)) if a != c)}"


def test_spinning_only_when_cores_are_free(monkeypatch):
    from edge.runtime import ort_session

    monkeypatch.setattr(ort_session, "idle_cores", lambda: 1.9)
    assert ort_session.should_spin(2) and ort_session.should_spin(1)
    monkeypatch.setattr(ort_session, "idle_cores", lambda: 0.6)
    assert not ort_session.should_spin(2) and not ort_session.should_spin(1)


def test_idle_cores_reads_proc_stat():
    import os

    from edge.runtime import ort_session

    idle = ort_session.idle_cores(0.05)
    if os.path.exists("/proc/stat"):
        assert idle is not None and 0.0 <= idle <= (os.cpu_count() or 1) + 1e-6


def test_generator_verifies_what_its_backend_loads(tmp_path):
    """A corrupted ORT graph is refused; a corrupted TensorRT graph does not stop the ORT backend
    (only the artifacts a backend reads are hashed at load)."""
    from edge.errors import BundleError

    path = make_tiny_bundle(tmp_path / "b", tiny_hf_model("llama", seed=5), "int4", forms=("ort", "trt"), max_context=64)

    def flip(name):
        p = path / name
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    flip("model.trt.onnx")
    assert Generator.from_bundle(path, backend="onnxruntime").max_context == 64
    flip("model.ort.onnx")
    with pytest.raises(BundleError, match="model.ort.onnx"):
        Generator.from_bundle(path, backend="onnxruntime")


def test_kv_buffers_become_resident_only_where_written():
    """lazy_zeros: writing one row per head plane of an 8192-token cache makes a few pages
    resident, not the 2 MB huge pages numpy would have asked for (np.zeros >= 4 MB)."""
    import mmap
    import sys

    from helpers_tiny import resident_bytes

    from edge.runtime.ort_session import lazy_zeros

    if not sys.platform.startswith("linux"):
        pytest.skip("mincore is Linux-specific")
    kv = lazy_zeros((1, 3, 8192, 64))  # 6 MiB, three 2 MiB head planes
    assert kv.flags.writeable and kv.flags.c_contiguous
    assert resident_bytes(kv) == 0
    kv[0, :, :16, :] = 1.0  # 16 positions of every head
    assert resident_bytes(kv) <= 3 * 4 * mmap.PAGESIZE  # 16 rows x 256 B = one page per head
    assert kv.sum() == 3 * 16 * 64  # (reading maps the rest to the shared zero page: read last)
