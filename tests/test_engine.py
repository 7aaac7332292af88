"""The engine on the ONNX Runtime backend (tiny seeded Llama): concurrent == alone, seeded
sampling, stop strings, prefix cache, and the engine paths the cuda backend takes (device
sampling, the greedy stream) checked with numpy stand-ins over the same ORT logits."""

from __future__ import annotations


import numpy as np
import pytest

from engine_checks import PROMPTS, check_concurrent_equals_alone, check_prefix_cache_same_text, check_seeded_sampling_equals_alone
from helpers_tiny import make_tiny_bundle, resident_bytes, tiny_hf_model

from edge.bundle import Bundle
from edge.runtime.generator import Generator
from edge.runtime.ort_session import OrtDecoderSession
from edge.runtime.sampler import SamplingParams
from edge.runtime.step import StepOutput
from edge.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("eng") / "fp32", tiny_hf_model("llama", seed=5), "fp32",
                            forms=("ort",), max_context=64, max_batch=4)


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory):
    """int4 layers (MatMulNBits, int8 activations) and an int8 head: the shipped CPU recipe."""
    return make_tiny_bundle(tmp_path_factory.mktemp("eng") / "int4", tiny_hf_model("llama", seed=5), "int4",
                            forms=("ort",), max_context=64, max_batch=4, accuracy_level=4)


def make_gen(bundle, session_cls=OrtDecoderSession, max_batch=12, **kw) -> Generator:
    b = Bundle.open(bundle, verify=False)
    session = session_cls(b, max_batch=max_batch, prefill_chunk=8, kv_tokens=max_batch * 64)  # every slot full: no preemption
    return Generator(session, Tokenizer.from_bundle(b), b, **kw)


@pytest.mark.parametrize("recipe", ["fp32", "int4"])
def test_twelve_concurrent_requests_equal_each_alone(recipe, request):
    """Also on the quantized recipe: its int8 activations are quantized per row (MatMulNBits per
    block, the head per row), so a batched row computes what it computes alone."""
    check_concurrent_equals_alone(make_gen, request.getfixturevalue("bundle" if recipe == "fp32" else "int4_bundle"))


def test_seeded_sampling_equals_alone(bundle):
    check_seeded_sampling_equals_alone(make_gen, bundle)


def test_prefix_cache_same_text_and_counts(bundle):
    check_prefix_cache_same_text(make_gen, bundle, max_tokens=4)


def test_planned_kv_is_what_the_backend_allocates(bundle):
    """The manifest's KV pool (kv_blocks x kv_block_size tokens in kv_dtype) in bytes is the
    budget the ORT backend gives the engine, in its own float32 rows (within one block)."""
    b = Bundle.open(bundle, verify=False)
    lim, spec = b.limits, b.spec
    planned = lim.kv_tokens * spec.kv_bytes_per_token(2.0 if lim.kv_dtype == "fp16" else 4.0)
    s = OrtDecoderSession(b, max_batch=lim.max_batch)
    per_token = spec.n_layers * 2 * spec.n_kv_heads * spec.head_dim * 4  # float32 K and V
    caps = s.caps
    assert caps.kv_dtype == "float32" and caps.kv_bytes == caps.num_blocks * caps.block_size * per_token
    assert planned - caps.block_size * per_token < caps.kv_bytes <= planned
    with Generator(s, Tokenizer.from_bundle(b), b).engine as e:
        assert e.kv.num_blocks == caps.num_blocks  # what the engine's block manager hands out


