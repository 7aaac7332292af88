"""Calibration text and activations.

Default text: `pydoc_data.topics` (the Python reference manual's topics, shipped with every
Python). Split by sorted topic key: the first CALIB_FRACTION of the keys calibrate, the
remaining keys are HELD OUT for perplexity and never seen by calibration.

Activations come from the numpy reference forward (edge.models.reference), layer by layer:
`LayerwiseActivations` pushes the calibration sequences through one layer at a time and hands
out that layer's linear inputs, so memory stays at one layer's worth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import UsageError
from edge.models.reference import LayerWeights, Rope, embed, layer_forward, rms_norm
from edge.models.spec import ModelSpec

CALIB_FRACTION = 0.8  # first 80% of sorted topic keys calibrate; the last 20% are held out
DEFAULT_SEQS = 8
DEFAULT_SEQ_LEN = 128
DEFAULT_SOURCE = "pydoc_data.topics"


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def calibration_keys() -> list[str]:
    t = _topics()
    return [k for k, _ in t[: int(len(t) * CALIB_FRACTION)]]


def heldout_keys() -> list[str]:
    t = _topics()
    return [k for k, _ in t[int(len(t) * CALIB_FRACTION) :]]


def calibration_text() -> str:
    """The calibration part of pydoc_data.topics (disjoint from heldout_text())."""
    t = dict(_topics())
    return "\n\n".join(t[k] for k in calibration_keys())


def heldout_text() -> str:
    """The held-out part of pydoc_data.topics, for perplexity only."""
    t = dict(_topics())
    return "\n\n".join(t[k] for k in heldout_keys())


def read_calib_file(path: Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"--calib {path}: cannot read ({e.strerror})", fix="give a UTF-8 text file") from None
    if len(text.strip()) < 200:
        raise UsageError(f"--calib {path}: too little text ({len(text.strip())} characters)", fix="give at least a few paragraphs of representative text")
    return text


@dataclass
class CalibrationSet:
    """Token sequences for calibration and where they came from."""

    seqs: list[np.ndarray]  # each int64 [seq_len]
    source: str  # "pydoc_data.topics[calibration split]" or a file path
    n_tokens: int = field(init=False)

    def __post_init__(self):
        self.n_tokens = int(sum(len(s) for s in self.seqs))

    def to_dict(self) -> dict:
        return {"source": self.source, "sequences": len(self.seqs), "tokens": self.n_tokens}


def make_calibration_set(
    tokenizer_json: Path, calib: Path | None = None, *, n_seqs: int = DEFAULT_SEQS, seq_len: int = DEFAULT_SEQ_LEN
) -> CalibrationSet:
    """Tokenize the calibration text and cut `n_seqs` evenly spaced windows of `seq_len` tokens."""
    from tokenizers import Tokenizer

    text = read_calib_file(calib) if calib is not None else calibration_text()
    source = str(calib) if calib is not None else f"{DEFAULT_SOURCE}[first {int(CALIB_FRACTION * 100)}% of sorted keys]"
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if len(ids) < seq_len:
        seq_len = len(ids)
        n_seqs = 1
    n_seqs = min(n_seqs, len(ids) // seq_len)
    starts = np.linspace(0, len(ids) - seq_len, n_seqs).astype(int)
    return CalibrationSet([ids[s : s + seq_len] for s in starts], source)


POINTS = ("attn_in", "o_in", "mlp_in", "down_in")


class LayerwiseActivations:
    """Hidden states of every calibration sequence, advanced one decoder layer at a time.

    run(i, lw) -> {point: float32 [T_total, K]} inputs of layer i's linears (see
    edge.models.reference.Capture), and advances the hidden states through layer i using
    the float weights `lw` (AWQ scaling leaves the float function unchanged)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], seqs: list[np.ndarray]):
        self.spec = spec
        self.hidden = [embed(spec, weights, s) for s in seqs]  # each [T, H]
        self.rope = [Rope(spec, np.arange(len(s))) for s in seqs]
        self.next_layer = 0

    def run(self, i: int, lw: LayerWeights) -> dict[str, np.ndarray]:
        if i != self.next_layer:
            raise RuntimeError(f"layers must be run in order: expected {self.next_layer}, got {i}")
        got: dict[str, list[np.ndarray]] = {p: [] for p in POINTS}

        def capture(_layer: int, point: str, x: np.ndarray) -> None:
            got[point].append(np.array(x, dtype=np.float32))

        for j, (h, rope) in enumerate(zip(self.hidden, self.rope)):
            self.hidden[j] = layer_forward(self.spec, i, lw, h, rope, capture)
        self.next_layer += 1
        return {p: np.concatenate(v, axis=0) for p, v in got.items()}

    def final_normed(self, norm_weight: np.ndarray) -> np.ndarray:
        """Input of the LM head after all layers: float32 [T_total, H]."""
        return np.concatenate([rms_norm(h, np.asarray(norm_weight, np.float32), self.spec.rms_eps) for h in self.hidden], axis=0)
