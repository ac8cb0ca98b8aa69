"""Activation sparsification at the input of every projection, and the count of what it zeroed.

Two modes, per projection (layer, kind):
- ``threshold``: zero the entries with |x| <= t, t calibrated on text so that a target fraction is zeroed
  (TEAL, R-Sparse). The achieved fraction on other text drifts; the runtime measures it.
- ``topk``: keep exactly the round((1 - s) * d) largest magnitudes of each token (ActTail, Q-Sparse).

q/k/v read one input but each has its own threshold (likewise gate/up): ``Sparsifier.group`` returns one
sparsified copy per projection. Prefill policy: positions before ``dense_before`` stay dense (0: every
position is sparsified, as in the perplexity runs; see generate.py for the TEAL-like "half" policy).
The two kernels below are plain functions so a GPU path can replace them.
"""

from __future__ import annotations

from collections import defaultdict
import torch
from torch import Tensor

MODES = ("threshold", "topk")


def threshold_sparsify(x: Tensor, t: float) -> Tensor:
    """x with every entry of magnitude <= t set to zero."""
    return x.masked_fill(x.abs() <= t, 0.0)


def keep_count(sparsity: float, width: int) -> int:
    """How many of a width-wide input's entries topk mode keeps: round((1 - s) * width), at least one."""
    return max(1, round((1.0 - sparsity) * width))


def topk_sparsify(x: Tensor, keep: int) -> Tensor:
    """x with only the ``keep`` largest magnitudes of each row (last dim) kept."""
    if keep >= x.shape[-1]:
        return x
    idx = x.abs().topk(keep, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


class Sparsifier:
    """Applies per-projection thresholds (or top-k ratios) and counts the zeros it produced.

    ``thresholds`` / ``sparsities`` map (layer, kind) to a value; a projection absent from the map stays
    dense.
    """

    def __init__(self, mode: str = "dense", thresholds: dict | None = None, sparsities: dict | None = None,
                 dense_before: int = 0, measure: bool = True):
        if mode not in ("dense",) + MODES:
            raise ValueError(f"unknown sparsity mode {mode!r}")
        self.mode = mode
        self.thresholds = dict(thresholds or {})
        self.sparsities = dict(sparsities or {})
        self.dense_before = dense_before
        self.measure = measure
        self.rows: Tensor | None = None  # positions that get sparsified, or None for all
        self.reset_counts()

    @classmethod
    def dense(cls) -> "Sparsifier":
        return cls("dense")

    @property
    def active(self) -> bool:
        return self.mode != "dense"

    def reset_counts(self) -> None:
        self.zeros: dict = defaultdict(int)
        self.total: dict = defaultdict(int)

    def set_positions(self, pos: Tensor) -> None:
        """Called by the model before each forward with the token positions [T] of the batch."""
        self.rows = None if self.dense_before <= 0 else (pos >= self.dense_before)

    def achieved(self) -> dict:
        """Measured sparsity per (layer, kind): zeros / entries over the sparsified positions so far."""
        return {key: self.zeros[key] / self.total[key] for key in self.total if self.total[key]}

    # ---- applying ----------------------------------------------------------------------------------

    def one(self, layer: int, kind: str, x: Tensor) -> Tensor:
        return self.group(layer, (kind,), x)[0]

    def group(self, layer: int, kinds: tuple[str, ...], x: Tensor) -> tuple[Tensor, ...]:
        """One sparsified copy of the shared input x per projection in ``kinds``."""
        if self.mode == "dense":
            return (x,) * len(kinds)
        return tuple(self._apply((layer, kind), x) for kind in kinds)

    def _apply(self, key: tuple[int, str], x: Tensor) -> Tensor:
        if self.mode == "threshold":
            t = self.thresholds.get(key)
            if t is None:
                return x
            y = threshold_sparsify(x, t)
        else:
            s = self.sparsities.get(key)
            if s is None:
                return x
            y = topk_sparsify(x, keep_count(s, x.shape[-1]))
        if self.rows is not None:  # prefill policy: early positions stay dense
            y = torch.where(self.rows[:, None], y, x)
        if self.measure:
            counted = y if self.rows is None else y[..., self.rows, :]
            self.zeros[key] += int((counted == 0).sum())
            self.total[key] += counted.numel()
        return y


def from_plan(plan: dict, mode: str, dense_before: int = 0) -> Sparsifier:
    """A Sparsifier for a plan's projections: thresholds (threshold mode) or sparsities (topk mode)."""
    rows = plan["projections"]
    if mode == "threshold":
        return Sparsifier(mode, thresholds={(p["layer"], p["kind"]): p["threshold"] for p in rows},
                          dense_before=dense_before)
    return Sparsifier(mode, sparsities={(p["layer"], p["kind"]): p["sparsity"] for p in rows},
                      dense_before=dense_before)
