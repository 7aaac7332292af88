"""The cuda backend's host side without a GPU: CudaBackend.launch / result (pinned ring, events,
StepBatch.prev_rows gathered "on the device") over a numpy stand-in for CuPy and a toy session
whose next token is (last token * 7 + position) % V. What a GPU run adds (kernels, graphs, real
asynchrony) is in tests/test_cuda_backend.py (gpu marker)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from edge.runtime.step import F32, I32, StepBatch
from engine_checks import run_together

V, MB, BS, CTX = 64, 8, 16, 64


class _Arr(np.ndarray):
    """A numpy array with CuPy's host-transfer methods (synchronous here)."""

    def set(self, host, stream=None):
        assert host.shape == self.shape and host.dtype == self.dtype, (host.shape, self.shape)
        self[...] = host

    def get(self, stream=None, out=None, blocking=True):
        if out is None:
            return np.array(self)
        assert out.shape == self.shape and out.dtype == self.dtype, (out.shape, self.shape)
        out[...] = self
        return out


def _wrap(x):
    return x.view(_Arr) if isinstance(x, np.ndarray) else x


class _Event:
    def __init__(self, **kw):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        assert self.recorded, "waited on an event nobody recorded"


class _RawKernel:
    def __init__(self, src, name):
        assert f"void {name}(" in src
        self.calls = 0

    def __call__(self, grid, block, args):
        ids, tok, has_tok, prev, last, rows = args
        assert isinstance(has_tok, np.int32) and isinstance(rows, np.int32)
        assert grid[0] * block[0] >= rows
        for r in range(int(rows)):
            if prev[r] >= 0:
                ids[tok[r] if has_tok else r] = last[prev[r]]


def _fake_cupy():
    cp = types.ModuleType("cupy")
    def attr(name):  # numpy's functions returning _Arr; its types (dtypes) as they are
        f = getattr(np, name)
        return f if isinstance(f, type) or not callable(f) else (lambda *a, **k: _wrap(f(*a, **k)))

    cp.__getattr__ = attr
    cp.cuda = types.SimpleNamespace(Event=_Event)
    cp.RawKernel = _RawKernel
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype: np.zeros(shape, dtype)
    return cp, cupyx


class _Stream:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def synchronize(self):
        pass


class _ToySession:
    """The session attributes CudaBackend reads; every step's logits peak at (id * 7 + pos) % V."""

    max_batch, block_size, max_context, vocab_size, act_dtype = MB, BS, CTX, V, "float32"

    def __init__(self, cp):
        self.cp = cp
        self.max_blocks = CTX // BS
        self.blocks = types.SimpleNamespace(num_blocks=MB * self.max_blocks)
        self.kv = np.zeros(4)
        self.spec = types.SimpleNamespace(q_size=4)
        self.stream = _Stream()
        self._inp_host = np.zeros(4 * MB + MB * self.max_blocks, I32)
        self._inp = cp.zeros(self._inp_host.size, dtype=I32)
        self._logits = cp.zeros((MB, V), dtype=F32)
        self._next = cp.zeros(MB, dtype=I32)
        self.graph_ids = []  # the ids input of each graph replay

    @staticmethod
    def logits_of(ids, pos):
        target = (np.asarray(ids, np.int64) * 7 + np.asarray(pos)) % V
        return -0.5 * np.abs(np.arange(V)[None, :] - target[:, None]).astype(F32)

    def _bucket(self, n):
        return MB

    def _run_step(self, bsz):  # the decode graph: reads ids / positions from _inp
        ids, pos = self._inp[:MB], self._inp[MB:2 * MB]
        self.graph_ids.append(np.array(ids))
        self._logits[:] = self.logits_of(ids, pos)
        self._next[:] = np.argmax(self._logits, axis=1)

    def stream_steps(self, start, n, depth=3):  # the host-free greedy stream, one step at a time here
        self._inp.set(self._inp_host)
        for _ in range(n):
            self._run_step(1)
            tok = int(self._next[0])
            self._inp[0], self._inp[MB] = tok, self._inp[MB] + 1
            yield tok

    def _make_bufs(self, t):
        return {"h": self.cp.zeros((t, 2), dtype=I32)}

    def _layers(self, t, bufs, ids, pos, slots, attend):  # a mixed step: the token's id and position only
        bufs["h"][:, 0], bufs["h"][:, 1] = ids, pos

    def lm_head_logits(self, h, n, out):
        out[:] = self.logits_of(h[:, 0], h[:, 1])


