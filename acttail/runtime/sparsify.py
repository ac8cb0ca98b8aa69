"""Activation sparsification at the input of every projection, and the count of what it zeroed.

A plan becomes runtime settings in one place, ``settings(plan, mode)``: one ``ProjectionSparsity`` per
projection, read by the CPU reference (``Sparsifier``) and by the kernel launches (``runtime.launch``: the
GPU decoder and ``acttail.apply`` on transformers models). Two modes:
- ``threshold``: zero the entries with |x| <= t, t calibrated on text so that a target fraction is zeroed
  (TEAL, R-Sparse). The achieved fraction on other text drifts; the runtime measures it.
- ``topk``: keep exactly the round((1 - s) * d) largest magnitudes of each token (ActTail, Q-Sparse).

q/k/v read one input but each has its own setting (likewise gate/up): ``Sparsifier.project`` computes a
group of projections from their shared input, each from its own sparsified copy, and concatenates them. Prefill policy:
positions before ``dense_before`` stay dense (0: every position is sparsified, as in the perplexity runs;
see generate.py for the TEAL-like "half" policy). An ``observer`` sees every group's input before it is
sparsified: that is how calibration measures the sparse run without a decoder of its own.

Counting is safe across threads: the counts a Sparsifier keeps (``achieved``) are updated under a lock, and
``counting()`` gives one call its own counts too, of what its thread ran (what ``acttail.evaluate``
reports, whatever other threads run through the same applied plan meanwhile).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ActTailError

MODES = ("threshold", "topk")
MODE = "threshold"  # the default wherever a plan runs: its calibrated thresholds
PREFILL = ("all", "half", "none")  # which prompt positions a plan sparsifies (decoded tokens always are)


@dataclass(frozen=True)
class ProjectionSparsity:
    """What the runtime does at one projection: zero the inputs whose score is <= threshold, or keep the
    ``keep`` highest scores of each token; the score is |x|, or |x_i| score_i with per-channel weights.
    On sparsified positions ``lowrank`` (U, V) adds U (V (x - x_kept)) for the dropped inputs and ``bias``
    is added to the output."""

    threshold: float | None = None
    keep: int | None = None
    score: Tensor | None = None
    bias: Tensor | None = None
    lowrank: tuple[Tensor, Tensor] | None = None

    @property
    def compensated(self) -> bool:
        return self.bias is not None or self.lowrank is not None


def keep_count(sparsity: float, width: int) -> int:
    """How many of a width-wide input's entries topk mode keeps: round((1 - s) * width), at least one."""
    return max(1, round((1.0 - sparsity) * width))


