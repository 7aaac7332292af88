"""Per-layer quantization error: how far each quantized linear is from its float weight.

For a linear with float weight W [N, K], the effective engine weight W_q (dequantized, mapped
back through any AWQ scaling) and calibration inputs X [T, K]:
  weight_err = ||W_q - W||_F / ||W||_F
  output_err = ||X W_q^T - X W^T||_F / ||X W^T||_F      (what the next layer sees)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class LayerError:
    module: str  # HF name without `.weight`
    kind: str  # int4 | int8 | fp16 | fp32
    weight_err: float
    output_err: float | None  # None without calibration activations
    awq: bool = False  # AWQ scales applied to this layer

    def to_dict(self) -> dict:
        return asdict(self)


def rel_fro(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||_F / ||b||_F (0 when b is 0)."""
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / den if den > 0 else 0.0


REPORT_TOKENS = 256  # rows of X the output error is measured on (evenly spaced)


def linear_error(module: str, kind: str, w: np.ndarray, wq: np.ndarray, x: np.ndarray | None, awq: bool = False) -> LayerError:
    """Errors of effective weight wq [N, K] against w on inputs x [T, K] (or None)."""
    if x is not None and x.shape[0] > REPORT_TOKENS:
        x = x[np.linspace(0, x.shape[0] - 1, REPORT_TOKENS).astype(int)]
    out = rel_fro(x @ wq.T, x @ w.T) if x is not None else None
    return LayerError(module, kind, rel_fro(wq, w), out, awq)


class RowBlockError:
    """linear_error accumulated over row blocks of W (the LM head, 151,936 rows: whole, its float32
    copies are 0.9 GB each). Sums of squares in float64; equal to linear_error's float32 norms
    to ~1e-6 relative."""

    def __init__(self, module: str, kind: str, x: np.ndarray | None):
        if x is not None and x.shape[0] > REPORT_TOKENS:
            x = x[np.linspace(0, x.shape[0] - 1, REPORT_TOKENS).astype(int)]
        self.module, self.kind, self.x = module, kind, x
        self.sq = np.zeros(4)  # ||wq - w||^2, ||w||^2, ||x wq^T - x w^T||^2, ||x w^T||^2

    def add(self, w: np.ndarray, wq: np.ndarray) -> None:
        """Rows [r0, r1) of W and of the effective weight, float32 [r1 - r0, K]."""

        def sq(a: np.ndarray) -> float:
            a = a.ravel()
            return float(np.dot(a.astype(np.float64), a.astype(np.float64)))

        self.sq[0] += sq(wq - w)
        self.sq[1] += sq(w)
        if self.x is not None:
            y = self.x @ w.T
            self.sq[2] += sq(self.x @ wq.T - y)
            self.sq[3] += sq(y)

    def result(self) -> LayerError:
        def ratio(num: float, den: float) -> float:
            return float(np.sqrt(num) / np.sqrt(den)) if den > 0 else 0.0

        out = ratio(self.sq[2], self.sq[3]) if self.x is not None else None
        return LayerError(self.module, self.kind, ratio(self.sq[0], self.sq[1]), out)


@dataclass
class QuantReport:
    """All layers' errors plus summary statistics (stored in the manifest under quant.report)."""

    layers: list[LayerError]

    def summary(self) -> dict:
        w = [e.weight_err for e in self.layers]
        o = [e.output_err for e in self.layers if e.output_err is not None]
        return {
            "layers": len(self.layers),
            "weight_err_mean": float(np.mean(w)) if w else 0.0,
            "weight_err_max": float(np.max(w)) if w else 0.0,
            "output_err_mean": float(np.mean(o)) if o else None,
            "output_err_max": float(np.max(o)) if o else None,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "layers": [e.to_dict() for e in self.layers]}

    def table(self, title: str = "quantization error per layer"):
        """A rich Table (module, kind, AWQ, weight and output relative error)."""
        from rich.table import Table

        t = Table(title=title)
        for col in ("module", "kind", "awq", "weight err", "output err"):
            t.add_column(col, justify="left" if col == "module" else "right")
        for e in self.layers:
            t.add_row(
                e.module,
                e.kind,
                "yes" if e.awq else "",
                f"{e.weight_err:.4f}",
                "-" if e.output_err is None else f"{e.output_err:.4f}",
            )
        s = self.summary()
        if s["output_err_mean"] is not None:
            t.caption = f"mean output err {s['output_err_mean']:.4f}, max {s['output_err_max']:.4f}"
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console(stderr=True)).print(self.table())
