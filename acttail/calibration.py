"""Calibration: thresholds so that each projection's target sparsity holds on real text, in the sparse run.

Statistics: a fine log-histogram of |x| per shared projection input (2^16 bins over ln|x| in
[-28, 10], i.e. relative bin width 0.06%), streamed batch by batch: memory is fixed whatever the number
of tokens, and the quantile error is at most one bin's mass (far below the 1% tolerance; measured, see
``achieved``). Exact quantiles would need every activation of a layer or a capped sample; the histogram
needs neither and resolves the threshold finer than its drift from one text to another.

Order: layer by layer, and inside a layer group by group (q/k/v, o, gate/up, down: ``layout.GROUPS``),
with every earlier threshold already switched on. Sparsifying earlier projections shrinks and reshapes
later inputs, so thresholds taken from dense activations overshoot deep in the model; taken in this order
each threshold sees exactly the inputs of the sparse run, and the achieved sparsity matches its target by
construction. The calibration has no decoder of its own: it runs the model's blocks and watches each
group's input through the ``Sparsifier``'s observer. With all windows in one batch (the default) each
block runs once, each group fitted the moment its input is seen; with smaller batches (less memory)
each group needs its own pass over the batches, stopped right after that group's input.
Memory: the residual stream for the calibration tokens plus one block's activations for one batch.
All positions are sparsified, as in the perplexity runs.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import torch
from torch import Tensor
from tqdm import tqdm

from .layout import GROUPS
from .runtime.sparsify import ProjectionSparsity, Sparsifier

BINS, LO, HI = 1 << 16, -28.0, 10.0  # ln|x| range of the histogram (|x| from 7e-13 to 2.2e4)


class LogHistogram:
    """Streaming histogram of ln|x| (fixed bins): counts, and thresholds at given quantiles."""

    def __init__(self):
        self.counts = torch.zeros(BINS, dtype=torch.float64)
        self.n = 0

    def add(self, x: Tensor) -> None:
        logs = x.detach().abs().float().clamp_(math.exp(LO), math.exp(HI) * 0.999).log_()
        self.counts += torch.histc(logs, bins=BINS, min=LO, max=HI).double().cpu()
        self.n += x.numel()

    def threshold(self, sparsity: float) -> float:
        """t with fraction(|x| <= t) ~= sparsity (linear in ln|x| inside the bin that crosses it)."""
        if sparsity <= 0.0:
            return 0.0
        target = sparsity * self.n
        cum = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).clamp(max=BINS - 1))
        below = float(cum[i - 1]) if i > 0 else 0.0
        frac = (target - below) / max(float(self.counts[i]), 1.0)
        width = (HI - LO) / BINS
        return math.exp(LO + (i + min(max(frac, 0.0), 1.0)) * width)


class _Seen(Exception):
    """Stops a block's forward pass once the observed group's input has been recorded."""


@torch.no_grad()
def fit_thresholds(model, wins: Tensor, targets: dict, batch_size: int | None = None,
                   progress: bool = True) -> dict:
    """Thresholds for ``targets`` {(layer, kind): sparsity} on windows [n, ctx], layer by layer.

    Returns {(layer, kind): {"threshold": t, "achieved": measured sparsity in the sparse run}}. A
    projection absent from ``targets`` stays dense. ``batch_size``: windows per forward pass (None: all).
    """
    sp = Sparsifier()
    model.sparsifier = sp
    dev = model.output.weight.device
    step = batch_size or len(wins)
    hs = [model.embed(wins[i: i + step].to(dev)) for i in range(0, len(wins), step)]
    results = {}
    bar = tqdm(total=model.args.n_layer, desc="calibrate", unit="layer", disable=not progress)
    try:
        for layer in range(model.args.n_layer):
            run = lambda h: model.hidden(None, layers=range(layer, layer + 1), h=h)  # noqa: E731
            hs = _calibrate_block(run, layer, hs, sp, targets)
            done = {key: a for key, a in sp.achieved().items() if key[0] == layer}
            results.update({key: {"threshold": sp.settings[key].threshold, "achieved": a} for key, a in done.items()})
            if done:
                bar.set_postfix(max_dev=f"{max(abs(done[k] - targets[k]) for k in done):.4f}")
            bar.update()
    finally:
        bar.close()
        model.sparsifier = Sparsifier.dense()
    return results


def _calibrate_block(run, layer: int, hs: list[Tensor], sp: Sparsifier, targets: dict) -> list[Tensor]:
    """Fit the thresholds of one block's groups in order; returns the block's outputs in the sparse run."""

    def fit(kinds, hist):
        for k in kinds:
            if targets.get((layer, k)) is not None:
                sp.settings[(layer, k)] = ProjectionSparsity(threshold=hist.threshold(targets[(layer, k)]))

    if len(hs) == 1:  # one batch: each group is fitted when its input is seen, the block runs once
        def observe_and_fit(lay, kinds, x):
            if lay == layer:
                hist = LogHistogram()
                hist.add(x)
                fit(kinds, hist)

        sp.observer = observe_and_fit
    else:
        for kinds in GROUPS.values():
            hist = LogHistogram()

            def observe(lay, ks, x, kinds=kinds, hist=hist):
                if lay == layer and ks == kinds:
                    hist.add(x)
                    raise _Seen

            sp.observer = observe
            for h in hs:
                try:
                    run(h)
                except _Seen:
                    pass
            fit(kinds, hist)
        sp.observer = None
    try:
        return [run(h) for h in hs]
    finally:
        sp.observer = None


def calibrate(model, plan, wins: Tensor, batch_size: int | None = None, progress: bool = True,
              text: str = "tokens"):
    """The ``Plan`` with thresholds calibrated on windows [n, ctx] of token ids, run through ``model``
    (our decoder; ``acttail.calibrate`` accepts transformers models and text).

    Each entry's ``calibration`` records the sparsity achieved in the sparse run on the calibration text
    and the number of tokens; the plan's ``calibration`` records the settings and the largest deviation.
    """
    targets = plan.sparsities()
    found = fit_thresholds(model, wins, targets, batch_size, progress)
    n = int(wins.numel())
    thresholds = {f"layers.{l}.{k}": r["threshold"] for (l, k), r in found.items()}
    stats = {f"layers.{l}.{k}": {"achieved_sparsity": r["achieved"], "n_tokens": n} for (l, k), r in found.items()}
    devs = [abs(r["achieved"] - targets[key]) for key, r in found.items()]
    run = {"text": str(text), "n_tokens": n, "ctx": int(wins.shape[1]), "windows": len(wins), "positions": "all",
           "statistic": f"log-histogram, {BINS} bins over ln|x| in [{LO}, {HI}]",
           "order": "layer by layer, upstream thresholds on", "max_abs_deviation": max(devs),
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return plan.with_thresholds(thresholds, stats, run)