def settings(plan, mode: str = MODE, where: str = "plan") -> dict[tuple[int, str], ProjectionSparsity]:
    """The runtime settings a plan asks for: its thresholds (threshold mode) or keep counts (topk mode), with
    its score weights and compensation tensors.

    The one mapping from a plan to what every runtime does; threshold mode needs a calibrated plan."""
    if mode not in MODES:
        raise ActTailError(f"unknown sparsity mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "threshold":
        missing = [e.key for e in plan.projections if e.threshold is None]
        if missing:
            raise ActTailError(f"{where} has no thresholds ({len(missing)} projections uncalibrated, e.g. "
                               f"{missing[0]}): run `acttail calibrate` first, or use --mode topk")
    out = {}
    for e in plan.projections:
        u, v = plan.tensor(e.key, "lowrank_u"), plan.tensor(e.key, "lowrank_v")
        cut = dict(threshold=e.threshold) if mode == "threshold" else dict(keep=keep_count(e.sparsity, e.in_features))
        out[(e.layer, e.kind)] = ProjectionSparsity(
            **cut, score=plan.tensor(e.key, "score"), bias=plan.tensor(e.key, "bias"),
            lowrank=(u, v) if u is not None else None)
    return out


def check_plan(plan, args, where: str = "the plan") -> None:
    """Refuse a plan for another shape than our decoder's (``ModelArgs`` ``args``): its layer count and every
    projection's (in, out) (``Plan.check_shapes``, the one check of a plan against a model)."""
    plan.check_shapes(args.n_layer, lambda layer, kind: (args.in_features(kind), args.out_features(kind)), where)
    if bool(plan.model.get("rotation")) != args.rotated:
        made, runs = ("a rotated", "this one is not") if args.rotated is False else ("an unrotated", "this one is")
        raise ActTailError(f"{where} was made for {made} checkpoint (acttail rotate), {runs}: its thresholds act on "
                           "the other basis")


def dense_prefix(prompt_len: int, prefill: str) -> int:
    """How many leading positions stay dense under a prefill policy: all (none dense), half, none (all)."""
    if prefill not in PREFILL:
        raise ActTailError(f"unknown prefill policy {prefill!r} (choose from {', '.join(PREFILL)})")
    return {"all": 0, "half": prompt_len // 2, "none": prompt_len}[prefill]


def threshold_sparsify(x: Tensor, t: float) -> Tensor:
    """x with every entry of magnitude <= t set to zero."""
    return x.masked_fill(x.abs() <= t, 0.0)


def topk_sparsify(x: Tensor, keep: int) -> Tensor:
    """x with only the ``keep`` largest magnitudes of each row (last dim) kept."""
    if keep >= x.shape[-1]:
        return x
    idx = x.abs().topk(keep, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def sparsify(x: Tensor, s: ProjectionSparsity) -> Tensor:
    """x sparsified as one projection's setting says (ranked by |x| or by |x_i| score_i)."""
    if s.score is not None:
        ranked = x.abs() * s.score.to(x.device, x.dtype)
        if s.threshold is not None:
            return x.masked_fill(ranked <= s.threshold, 0.0)
        if s.keep is not None and s.keep < x.shape[-1]:
            idx = ranked.topk(s.keep, dim=-1, sorted=False).indices
            return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
        return x
    if s.threshold is not None:
        return threshold_sparsify(x, s.threshold)
    if s.keep is not None:
        return topk_sparsify(x, s.keep)
    return x


def compensation_term(x: Tensor, threshold: Tensor, bias: Tensor | None, lowrank) -> Tensor | float:
    """What a projection's learned bias and low-rank term add to a sparse kernel's output, in fp32 [B, out]:
    bias + U (V x_dropped), x_dropped the inputs at or under ``threshold`` (a scalar, or one per token [B])."""
    term = 0.0
    if bias is not None:
        term = term + bias.float()
    if lowrank is not None:
        u, v = lowrank
        thr = threshold.reshape(-1, 1) if threshold.dim() else threshold
        dropped = torch.where(x.float().abs() > thr, 0.0, x.float())
        term = term + dropped @ v.float().T @ u.float().T
    return term


def sparse_linear(x: Tensor, xs: Tensor, w: Tensor, b: Tensor | None, s: ProjectionSparsity) -> Tensor:
    """The projection of input x whose sparsified copy is xs, with the setting's compensation."""
    y = F.linear(xs, w, b)
    if s.lowrank is not None:
        u, v = (t.to(x.device, x.dtype) for t in s.lowrank)
        y = y + F.linear(F.linear(x - xs, v), u)
    if s.bias is not None:
        y = y + s.bias.to(y.device, y.dtype)
    return y


class PerThread(threading.local):
    """Per-thread state of an object; a copy of the object (deepcopy, pickle) starts with none."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()


class Counts:
    """Zeros and entries counted per projection (layer, kind); the zero counts stay on the device until
    ``achieved`` reads them (counting costs no host round trip)."""

    def __init__(self):
        self.zeros: dict = defaultdict(int)
        self.total: dict = defaultdict(int)

    def add(self, key: tuple[int, str], zeros: Tensor, n: int) -> None:
        self.zeros[key] = self.zeros[key] + zeros
        self.total[key] += n

    def achieved(self) -> dict:
        """Measured sparsity per (layer, kind): zeros / entries counted."""
        return {key: float(self.zeros[key]) / n for key, n in self.total.items() if n}


_COUNTING = threading.Lock()  # around updates and reads of a Sparsifier's shared counts


class Sparsifier:
    """Computes the projections of a decoder with per-projection settings, counting the zeros it produced.

    ``settings`` maps (layer, kind) to a ``ProjectionSparsity``; a projection absent from it stays dense.
    """

    def __init__(self, settings: dict | None = None, dense_before: int = 0, measure: bool = True,
                 observer: Callable[[int, tuple[str, ...], Tensor], None] | None = None):
        self.settings = dict(settings or {})
        self.dense_before = dense_before
        self.measure = measure
        self.observer = observer
        self.rows: Tensor | None = None  # positions that get sparsified, or None for all
        self._local = PerThread()  # .counts: the Counts of a counting() block of this thread
        self.reset_counts()

    @classmethod
    def dense(cls) -> "Sparsifier":
        return cls()

    def reset_counts(self) -> None:
        """Start the shared counts (``achieved``) afresh."""
        with _COUNTING:
            self.counts = Counts()

    def set_positions(self, pos: Tensor) -> None:
        """Called by the model before each forward with the token positions [T] of the batch."""
        self.rows = None if self.dense_before <= 0 else (pos >= self.dense_before)

    def achieved(self) -> dict:
        """Measured sparsity per (layer, kind): zeros / entries over the sparsified positions since
        ``reset_counts``, in every thread (read on the host here)."""
        with _COUNTING:
            return self.counts.achieved()

    @contextmanager
    def counting(self):
        """Inside the block, what this thread computes is counted in a ``Counts`` of its own (yielded) as well
        as in the shared counts: one call's measurement, whatever other threads run meanwhile."""
        outer = getattr(self._local, "counts", None)
        self._local.counts = mine = Counts()
        try:
            yield mine
        finally:
            self._local.counts = outer

    # ---- computing projections ---------------------------------------------------------------------

    def project(self, layer: int, kinds: tuple[str, ...], x: Tensor, linear: nn.Linear,
                sizes: tuple[int, ...] | None = None) -> Tensor:
        """The outputs of the projections ``kinds`` that share input x and one fused ``linear`` (their
        weights stacked in the order of ``kinds``, ``sizes`` rows each), concatenated: one matmul when all
        are dense, else each from its own sparsified copy of x."""
        sizes = tuple(sizes) if sizes is not None else (linear.out_features,)
        if self.observer is not None:
            self.observer(layer, kinds, x)
        found = [self.settings.get((layer, k)) for k in kinds]
        if not any(found):
            return linear(x)
        ws = linear.weight.split(sizes, dim=0)
        bs = linear.bias.split(sizes) if linear.bias is not None else (None,) * len(kinds)
        outs = [self.project_one((layer, k), x, s, w, b) for k, s, w, b in zip(kinds, found, ws, bs)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _count(self, key: tuple[int, str], counted: Tensor) -> None:
        zeros, n = (counted == 0).sum(), counted.numel()
        mine = getattr(self._local, "counts", None)
        if mine is not None:
            mine.add(key, zeros, n)
        with _COUNTING:
            self.counts.add(key, zeros, n)

    def project_one(self, key: tuple[int, str], x: Tensor, s: ProjectionSparsity | None, w: Tensor,
                    b: Tensor | None) -> Tensor:
        """One projection (weight w [out, in], bias b) of x with setting s (None: dense), its zeros counted
        (not inside a torch.compile graph: a count is a host read)."""
        if s is None:
            return F.linear(x, w, b)
        xs = sparsify(x, s)
        if self.measure and not torch.compiler.is_compiling():
            self._count(key, xs if self.rows is None else xs[..., self.rows, :])
        if self.rows is None:
            return sparse_linear(x, xs, w, b, s)
        # prefill policy: early positions stay dense (original weights, no compensation)
        if not s.compensated:
            return F.linear(torch.where(self.rows[:, None], xs, x), w, b)
        return torch.where(self.rows[:, None], sparse_linear(x, xs, w, b, s), F.linear(x, w, b))