class _DeviceSampling(OrtDecoderSession):
    """The cuda backend's sampling contract in numpy over the ORT logits: greedy argmax and the
    inverse-CDF temperature / top-p draw with the row's uniform."""

    sampled = 0

    @property
    def caps(self):
        from dataclasses import replace

        return replace(super().caps, device_sampling=True, greedy_stream=True)

    def execute(self, batch):
        out = super().execute(batch)
        ids = np.full(batch.num_rows, -1, np.int32)
        for r in range(batch.num_rows):
            if not batch.logits_rows[r] or batch.host_sample[r]:
                continue
            type(self).sampled += 1
            x = out.logits[r].astype(np.float64)
            if batch.temperature[r] == 0:
                ids[r] = int(np.argmax(x))
                continue
            p = np.exp((x - x.max()) / batch.temperature[r])
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            ps = p[order]
            ps = np.where((np.cumsum(ps) - ps) < batch.top_p[r], ps, 0)
            cdf = np.cumsum(ps) / ps.sum()
            ids[r] = order[min(int((cdf < batch.uniform[r]).sum()), len(cdf) - 1)]
        return StepOutput(ids, out.logits)

    streams = 0

    def run_greedy(self, batch, max_new):
        """The host-free stream, step by step here: the engine reserved the slots up front."""
        type(self).streams += 1
        b = batch
        for _ in range(max_new):
            tok = int(self.execute(b).sampled[0])
            b.block_copies = np.zeros((0, 2), np.int32)  # once, before the first step
            yield tok
            b.token_ids[0] = tok
            b.positions[0] += 1
            b.slot_mapping[0] = b.block_tables[0, (b.positions[0]) // b.block_size] * b.block_size + b.positions[0] % b.block_size
            b.seq_lens[0] += 1


def test_device_sampling_and_greedy_stream_paths(bundle):
    host, dev = make_gen(bundle), make_gen(bundle, _DeviceSampling)
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.8, seed=7)
    _DeviceSampling.sampled = 0
    a = dev.generate("Once upon", p)
    assert _DeviceSampling.sampled >= dev.stats.n_generated
    assert dev.generate("Once upon", p) == a  # the request's seeded RNG drives the device draws
    _DeviceSampling.sampled = 0
    dev.generate("Once upon", SamplingParams(max_tokens=10, temperature=0.9, top_k=5, seed=7))
    assert _DeviceSampling.sampled == 0  # top-k needs the host sampler
    for params in (SamplingParams(max_tokens=45, temperature=0), SamplingParams(max_tokens=3, temperature=0, stop=["e"])):
        _DeviceSampling.streams = 0
        assert dev.generate("Once upon", params) == host.generate("Once upon", params)
        assert dev.stats.finish_reason == host.stats.finish_reason and dev.stats.n_generated == host.stats.n_generated
        assert _DeviceSampling.streams >= 1
    assert dev.engine.kv.num_used == 0


class _AsyncDeviceSampling(_DeviceSampling):
    """caps.async_steps over the ORT logits: launch() resolves StepBatch.prev_rows from the previous
    launch's sampled ids (what the CUDA backend does on the device) and returns a handle. Launches
    wait for `gate` (the test submits every request first)."""

    prev_launches = 0

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        import threading

        self.gate = threading.Event()
        self.gate.set()

    @property
    def caps(self):
        from dataclasses import replace

        return replace(super().caps, async_steps=True)

    def launch(self, batch):
        self.gate.wait(10)
        if batch.has_prev_rows:
            type(self).prev_launches += 1
            rows = np.nonzero(batch.prev_rows >= 0)[0]
            t = batch.query_start[rows + 1] - 1
            assert (batch.token_ids[t] == -1).all()
            batch.token_ids[t] = self._last[batch.prev_rows[rows]]
        out = self.execute(batch)
        self._last = out.sampled.copy()

        class Handle:
            def result(self):
                return out

        return Handle()


def test_async_steps_equal_each_alone_with_stop_strings_and_seeded_sampling(bundle):
    """12 requests (stop strings, max_tokens, prompt lengths, two seeded sampling ones) with each
    step planned while the last one runs: the tokens and finish reasons each gives alone.
    The last request left alone finishes in the greedy stream (after the async steps drain)."""
    alone = make_gen(bundle, _AsyncDeviceSampling, max_batch=1)
    stop = alone.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0))[3]  # met mid-way (tiny random model)
    params = [SamplingParams(max_tokens=4 + 3 * (i % 5), temperature=0, stop=[stop] if i % 2 else []) if i % 6 else
              SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=i) for i in range(12)]
    want = []
    for p, sp in zip(PROMPTS, params):
        want.append((alone.generate(p, sp), alone.stats.n_generated, alone.stats.finish_reason))
    assert {r for *_, r in want} == {"stop", "length"}
    gen = make_gen(bundle, _AsyncDeviceSampling)
    _AsyncDeviceSampling.prev_launches = 0
    gen.session.gate.clear()
    streams = [gen.submit(p, sp) for p, sp in zip(PROMPTS, params)]
    gen.session.gate.set()
    got = [(s.text(), s.request.stats.n_generated, s.request.finish_reason) for s in streams]
    assert got == want
    assert gen.engine.kv.num_used == 0 and _AsyncDeviceSampling.prev_launches > 10


def test_sequence_backend_adapter_equals_the_native_backend(bundle):
    """The TensorRT path's adapter (per-sequence session -> execute) over the ORT session."""
    from edge.runtime.seq_backend import SequenceBackend

    b = Bundle.open(bundle, verify=False)
    tok = Tokenizer.from_bundle(b)
    native = make_gen(bundle)
    adapted = Generator(SequenceBackend(OrtDecoderSession(b, max_batch=4, prefill_chunk=8)), tok, b)
    assert not adapted.engine.kv.prefix_cache  # declared: it cannot start after a cached prefix
    p = SamplingParams(max_tokens=12, temperature=0)
    streams = [adapted.submit(x, p) for x in PROMPTS[:6]]  # more than its 4 sequences: some wait
    assert [s.text() for s in streams] == [native.generate(x, p) for x in PROMPTS[:6]]


