"""Calibration: thresholds so that each projection's target sparsity holds on real text, in the sparse run.

Statistics: a fine log-histogram of |x| per shared projection input (2^16 bins over ln|x| in
[-28, 10], i.e. relative bin width 0.06%), streamed batch by batch: memory is fixed whatever the number
of tokens, and the quantile error is at most one bin's mass (far below the 1% tolerance; measured, see
``achieved``). Exact quantiles would need every activation of a layer or a capped sample; the histogram
needs neither and resolves the threshold finer than its drift from one text to another.

Order: layer by layer, and inside a layer input by input (q/k/v, o, gate/up, down), with every earlier
threshold already switched on. Sparsifying earlier projections shrinks and reshapes later inputs, so
thresholds taken from dense activations overshoot deep in the model; taken in this order each threshold
sees exactly the inputs of the sparse run, and the achieved sparsity matches its target by construction.
Memory: the residual stream of the calibration tokens at one layer ([tokens, hidden] floats), not every
activation. All positions are sparsified, as in the perplexity runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm import tqdm

from .runtime.sparsify import Sparsifier

GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # projections sharing one input, in order
BINS, LO, HI = 1 << 16, -28.0, 10.0  # ln|x| range of the histogram (|x| from 7e-13 to 2.2e4)


class LogHistogram:
    """Streaming histogram of ln|x| (fixed bins): counts, and thresholds at given quantiles."""

    def __init__(self):
        self.counts = torch.zeros(BINS, dtype=torch.float64)
        self.n = 0

    def add(self, x: Tensor) -> None:
        logs = x.detach().abs().float().clamp_(math.exp(LO), math.exp(HI) * 0.999).log_()
        self.counts += torch.histc(logs, bins=BINS, min=LO, max=HI).double()
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
    """Raised by the observer once the input of interest is recorded: the rest of the block is skipped."""


@torch.no_grad()
def calibrate(model, wins: Tensor, targets: dict, batch_size: int = 8, progress: bool = True) -> dict:
    """Thresholds for ``targets`` {(layer, kind): sparsity} on windows [n, ctx], layer by layer.

    Returns {(layer, kind): {"threshold": t, "achieved": measured sparsity in the sparse run}}.
    """
    sp = Sparsifier("threshold")
    model.sparsifier = sp
    L = model.args.n_layer
    hs = [model.tok_embeddings(wins[i : i + batch_size]) for i in range(0, len(wins), batch_size)]
    results = {}
    bar = tqdm(total=L * len(GROUPS), desc="calibrate", unit="input", disable=not progress)
    for layer in range(L):
        block = range(layer, layer + 1)
        for kinds in GROUPS:
            if all(targets.get((layer, k)) is None for k in kinds):
                bar.update()
                continue
            hist = LogHistogram()

            def observe(l, ks, x, layer=layer, kinds=kinds, hist=hist):
                if l == layer and ks == kinds:
                    hist.add(x)
                    raise _Seen

            sp.observer = observe
            for h in hs:
                try:
                    model.hidden(None, layers=block, h=h)
                except _Seen:
                    pass
            sp.observer = None
            for k in kinds:
                if targets.get((layer, k)) is not None:
                    sp.thresholds[(layer, k)] = hist.threshold(targets[(layer, k)])
            bar.update()
        sp.reset_counts()
        hs = [model.hidden(None, layers=block, h=h) for h in hs]  # the sparse run of this layer, counted
        done = sp.achieved()
        bar.set_postfix(max_dev=f"{max(abs(done[k] - targets[k]) for k in done):.4f}")
        results.update({key: {"threshold": sp.thresholds[key], "achieved": a} for key, a in done.items()})
    bar.close()
    model.sparsifier = Sparsifier.dense()
    return results


def calibrate_plan(model_path, plan_path, text, tokens: int = 65536, ctx: int = 512, batch_size: int = 8,
                   progress: bool = True) -> tuple[dict, dict]:
    """The plan at ``plan_path`` with thresholds calibrated on ``text``; and a summary of the run.

    Each entry's ``calibration`` records the sparsity achieved in the sparse run on the calibration text
    and the number of tokens; the plan's ``calibration`` records the settings and the largest deviation.
    """
    from datetime import datetime, timezone

    from . import plan as plan_io
    from .runtime import open_model
    from .runtime.perplexity import load_tokenizer, text_tokens, windows

    ckpt, model = open_model(model_path)
    plan = plan_io.load_plan(plan_path, expect_fingerprint=ckpt.fingerprint)
    tok = load_tokenizer(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent)
    wins = windows(text_tokens(tok, text, tokens), ctx, model.args.max_seq_len, text)
    targets = {(e["layer"], e["kind"]): e["sparsity"] for e in plan["projections"]}
    found = calibrate(model, wins, targets, batch_size, progress)
    n = int(wins.numel())
    thresholds = {f"layers.{l}.{k}": r["threshold"] for (l, k), r in found.items()}
    stats = {f"layers.{l}.{k}": {"achieved_sparsity": r["achieved"], "n_tokens": n} for (l, k), r in found.items()}
    devs = [abs(r["achieved"] - targets[key]) for key, r in found.items()]
    run = {"text": str(text), "n_tokens": n, "ctx": ctx, "windows": len(wins), "positions": "all",
           "statistic": f"log-histogram, {BINS} bins over ln|x| in [{LO}, {HI}]",
           "order": "layer by layer, upstream thresholds on", "max_abs_deviation": max(devs),
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return plan_io.with_thresholds(plan, thresholds, stats, run), run
