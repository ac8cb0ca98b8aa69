"""Calibration: thresholds so that each projection's target sparsity holds on real text, in the sparse run.

Statistics: a fine log-histogram of |x| per shared projection input (2^16 bins over ln|x| in
[-28, 10], i.e. relative bin width 0.06%), streamed batch by batch: memory is fixed whatever the number
of tokens, and the quantile error is at most one bin's mass (far below the 1% tolerance; measured, see
``achieved``). Exact quantiles would need every activation of a layer or a capped sample; the histogram
needs neither and resolves the threshold finer than its drift from one text to another.

Order: layer by layer, and inside a layer input by input (q/k/v, o, gate/up, down), with every earlier
threshold already switched on (each block runs once; its intermediate activations wait between groups). Sparsifying earlier projections shrinks and reshapes later inputs, so
thresholds taken from dense activations overshoot deep in the model; taken in this order each threshold
sees exactly the inputs of the sparse run, and the achieved sparsity matches its target by construction.
Memory: the residual stream and the intermediate activations of one layer for the calibration tokens
([tokens, hidden + intermediate] floats), not every activation of the model. All positions are sparsified, as in the perplexity runs.
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


@torch.no_grad()
def calibrate(model, wins: Tensor, targets: dict, batch_size: int = 8, progress: bool = True) -> dict:
    """Thresholds for ``targets`` {(layer, kind): sparsity} on windows [n, ctx], layer by layer.

    Returns {(layer, kind): {"threshold": t, "achieved": measured sparsity in the sparse run}}. Each block
    runs once, input group by input group; the intermediate activations of one layer are kept between
    groups (a projection absent from ``targets`` stays dense).
    """
    sp = Sparsifier("threshold")
    model.sparsifier = sp
    dev = model.output.weight.device
    T = wins.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    hs = [model.tok_embeddings(wins[i : i + batch_size].to(dev)) for i in range(0, len(wins), batch_size)]
    results = {}

    def fit(layer, kinds, hist):
        for k in kinds:
            if targets.get((layer, k)) is not None:
                sp.thresholds[(layer, k)] = hist.threshold(targets[(layer, k)])

    def observed(layer, kinds, xs):
        hist = LogHistogram()
        for x in xs:
            hist.add(x)
        fit(layer, kinds, hist)

    bar = tqdm(total=model.args.n_layer, desc="calibrate", unit="layer", disable=not progress)
    for layer, blk in enumerate(model.layers):
        att, ffn = blk.attention, blk.feed_forward
        observed(layer, ("q", "k", "v"), (blk.attention_norm(h) for h in hs))
        ys = [att.core(blk.attention_norm(h), cos, sin, None, sp) for h in hs]
        observed(layer, ("o",), ys)
        hs = [h + att.wo(sp.one(layer, "o", y)) for h, y in zip(hs, ys)]
        del ys
        observed(layer, ("gate", "up"), (blk.ffn_norm(h) for h in hs))
        acts = [ffn.gate_up(blk.ffn_norm(h), sp) for h in hs]
        observed(layer, ("down",), acts)
        hs = [h + ffn.w2(sp.one(layer, "down", a)) for h, a in zip(hs, acts)]
        del acts
        done = {key: a for key, a in sp.achieved().items() if key[0] == layer}
        results.update({key: {"threshold": sp.thresholds[key], "achieved": a} for key, a in done.items()})
        if done:
            bar.set_postfix(max_dev=f"{max(abs(done[k] - targets[k]) for k in done):.4f}")
        bar.update()
    bar.close()
    model.sparsifier = Sparsifier.dense()
    return results


def calibrate_plan(model_path, plan_path, text, tokens: int = 65536, ctx: int = 512, batch_size: int = 8,
                   progress: bool = True, device: str = "cpu") -> tuple[dict, dict]:
    """The plan at ``plan_path`` with thresholds calibrated on ``text``; and a summary of the run.

    Each entry's ``calibration`` records the sparsity achieved in the sparse run on the calibration text
    and the number of tokens; the plan's ``calibration`` records the settings and the largest deviation.
    """
    from datetime import datetime, timezone

    from . import plan as plan_io
    from .runtime import open_model
    from .runtime.perplexity import load_tokenizer, text_tokens, windows

    ckpt, model = open_model(model_path, device=device)
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
