"""Prefill weights dequantized one linear ahead, on a side stream, into a ring of two buffers.

A long prefill runs each int4 / int8 layer linear as a dequantization to fp16 (memory-bound:
~1 ms of a Llama-3.2-1B 2,048-token prefill) and a cuBLAS GEMM (compute-bound). The ring
dequantizes linear i + 1 on its own stream while GEMM i and the kernels around it run, so the
dequantization hides under compute instead of adding to it:

    side:  deq 0 -> A | deq 1 -> B          | deq 2 -> A (waits: GEMM 0 done reading A) | ...
    main:              GEMM 0 (A) ... rope, attention ... GEMM 1 (B) ... norm ... GEMM 2 (A)
                       ^ waits deq 0                      ^ waits deq 1            ^ waits deq 2

`take(lin)` hands the buffer of the next linear in the planned order (the main stream waits for
its dequantization) and issues the one after; `release()` after the GEMM marks the buffer free.
A linear out of order is not the ring's (the caller dequantizes it inline). The weights are the
same bits as the inline path's (same kernel), so outputs do not change.
"""

from __future__ import annotations

from typing import Any, Sequence

from edge.runtime.cuda.layout import Linear


class DequantRing:
    def __init__(self, sess: Any, order: Sequence[Linear], bufs: tuple[Any, Any], side: Any, events: dict[str, list[Any]]):
        self.sess, self.order = sess, list(order)
        self.bufs, self.side = bufs, side
        self.ready, self.free = events["ready"], events["free"]
        self.main = sess.cp.cuda.get_current_stream()
        self.pos = 0  # index in order of the next linear take() hands out
        self.issued = 0  # linears whose dequantization is queued on the side stream
        for ev in self.free:  # whatever ran on main before (an earlier prefill's GEMMs) came first
            ev.record(self.main)
        if self.order:
            self._issue(0)

    def expects(self, lin: Linear) -> bool:
        return self.pos < len(self.order) and self.order[self.pos] is lin

    def take(self, lin: Linear) -> Any:
        """fp16 [N, K] weight of `lin` (the next in order), ready for work queued on main after this call."""
        i = self.pos
        b = i % 2
        if self.issued <= i:
            self._issue(i)
        self.main.wait_event(self.ready[b])
        if i + 1 < len(self.order) and self.issued <= i + 1:
            self._issue(i + 1)
        self.pos = i + 1
        return self.bufs[b][: lin.n * lin.k].reshape(lin.n, lin.k)

    def release(self) -> None:
        """The last taken buffer's GEMM is queued on main: the buffer is free after it."""
        self.free[(self.pos - 1) % 2].record(self.main)

    def _issue(self, j: int) -> None:
        b = j % 2
        self.side.wait_event(self.free[b])  # the GEMM that last read buffer b
        with self.side:
            self.sess.dequantize(self.order[j], self.bufs[b])
        self.ready[b].record(self.side)
        self.issued = j + 1