def test_a_vnni_built_head_warns_on_a_cpu_without_vnni(monkeypatch, capsys):
    from edge.runtime.ort_session import warn_if_head_saturates

    monkeypatch.setenv("EDGE_RAG_U8S8", "saturates")
    assert "Rebuild" in warn_if_head_saturates({"int8_head": "DynamicQuantizeMatMul"}, "m.onnx")
    assert "VNNI" in capsys.readouterr().err
    assert warn_if_head_saturates({"int8_head": "MatMulNBits"}, "m.onnx") is None
    monkeypatch.setenv("EDGE_RAG_U8S8", "exact")
    assert warn_if_head_saturates({"int8_head": "DynamicQuantizeMatMul"}, "m.onnx") is None


def test_a_corrupted_weights_file_is_refused_by_the_cpu_backend(tmp_path):
    """model.ort.onnx reads weights.safetensors as external data: both are hashed at load."""
    from edge.errors import BundleError

    path = make_tiny_bundle(tmp_path / "b", tiny_hf_model("llama", seed=5), "int4", forms=("ort",), max_context=64)
    p = path / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors"):
        Generator.from_bundle(path, backend="onnxruntime")


def test_async_batches_carry_the_same_text_and_a_past_deadline_aborts(bundle):
    """RequestStream.batches(), the HTTP server's path: several concurrent consumers on one event
    loop get exactly the text each request gives alone; a deadline that has passed stops the
    stream at once and aborts the request, whose KV blocks are freed."""
    import asyncio
    import time

    gen = make_gen(bundle)
    sp = [SamplingParams(max_tokens=6 + i, temperature=0) for i in range(4)]
    want = [gen.generate(PROMPTS[i], sp[i]) for i in range(4)]

    async def collect(i, deadline=None, params=None):
        rs = gen.submit(PROMPTS[i], params or sp[i])
        parts = []
        async for batch in rs.batches(deadline):
            assert batch and all(isinstance(t, str) for t in batch)
            parts.extend(batch)
        return "".join(parts), rs

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(4)))

    got = asyncio.run(main())
    assert [t for t, _ in got] == want
    assert all(rs.request.finish_reason == "length" for _, rs in got)

    long = SamplingParams(max_tokens=50, temperature=0)  # dozens of steps: the deadline comes first
    text, rs = asyncio.run(collect(0, deadline=time.monotonic() - 1, params=long))
    assert len(text) < len(gen.generate(PROMPTS[0], long))
    t0 = time.monotonic()
    while not rs.request.finished and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert rs.request.finish_reason == "abort"
    t0 = time.monotonic()
    while gen.engine.kv.num_used and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert gen.engine.kv.num_used == 0


def test_first_prompt_pieces_of_prompts_arriving_together_share_one_call(bundle):
    """Equal-length first pieces in consecutive slots run as one ORT call (GroupQueryAttention
    batches new tokens only for rows with nothing cached); the text equals each prompt alone."""
    gen = make_gen(bundle)
    tok = gen.tokenizer
    prompts = ["robot arm one", "robot arm two", "robot arm six"]
    assert len({len(tok.encode(p)) for p in prompts}) == 1 and len(tok.encode(prompts[0])) > 8
    sp = SamplingParams(max_tokens=5, temperature=0)
    want = [gen.generate(p, sp) for p in prompts]
    calls = []
    run = gen.engine.backend._run
    gen.engine.backend._run = lambda start, ids, new_lens: calls.append(ids.shape) or run(start, ids, new_lens)
    eng = gen.engine
    wake = eng._wake.notify
    eng._wake.notify = lambda n=1: None  # the idle engine thread sleeps until all three are queued
    try:
        streams = [gen.submit(p, sp) for p in prompts]
    finally:
        del eng._wake.notify
    with eng._wake:
        wake()
    assert [s.text() for s in streams] == want
    assert calls[0] == (3, 8), calls  # the three first pieces (prefill_chunk 8) in one call
    assert sorted(calls[1:4]) == [(1, calls[1][1])] * 3, calls  # the rest of each prompt (it has a past): one call each
    assert (3, 1) in calls[4:], calls  # then decode rows together