@pytest.fixture
def backend(monkeypatch):
    cp, cupyx = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    from edge.runtime.cuda.backend import CudaBackend

    return CudaBackend(_ToySession(cp), async_steps=True)


def _batch(ids, pos, prev=None, host=None):
    r = len(ids)
    p = np.asarray(pos, I32)
    return StepBatch(BS, np.asarray(ids, I32), p, p.copy(), np.arange(r + 1, dtype=I32), p + 1, np.zeros((r, 1), I32),
                     np.ones(r, I32), np.zeros(r, F32), np.ones(r, F32), np.zeros(r, I32), np.zeros(r, F32),
                     np.asarray(host or [0] * r, I32), np.zeros((0, 2), I32),
                     np.asarray(prev, I32) if prev is not None else np.zeros(0, I32))


def _next(ids, pos):
    return [int((i * 7 + p) % V) for i, p in zip(ids, pos)]


def test_launch_takes_the_previous_launchs_ids_on_the_device_and_reads_back_in_order(backend):
    s = backend.session
    h1 = backend.launch(_batch([3, 4, 5], [10, 11, 12]))
    want1 = _next([3, 4, 5], [10, 11, 12])
    # launched before step 1 is read back: rows 0 and 1 continue step 1's rows 2 and 0, row 2 is new
    h2 = backend.launch(_batch([-1, -1, 9], [13, 11, 5], prev=[2, 0, -1]))
    assert s.graph_ids[-1][:3].tolist() == [want1[2], want1[0], 9]
    assert h1.result().sampled.tolist() == want1
    assert h2.result().sampled.tolist() == _next([want1[2], want1[0], 9], [13, 11, 5])
    # five launches unread (the ring holds 3): each still reads back its own ids
    hs = [backend.launch(_batch([i, i + 1], [1, 2])) for i in range(5)]
    assert [h.result().sampled.tolist() for h in hs] == [_next([i, i + 1], [1, 2]) for i in range(5)]
    # a host-sampled row: -1 and its logits
    out = backend.launch(_batch([1, 2], [3, 4], host=[0, 1])).result()
    assert out.sampled.tolist() == [_next([1], [3])[0], -1] and int(out.logits[1].argmax()) == _next([2], [4])[0]
    assert backend.execute(_batch([1], [3])).sampled.tolist() == _next([1], [3])


def test_prev_rows_without_a_previous_launch_are_refused(backend):
    from edge.errors import BackendError

    with pytest.raises(BackendError, match="previous step"):
        backend.launch(_batch([-1], [1], prev=[0]))


def test_engine_async_steps_over_the_backend_equal_one_step_at_a_time(backend):
    """The engine's overlapped steps through CudaBackend's own launch code (decode steps and mixed
    steps behind a launch, seeded sampling on the "device", an EOS met mid-way)."""
    from edge.runtime.engine import Engine
    from edge.runtime.sampler import SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, int(n)).tolist() for n in (3, 20, 7, 33, 12, 5)]
    params = [SamplingParams(max_tokens=9 + i, temperature=0) if i % 3 else SamplingParams(max_tokens=10, temperature=0.8, seed=i)
              for i in range(6)]
    launches = []
    launch = backend.launch
    backend.launch = lambda b: launches.append(b.has_prev_rows and not b.is_decode_only) or launch(b)

    def run(overlap, eos=()):
        with Engine(backend, eos_ids=eos, overlap=overlap, token_budget=24, prefill_chunk=8) as e:
            return run_together(e, prompts, params)

    eos = run(False)[1][0][4]
    want = run(False, (eos,))
    launches.clear()
    got = run(True, (eos,))
    assert got == want and {r for _, r in want} == {"stop", "length"}
    assert any(launches)  # a mixed step behind a launch took ids on the device
