"""The transformer block as kernel launches, shared by decode and prefill (a mixin of CudaDecoderSession).

Per decoder layer, M rows (M = batch in decode, prompt tokens in prefill):

    res (float [M, H]) --add_rmsnorm--> h --linear qkv (+bias)--> qkv [--qk_rmsnorm--] --rope_cache--> q, KV pool
      q --attend (the caller's: paged decode kernel | flash / cuBLAS in prefill)--> a
      a --linear o--> res += o [normed first: sandwich], h = rmsnorm --linear gate|up--> silu_mul | gelu_tanh_mul
        --linear down--> res += ... [normed first: sandwich]
    logits = lm_head(h) [--softcap_f32--]

The architecture's features become kernel arguments (`_block_params`); nothing here tests an
architecture's name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edge.runtime.cuda.kernels import NULL
from edge.runtime.cuda.kernels import i32 as _i32
from edge.runtime.cuda.layout import Linear
from edge.runtime.cuda.reference import rope_tables

EMBED_THREADS = 256  # embed_rmsnorm: rows up to 32 x this
FOLD_MAXP = 4  # gemv.cu FOLD_MAXP: a folded norm's consumer loads at most this many producer parts a thread


class LayerPass:
    """Embedding -> layers -> final norm, and the per-layer pieces around each linear."""

    fold_norms = True  # M = 1: fold the RMSNorms after o / down into the next GEMV where fold_pair allows
    fold_sides: tuple[str, ...] = ("o", "down")  # which linears' norms may fold (bench_step_ab's one-side forms)
    fold_count = 0  # norms folded in the last one-row layer pass

    def _block_params(self) -> None:
        """What the architecture's features ask of the kernels, per session and per layer:
        attention scale and soft-cap, embedding scale, final soft-cap, the GLU kernel, and per
        layer its sliding window (0: every earlier key) and RoPE tables (sliding layers of a
        model with rope_local_theta rotate with their own base)."""
        cp, spec, f = self.cp, self.spec, self.spec.features
        self.attn_scale = np.float32(f.attn_scale if f.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim))
        self.attn_softcap = np.float32(f.attn_softcap or 0.0)
        self.final_softcap = np.float32(f.final_softcap or 0.0)
        self.embed_scale = np.float32(f.embed_scale)
        self.glu_kernel = {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}[f.activation]
        cos, sin = rope_tables(spec, self.max_context)
        self.cos, self.sin = cp.asarray(cos), cp.asarray(sin)
        local = (self.cos, self.sin)
        if f.rope_local_theta is not None:
            cos, sin = rope_tables(spec, self.max_context, local=True)
            local = (cp.asarray(cos), cp.asarray(sin))
        for i, L in enumerate(self.layers):
            sliding = f.sliding(i)
            L["window"] = _i32(spec.sliding_window if sliding else 0)
            L["cos"], L["sin"] = local if sliding else (self.cos, self.sin)

    def _make_bufs(self, m: int) -> dict[str, Any]:
        cp, s = self.cp, self.spec
        f16 = self.act_dtype
        return {
            "res": cp.empty((m, s.hidden_size), dtype=cp.float32),
            "h": cp.empty((m, s.hidden_size), dtype=f16),
            "qkv": cp.empty((m, s.q_size + 2 * s.kv_size), dtype=f16),
            "q": cp.empty((m, s.q_size), dtype=f16),
            "a": cp.empty((m, s.q_size), dtype=f16),
            "o": cp.empty((m, s.hidden_size), dtype=f16),
            "gu": cp.empty((m, 2 * s.intermediate_size), dtype=f16),
            "act": cp.empty((m, s.intermediate_size), dtype=f16),
            # folded RMSNorms (M = 1): the producer blocks' sums of squares, and 1 / rms of the last
            # norm before a qkv (slot 0) and before a gate|up (slot 1): the scale of the next X'
            "fold_parts": cp.zeros(max(1, s.hidden_size // 2), dtype=cp.float32),
            "fold_inv": cp.ones(2, dtype=cp.float32),
        }

    def _add_rmsnorm(self, res: Any, x: Any, w: Any, out: Any, m: int, inv_out: Any = None) -> None:
        """res += x (x may be None); out = RMSNorm(res) * w; inv_out (a float slot): row 0's 1 / rms."""
        self.k["add_rmsnorm"]((m,), (self._norm_threads,), (res, x if x is not None else NULL, w, out, _i32(self.spec.hidden_size), np.float32(self.spec.rms_eps),
                                                            inv_out if inv_out is not None else NULL))

    def fold_pair(self, prod: Linear, cons: Linear, m: int, post: Any = None) -> bool:
        """Does the RMSNorm after `prod` (o, down) fold into `cons` (gate|up, the next qkv) at M = m?
        At one row, with fold_norms on, when prod is a block-K int4 GEMV (its "fold" epilogue) and
        cons runs fused (its "gluf" / "ropef" epilogue) with room for prod's per-block parts, and
        no sandwich norm sits between them."""
        if not (self.fold_norms and m == 1 and post is None and self._fused(cons, m)):
            return False
        if prod.kind != "int4" or not self.is_bk(prod.m1) or self.batch_invariant:
            return False
        rows, threads = prod.m1[1], cons.m1[2]
        return prod.n == self.spec.hidden_size == cons.k and 2 <= rows <= 32 and -(-prod.n // rows) <= FOLD_MAXP * threads

    def _layers(self, m: int, bufs: dict[str, Any], ids: Any, pos: Any, slots: Any, attend) -> None:
        """Embedding -> all layers -> final norm into bufs['h'] (rows [0, m)).

        At one row the norms after o and down fold into the next GEMV where fold_pair says so
        (gemv.cu gemv_int4_bk_fold): the producer writes X' scaled by the previous norm's 1 / rms,
        which embed_rmsnorm, add_rmsnorm and the folds' consumers store (slot a before a qkv,
        slot b before a gate|up); after a fused _res epilogue or a sandwich norm it is not known,
        and the next norm does not fold."""
        s = self.spec
        parts, finv = bufs["fold_parts"], bufs["fold_inv"]
        inv_a, inv_b = finv[0:1], finv[1:2]  # 1 / rms of the norm before qkv / before gate|up
        if s.hidden_size % 4 == 0 and s.hidden_size <= 32 * EMBED_THREADS:
            self.k["embed_rmsnorm"]((m,), (EMBED_THREADS,), (ids, self.embed, self.layers[0]["ln1"], bufs["res"], bufs["h"], _i32(s.hidden_size), np.float32(s.rms_eps), self.embed_scale, inv_a))
        else:
            self.k["embed"]((m,), (256,), (ids, self.embed, bufs["res"], _i32(s.hidden_size), self.embed_scale))
            self._add_rmsnorm(bufs["res"], None, self.layers[0]["ln1"], bufs["h"], m, inv_a)
        eps = np.float32(s.rms_eps)
        self._ring = self._prefill_ring(m) if m > self.tc_max_m else None
        fold_in = None  # (parts, their count, inv in, inv out) when bufs["h"] holds a folded X' for the qkv
        chained = True  # the last norm's 1 / rms is in its slot (embed_rmsnorm, add_rmsnorm and the folds store it)
        folds = 0
        try:
            for i, L in enumerate(self.layers):
                kc, vc = self.kv[i, 0], self.kv[i, 1]
                self._qkv_rope(L["qkv"], bufs["h"], m, pos, slots, bufs["q"], kc, vc, bufs["qkv"], layer=i, fold=fold_in)
                attend(i, bufs["q"], kc, vc, bufs["a"])
                if chained and "o" in self.fold_sides and self.fold_pair(L["o"], L["gu"], m, L["post_attn"]):
                    self._bk(L["o"], "fold", bufs["a"], bufs["res"], L["ln2"], bufs["h"], parts, inv_a, _i32(L["o"].n), _i32(L["o"].k), _i32(L["o"].gshift))
                    self._gate_up(L["gu"], bufs["h"], m, bufs["gu"], bufs["act"], fold=(parts, -(-L["o"].n // L["o"].m1[1]), inv_a, inv_b))
                    chained, folds = True, folds + 1
                else:
                    chained = self._linear_residual_norm(L["o"], bufs["a"], m, bufs["res"], bufs["o"], L["ln2"], bufs["h"], eps, post=L["post_attn"], inv_out=inv_b)
                    self._gate_up(L["gu"], bufs["h"], m, bufs["gu"], bufs["act"])
                last = i + 1 == len(self.layers)
                nxt = self.layers[i + 1]["ln1"] if not last else self.norm
                fold_in = None
                if chained and not last and "down" in self.fold_sides and self.fold_pair(L["down"], self.layers[i + 1]["qkv"], m, L["post_mlp"]):
                    self._bk(L["down"], "fold", bufs["act"], bufs["res"], nxt, bufs["h"], parts, inv_b, _i32(L["down"].n), _i32(L["down"].k), _i32(L["down"].gshift))
                    fold_in = (parts, -(-L["down"].n // L["down"].m1[1]), inv_b, inv_a)
                    chained, folds = True, folds + 1
                else:
                    chained = self._linear_residual_norm(L["down"], bufs["act"], m, bufs["res"], bufs["o"], nxt, bufs["h"], eps, post=L["post_mlp"], inv_out=inv_a)
            if m == 1:
                self.fold_count = folds
        finally:
            self._ring = None

    def lm_head_logits(self, h: Any, m: int, logits: Any) -> None:
        """logits float [m, V] = h[:m] @ head.T, soft-capped when the architecture caps them."""
        self.linear(self.lm_head, h, m, logits, out_f32=True)
        if self.final_softcap:
            n = m * self.vocab_size
            self.k["softcap_f32"](((n + 255) // 256,), (256,), (logits, np.int64(n), self.final_softcap))

    # Each linear of a layer with what follows it: one block-K kernel with the fused epilogue
    # when the linear's autotuned pick says so (M = 1), else the GEMV / cuBLAS and the small kernel.
    def _qkv_rope(self, lin: Linear, x: Any, m: int, pos: Any, slots: Any, q: Any, kc: Any, vc: Any, qkv_buf: Any, layer: int = 0,
                  fold: tuple | None = None) -> None:
        """qkv = x @ W.T; per-head RMSNorm of q and k (qk_norm); RoPE (the layer's tables) on
        q -> q, on k -> KV cache at slots; v -> KV cache. `fold`: x is a folded X' (parts, their
        count, inv in, inv out; _layers)."""
        s, L = self.spec, self.layers[layer]
        heads = (_i32(s.n_heads), _i32(s.n_kv_heads), _i32(s.head_dim))
        if fold is not None:
            parts, n, inv_in, inv_out = fold
            self._bk(lin, "ropef", x, pos, slots, L["cos"], L["sin"], q, kc, vc, parts, inv_in, inv_out, _i32(n), _i32(lin.n), _i32(lin.k), _i32(lin.gshift), *heads, np.float32(s.rms_eps))
            return
        if self._fused(lin, m):
            self._bk(lin, "rope", x, pos, slots, L["cos"], L["sin"], q, kc, vc, _i32(lin.n), _i32(lin.k), _i32(lin.gshift), *heads)
            return
        self.linear(lin, x, m, qkv_buf)
        if L["q_norm"] is not None:
            self.k["qk_rmsnorm"]((m, s.n_heads + s.n_kv_heads), (32,), (qkv_buf, L["q_norm"], L["k_norm"], *heads, np.float32(s.rms_eps)))
        threads = 128
        if self.act_dtype == "float16" and s.head_dim % 8 == 0:  # two rotation pairs a thread
            blocks = -(-((s.n_heads + s.n_kv_heads) * s.head_dim // 4 + s.kv_size // 8) // threads)
            self.k["rope_cache_x2"]((m, blocks), (threads,), (qkv_buf, pos, slots, L["cos"], L["sin"], q, kc, vc, *heads))
            return
        blocks = -(-((s.n_heads + s.n_kv_heads) * s.head_dim // 2 + s.kv_size) // threads)
        self.k["rope_cache"]((m, blocks), (threads,), (qkv_buf, pos, slots, L["cos"], L["sin"], q, kc, vc, *heads))

    def _gate_up(self, lin: Linear, x: Any, m: int, gu_buf: Any, act: Any, fold: tuple | None = None) -> None:
        """act = act(x @ Wg.T) * (x @ Wu.T), act SiLU or GeLU-tanh (gate / up rows interleaved in W).
        `fold`: x is a folded X' (parts, their count, inv in, inv out; _layers)."""
        if fold is not None:
            parts, n, inv_in, inv_out = fold
            self._bk(lin, "gluf", x, act, parts, inv_in, inv_out, _i32(n), _i32(lin.n), _i32(lin.k), _i32(lin.gshift), np.float32(self.spec.rms_eps))
            return
        if self._fused(lin, m):  # the fused epilogue is SiLU's (_fusable)
            self._bk(lin, "glu", x, act, _i32(lin.n), _i32(lin.k), _i32(lin.gshift))
            return
        self.linear(lin, x, m, gu_buf)
        n = m * (lin.n // 2)
        if self.act_dtype == "float16" and n % 4 == 0:  # four (gate, up) pairs a thread: one 16-byte load
            self.k[self.glu_kernel + "_x4"](((n // 4 + 255) // 256,), (256,), (gu_buf, act, _i32(n // 4)))
            return
        self.k[self.glu_kernel](((n + 255) // 256,), (256,), (gu_buf, act, _i32(m), _i32(lin.n // 2)))

    def _linear_residual_norm(self, lin: Linear, x: Any, m: int, res: Any, o_buf: Any, norm_w: Any, h: Any, eps: np.float32,
                              counter: Any = None, post: Any = None, inv_out: Any = None) -> bool:
        """res += x @ W.T (normed by `post` first: sandwich norms); h = RMSNorm(res) * norm_w. Returns
        whether 1 / rms went to inv_out (add_rmsnorm stores it; the fused epilogues do not)."""
        if post is not None:
            self.linear(lin, x, m, o_buf)
            self.k["norm_add_rmsnorm"]((m,), (self._norm_threads,), (res, o_buf, post, norm_w, h, _i32(self.spec.hidden_size), eps))
            return False
        if self._fused(lin, m):
            counter = self._counter if counter is None else counter
            self._bk(lin, "res", x, res, norm_w, h, counter, _i32(lin.n), _i32(lin.k), _i32(lin.gshift), eps)
            return False
        self.linear(lin, x, m, o_buf)
        self._add_rmsnorm(res, o_buf, norm_w, h, m, inv_out)
        return inv_out is not None