def test_an_aborted_long_request_gives_its_kv_memory_back(tmp_path):
    """The rows of an aborted request's output are released to the OS; the next request in
    that slot gives the same tokens as alone."""
    import mmap
    import sys
    import time

    from edge.runtime.engine import Engine

    if not sys.platform.startswith("linux"):
        pytest.skip("resident pages are read with mincore, Linux-specific")
    if 1024 * 16 * 4 < 8 * mmap.PAGESIZE:  # one head plane: 1024 rows x head_dim 16 x float32
        pytest.skip(f"a head plane of this tiny model spans < 8 pages of {mmap.PAGESIZE} bytes: nothing to release whole")
    path = make_tiny_bundle(tmp_path / "long", tiny_hf_model("llama", seed=5, max_position=1024), "fp32",
                            forms=("ort",), max_context=1024, max_batch=2)
    b = Bundle.open(path, verify=False)
    short, prompt = SamplingParams(max_tokens=6, temperature=0), [5, 6, 7, 8, 9]
    with Engine(OrtDecoderSession(b, max_batch=1, kv_tokens=1024), eos_ids=()) as alone:
        want = alone.submit(prompt, short, detokenize=False)
        list(want)
    session = OrtDecoderSession(b, max_batch=2, prefill_chunk=8, kv_tokens=2048)
    bufs = (*session.k, *session.v)
    with Engine(session, eos_ids=()) as engine:
        base = resident_bytes(*bufs)
        s = engine.submit([1, 2, 3], SamplingParams(max_tokens=1000, temperature=0.9, seed=1), detokenize=False)
        t0 = time.monotonic()
        while len(s.request.output_ids) < 900 and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        during = resident_bytes(*bufs)
        s.close()
        again = engine.submit(prompt, short, detokenize=False)  # slot 0 again
        list(again)
        for _ in range(300):  # released once the engine is idle (after its last step)
            after = resident_bytes(*bufs)
            if after - base < (during - base) / 4:
                break
            time.sleep(0.01)
    assert again.request.output_ids == want.request.output_ids
    assert during - base > 800 * session.kv_token_bytes, "the long output was resident"
    assert after - base < (during - base) / 4, "... and was given back"  # (pages of 64 rows here: 1-2 per plane stay)


def test_step_logits_rows_follow_the_batch_rows_in_any_slot_order(bundle):
    """execute() hands back each row's logits from the slot its call wrote (a view when the rows
    are consecutive slots in order, a gathered copy otherwise): rows listed in reverse slot order
    get the same logits as in order, and the same as the session's own decode()."""
    from edge.runtime.ort_session import KV_BLOCK
    from edge.runtime.step import StepBatch

    b = Bundle.open(bundle, verify=False)
    sess = OrtDecoderSession(b, max_batch=3, kv_tokens=3 * 64)
    bps = -(-sess.max_context // KV_BLOCK)
    prompts = {0: [5, 9, 13, 2], 2: [7, 1, 30, 44]}  # slots 0 and 2: slot 1 is a gap

    def step(rows: list[tuple[int, list[int], int]]) -> np.ndarray:  # (slot, new tokens, cached before)
        r = len(rows)
        qs = np.cumsum([0] + [len(t) for _, t, _ in rows]).astype(np.int32)
        tables = np.full((r, bps), -1, np.int32)
        tables[:, 0] = [s * bps for s, _, _ in rows]
        z32, f32 = np.zeros(r, np.int32), np.zeros(r, np.float32)
        batch = StepBatch(KV_BLOCK, np.concatenate([t for _, t, _ in rows]).astype(np.int32), np.zeros(qs[-1], np.int32),
                          np.zeros(qs[-1], np.int32), qs, np.array([c + len(t) for _, t, c in rows], np.int32), tables,
                          np.ones(r, np.int32), f32, f32 + 1, z32, f32, np.ones(r, np.int32))
        return np.array(sess.execute(batch).logits)

    for s, ids in prompts.items():
        step([(s, ids, 0)])
    in_order = step([(0, [3], 4), (2, [8], 4)])  # gathered: slots 0 and 2 are not consecutive
    reverse = step([(2, [8], 4), (0, [3], 4)])  # same tokens at the same positions, rows swapped
    np.testing.assert_array_equal(reverse, in_order[::-1])
    ref, alone = {}, OrtDecoderSession(b, max_batch=1, kv_tokens=64)
    for s, ids in prompts.items():  # the same tokens from scratch through another session's prefill
        alone.add_sequence(s)
        ref[s] = alone.prefill(s, np.array(ids + [3 if s == 0 else 8]))
        alone.release(s)
    np.testing.assert_allclose(in_order[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(in_order[1], ref[2], rtol=1e-5, atol=1e-5)
    consecutive = step([(0, [3], 4), (1, [8], 0)])  # slots 0 and 1 in order: handed over as a view
    np.testing.assert_array_equal(consecutive[0], in_order[0])
