"""Prefill (a mixin of CudaDecoderSession): a prompt's tokens through every layer at once, its
attention on the tensor-core flash kernel (head_dim 64 / 128) or cuBLAS + causal softmax."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge.errors import BackendError
from edge.runtime.cuda.kernels import NULL
from edge.runtime.cuda.kernels import i32 as _i32


def flash_prefill_smem(head_dim: int) -> int:
    """Dynamic shared memory of flash_prefill_d{64,128}: two stages of K and V tiles of 64 rows
    of head_dim + 8 halves (flash_prefill.cu's flash_prefill_smem)."""
    return 2 * 2 * 64 * (head_dim + 8) * 2


# flash_prefill instances (flash_prefill.cu): name -> (kernel name prefix, warps, m16-tiles a warp,
# head dims compiled), both on the heads-first grid. "w8" (8 warps x 16 queries: each K / V tile read
# once per 128 queries) is the default: on the H200 (bench_cuda flash_ab, Llama-3.2-1B, 2,048 tokens,
# two calls) the whole prefill took 9.371 / 10.240 ms against w4's 9.538 / 10.357 (its attention
# alone 1.718 / 1.667 ms against 1.674 / 1.646; Llama-3-8B's prefill 55.53 / 54.10 against 54.65 / 54.47).
FLASH_VARIANTS = {
    "w4": ("flash_prefill_", 4, 1, (64, 128)),
    "w8": ("flash_prefill_w8_", 8, 1, (64, 128)),
}
PREFILL_Q_CHUNK = 512  # prefill attention in query chunks: chunk c skips keys after its last query
LOG2E = 1.4426950408889634


class PrefillPass:
    """prefill / prefill_greedy and the prompt's attention."""

    flash_prefill = True  # prefill attention on the tensor-core flash kernel (head_dim 64 / 128), else cuBLAS
    flash_variant = "w8"  # FLASH_VARIANTS key (a variant not compiled for this head_dim, or soft-capping, runs "w4")

    def _prefill(self, seq_id: int, token_ids: np.ndarray) -> Any:
        cp, s = self.cp, self.spec
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        t = len(ids)
        if t == 0:
            raise BackendError("prefill needs at least one token")
        slots = self.blocks.append(seq_id, t)
        length = self.blocks.length(seq_id)
        p0 = length - t
        with self.stream:
            ids_d = cp.asarray(ids)
            pos_d = cp.arange(p0, length, dtype=cp.int32)
            slots_d = cp.asarray(np.asarray(slots, dtype=np.int32))
            all_slots = cp.asarray(np.asarray(self.blocks.slots(seq_id), dtype=np.int32))
            bufs = self._make_bufs(t)

            def attend(i, q, kc, vc, out):
                self._prefill_attention(q, kc, vc, all_slots, t, p0, out, layer=i)

            self._layers(t, bufs, ids_d, pos_d, slots_d, attend)
            logits = cp.empty((1, s.vocab_size), dtype=cp.float32)
            self.lm_head_logits(bufs["h"][t - 1 :], 1, logits)
        return logits

    def _prefill_attention(self, q: Any, kc: Any, vc: Any, all_slots: Any, t: int, p0: int, out: Any, *, layer: int) -> None:
        """Causal attention of t new queries over the sequence's p0 + t cached keys (the last
        sliding_window of them on a sliding `layer`): the tensor-core flash kernel for head_dim
        64 / 128 (flash_prefill), else cuBLAS."""
        s = self.spec
        window = self.layers[layer]["window"]
        if self.flash_prefill and s.head_dim in (64, 128):
            scale_log2 = np.float32(LOG2E * float(self.attn_scale))
            prefix, warps, mi, dims = FLASH_VARIANTS[self.flash_variant]
            if self.attn_softcap > 0 or s.head_dim not in dims:
                prefix, warps, mi, dims = FLASH_VARIANTS["w4"]
                if self.attn_softcap > 0:
                    prefix = "flash_prefill_cap_"
            # grid (heads, query blocks): every head's longest query blocks launch first (flash_prefill.cu)
            self.k[f"{prefix}d{s.head_dim}"](
                (s.n_heads, -(-t // (16 * warps * mi))), (32 * warps,),
                (q, kc, vc, all_slots, out, _i32(t), _i32(p0 + t), _i32(s.n_heads), _i32(s.n_kv_heads), scale_log2,
                 window, self.attn_softcap),
                shared_mem=flash_prefill_smem(s.head_dim))
            return
        self._prefill_attention_cublas(q, kc, vc, all_slots, t, p0, out, window)

    def _prefill_attention_cublas(self, q: Any, kc: Any, vc: Any, all_slots: Any, t: int, p0: int, out: Any, window: np.int32) -> None:
        """Causal attention of t new queries over the sequence's p0 + t cached keys (cuBLAS;
        causal_softmax masks the sliding window and soft-caps).

        Queries go in chunks of PREFILL_Q_CHUNK: chunk [t0, t1) only multiplies keys
        [0, p0 + t1), so a long prompt does about half the work of a full square."""
        cp, s = self.cp, self.spec
        hkv, g, d = s.n_kv_heads, s.n_heads // s.n_kv_heads, s.head_dim
        # queries grouped by kv head: [T, Hkv, G, D] -> [Hkv, G, T, D], pre-scaled (1/sqrt(D) or the architecture's)
        qh = q[:t].reshape(t, hkv, g, d).transpose(1, 2, 0, 3) * np.float16(self.attn_scale)
        k = kc[all_slots].transpose(1, 2, 0)  # [Hkv, D, L]
        v = vc[all_slots].transpose(1, 0, 2)  # [Hkv, L, D]
        k, v = cp.ascontiguousarray(k), cp.ascontiguousarray(v)
        o = cp.empty((t, hkv, g, d), dtype=cp.float16)
        for t0 in range(0, t, PREFILL_Q_CHUNK):
            t1 = min(t, t0 + PREFILL_Q_CHUNK)
            tc, lc = t1 - t0, p0 + t1
            qc = qh[:, :, t0:t1].reshape(hkv, g * tc, d)
            sc = cp.matmul(qc, k[:, :, :lc])  # [Hkv, G*Tc, Lc] half
            sc = cp.ascontiguousarray(sc)
            self.k["causal_softmax"]((hkv * g * tc,), (256,), (sc, _i32(lc), _i32(tc), _i32(p0 + t0), window, self.attn_softcap))
            oc = cp.matmul(sc, v[:, :lc])  # [Hkv, G*Tc, D]
            o[t0:t1] = oc.reshape(hkv, g, tc, d).transpose(2, 0, 1, 3)
        out[:t] = o.reshape(t, s.q_size)

    def prefill(self, seq_id: int, token_ids: np.ndarray) -> np.ndarray:
        """Append token_ids to the sequence; float32 logits [vocab] of the last position."""
        logits = self._prefill(seq_id, token_ids)
        out = logits[0].get(stream=self.stream)
        self.stream.synchronize()
        return out

    def prefill_greedy(self, seq_id: int, token_ids: np.ndarray) -> int:
        """Prefill, then argmax on the GPU: the first generated token id."""
        logits = self._prefill(seq_id, token_ids)
        with self.stream:
            # the decode step's multi-block argmax (one 1024-thread block took ~30 us of a 128k vocabulary)
            self.k["argmax_rows_mb"]((self._argmax_parts, 1), (256,), (logits, self._next, NULL, NULL, NULL, _i32(0), self._amax_v, self._amax_i, self._amax_t, _i32(self.vocab_size)))
            out = int(self._next[:1].get(stream=self.stream)[0])
        self.stream.synchronize()
        return out
