"""The engine checks every backend must pass, shared by the backends' test files (tests/test_engine.py
for ONNX Runtime, tests/test_native_backend.py for the native CPU step): 12 concurrent requests give
the tokens each gives alone, seeded sampling gives the draw of the same request alone, and a
prefix-cache hit gives the text of a cold run while reusing whole blocks.

`make_gen(bundle, max_batch=12, **generator_kw) -> Generator` builds the backend under test."""

from __future__ import annotations

import threading

from edge.bundle import Bundle
from edge.runtime.sampler import SamplingParams
from edge.runtime.tokenizer import Tokenizer

PROMPTS = ["Once upon", "A dog ran", "xy", "The quick brown fox jumps", "hi", "Tell me a story about it",
           "0123456789", "zebra", "abc abc abc", "Q: what? A:", "robot", "E-214 means"]


def run_together(engine, prompts, params) -> list[tuple[list[int], str]]:
    """Submits every prompt at once (token ids, not detokenized), waits for all, and returns each
    request's output ids and finish reason in submit order; the engine's KV cache is empty after."""
    streams = [engine.submit(p, sp, detokenize=False) for p, sp in zip(prompts, params)]
    out = []
    for st in streams:
        list(st)
        out.append((list(st.request.output_ids), st.request.finish_reason))
    assert engine.kv.num_used == 0
    return out


def check_concurrent_equals_alone(make_gen, bundle) -> list[tuple[str, int, str]]:
    """Different prompt lengths, max_tokens and stop strings, greedy; returns what the 12 gave."""
    params = [SamplingParams(max_tokens=4 + 3 * (i % 5), temperature=0, stop=["e"] if i % 4 == 1 else []) for i in range(12)]
    alone = make_gen(bundle, max_batch=1)
    want = []
    for p, sp in zip(PROMPTS, params):
        want.append((alone.generate(p, sp), alone.stats.n_generated, alone.stats.finish_reason))
    gen = make_gen(bundle)
    got = [None] * 12
    barrier = threading.Barrier(12)

    def run(i):
        barrier.wait()
        s = gen.submit(PROMPTS[i], params[i])
        got[i] = (s.text(), s.request.stats.n_generated, s.request.finish_reason)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got == want, [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert gen.engine.kv.num_used == 0
    return got


def check_seeded_sampling_equals_alone(make_gen, bundle) -> None:
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    want = make_gen(bundle, max_batch=1).generate("Once upon", p)
    gen = make_gen(bundle)
    others = [gen.submit(x, SamplingParams(max_tokens=10, temperature=1.0, seed=i)) for i, x in enumerate(PROMPTS[1:5])]
    s = gen.submit("Once upon", p)
    assert s.text() == want
    [o.text() for o in others]


def check_prefix_cache_same_text(make_gen, bundle, max_tokens: int = 4):
    """Returns the caching generator (for backend-specific checks on top)."""
    tok = Tokenizer.from_bundle(Bundle.open(bundle, verify=False))
    gen, cold = make_gen(bundle), make_gen(bundle, prefix_cache=False)
    sys_prompt = "Answer from passages. [1] E-214: lidar fault. "
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)
    for q in ("E-214?", "Why?"):
        assert gen.generate(sys_prompt + q, greedy) == cold.generate(sys_prompt + q, greedy)
    shared = len(tok.encode(sys_prompt))
    block = gen.engine.kv.block_size
    assert shared >= 2 * block
    if gen.engine.kv.partial:  # every token the two prompts share (kv.py's partial hits)
        a, b = (tok.encode(sys_prompt + q) for q in ("E-214?", "Why?"))
        common = next(i for i, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)
        assert common >= shared - 1 and gen.stats.cached_tokens == common
    else:
        assert gen.stats.cached_tokens == shared - shared % block  # whole blocks
    assert cold.stats.cached_tokens == 0
    return gen
