"""Calibration: thresholds so that each projection's target sparsity holds on real text, in the sparse run.

Statistics: a fine log-histogram of |x| per shared projection input (``histogram.LogHistogram``: 2^16 bins
over ln|x| in [-28, 10], i.e. relative bin width 0.06%), streamed batch by batch: memory is fixed whatever
the number of tokens, and the quantile error is at most one bin's mass (far below the 1% tolerance;
measured, see ``achieved``). Exact quantiles would need every activation of a layer or a capped sample; the histogram
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

from dataclasses import dataclass, replace
from datetime import datetime, timezone

import torch
from torch import Tensor
from tqdm import tqdm

from .compensation import COMPENSATIONS, SCORES, learn_biases, lowrank_factors, score_weights
from .config import CTX, Config
from .errors import ActTailError
from .histogram import BINS, HI, LO, LogHistogram
from .layout import GROUPS, key as key_of
from .plan import overhead, rotation_overheads
from .runtime.sparsify import ProjectionSparsity, Sparsifier, check_plan


@dataclass(frozen=True)
class CalibrationConfig(Config):
    """How a plan is calibrated; each field is an option of ``acttail calibrate``.

    tokens, ctx: the calibration text's first ``tokens`` tokens, in windows of ``ctx``. batch_size: windows
    per forward pass (None: all at once, each block runs once). score, compensation, rank: see
    ``acttail.compensation`` (learned output biases: the best of the study, reports/quality/); steps, lr:
    the training of learned biases (Adam, batches of ``compensation.BATCH`` windows).
    """

    tokens: int = 65536
    ctx: int = CTX
    batch_size: int | None = None
    score: str = "magnitude"
    compensation: str = "learned"
    rank: int = 32
    steps: int = 200
    lr: float = 1e-3
    stage = "calibration"


class _Seen(Exception):
    """Stops a block's forward pass once the observed group's input has been recorded."""


@torch.no_grad()
def fit_thresholds(model, wins: Tensor, targets: dict, batch_size: int | None = None,
                   progress: bool = True, base: dict | None = None) -> dict:
    """Thresholds for ``targets`` {(layer, kind): sparsity} on windows [n, ctx], layer by layer.

    Returns {(layer, kind): {"threshold": t, "achieved": measured sparsity in the sparse run}}. A
    projection absent from ``targets`` stays dense. ``batch_size``: windows per forward pass (None: all).
    ``base`` {(layer, kind): ProjectionSparsity} brings score weights (the threshold is then on |x| score)
    and compensation, in place while each later threshold is fitted.
    """
    sp = Sparsifier()
    base = dict(base or {})
    dev = model.output.weight.device
    step = batch_size or len(wins)
    hs = [model.embed(wins[i: i + step].to(dev)) for i in range(0, len(wins), step)]
    results = {}
    with tqdm(total=model.args.n_layer, desc="calibrate", unit="layer", disable=not progress) as bar, \
            model.sparsified(sp):
        for layer in range(model.args.n_layer):
            run = lambda h: model.hidden(None, layers=range(layer, layer + 1), h=h)  # noqa: E731
            hs = _calibrate_block(run, layer, hs, sp, targets, base)
            done = {key: a for key, a in sp.achieved().items() if key[0] == layer}
            results.update({key: {"threshold": sp.settings[key].threshold, "achieved": a} for key, a in done.items()})
            if done:
                bar.set_postfix(max_dev=f"{max(abs(done[k] - targets[k]) for k in done):.4f}")
            bar.update()
    return results


def _calibrate_block(run, layer: int, hs: list[Tensor], sp: Sparsifier, targets: dict, base: dict) -> list[Tensor]:
    """Fit the thresholds of one block's groups in order; returns the block's outputs in the sparse run."""

    def histograms(kinds):
        return {k: LogHistogram() for k in kinds}

    def add(hists, x):
        for k, hist in hists.items():
            s = base.get((layer, k))
            hist.add(x if s is None or s.score is None else x * s.score.to(x.device, x.dtype))

    def fit(hists):
        for k, hist in hists.items():
            if targets.get((layer, k)) is not None:
                t = hist.threshold(targets[(layer, k)])
                sp.settings[(layer, k)] = replace(base.get((layer, k), ProjectionSparsity()), threshold=t)

    if len(hs) == 1:  # one batch: each group is fitted when its input is seen, the block runs once
        def observe_and_fit(lay, kinds, x):
            if lay == layer:
                hists = histograms(kinds)
                add(hists, x)
                fit(hists)

        sp.observer = observe_and_fit
    else:
        for kinds in GROUPS.values():
            hists = histograms(kinds)

            def observe(lay, ks, x, kinds=kinds, hists=hists):
                if lay == layer and ks == kinds:
                    add(hists, x)
                    raise _Seen

            sp.observer = observe
            for h in hs:
                try:
                    run(h)
                except _Seen:
                    pass
            fit(hists)
        sp.observer = None
    try:
        return [run(h) for h in hs]
    finally:
        sp.observer = None


def calibrate(model, plan, wins: Tensor, config: CalibrationConfig | None = None, progress: bool = True,
              text: str = "tokens", **options):
    """The ``Plan`` with thresholds calibrated on windows [n, ctx] of token ids, run through ``model``
    (our decoder; ``acttail.calibrate`` accepts transformers models and text), with the score weights and
    the compensation of ``acttail.compensation`` fitted on the same windows. ``options`` change fields of
    ``config`` (``CalibrationConfig``: batch_size, score, compensation, rank, steps, lr; tokens and ctx are
    for whoever made ``wins``); ``text`` names the text in the plan.

    Budgets count bytes: a projection whose compensation reads extra values per token (``overhead``; in a
    rotated checkpoint, also its share of the layer's basis change) is calibrated to that much more sparsity, so
    it still saves its planned share. With ``learned`` biases the
    thresholds are fitted, the biases trained with them, then the thresholds fitted again with the biases on.
    Each entry's ``calibration`` records the sparsity achieved in the sparse run on the calibration text
    and the number of tokens; the plan's ``calibration`` records the settings and the largest deviation.
    A plan allocated with ``rank_split`` carries one rank per projection: those ranks replace ``rank``.
    """
    cfg = (config or CalibrationConfig()).updated(**options)
    check_plan(plan, model.args)
    score, compensation, rank = cfg.score, cfg.compensation, cfg.rank
    if score not in SCORES or compensation not in COMPENSATIONS:
        raise ActTailError(f"score must be one of {', '.join(SCORES)} and compensation one of "
                           f"{', '.join(COMPENSATIONS)}, got {score!r} and {compensation!r}")
    if getattr(model, "stream", None) is not None and (score != "magnitude" or compensation != "none"):
        raise ActTailError("a streamed model (one block in memory at a time) calibrates thresholds only: "
                           "--score magnitude --compensation none (score weights and compensation need every block)")
    entries = {(e.layer, e.kind): e for e in plan.projections}
    split = {key: e.rank for key, e in entries.items()} if any(e.rank for e in entries.values()) else None
    if split is not None and compensation != "lowrank":
        raise ActTailError("the plan splits bytes between sparsity and rank (allocated with --rank-split): "
                           "calibrate it with --compensation lowrank")
    ranks = split or {key: rank for key in entries}
    turns = rotation_overheads([e.to_dict() for e in plan.projections], plan.model.get("rotation"))  # basis changes
    costs = {key: overhead((e.in_features, e.out_features), compensation, ranks[key]) + turns.get(key, 0.0)
             for key, e in entries.items()}
    targets = {key: min(0.99, e.sparsity + costs[key]) for key, e in entries.items()}
    scores = score_weights(model, score, wins)
    factors = lowrank_factors(model, ranks) if compensation == "lowrank" else {}
    base = {key: ProjectionSparsity(score=scores.get(key), lowrank=factors.get(key)) for key in entries}
    found = fit_thresholds(model, wins, targets, cfg.batch_size, progress, base)
    learned = None
    if compensation == "learned":
        fitted = {key: replace(base[key], threshold=r["threshold"]) for key, r in found.items()}
        biases, learned = learn_biases(model, fitted, wins, cfg.steps, cfg.lr, progress=progress)
        base = {key: replace(base[key], bias=biases.get(key)) for key in entries}
        found = fit_thresholds(model, wins, targets, cfg.batch_size, progress, base)
    return _calibrated_plan(plan, found, targets, costs, base, wins, text, score, compensation, rank, learned)


def _calibrated_plan(plan, found, targets, costs, base, wins, text, score, compensation, rank, learned):
    """The plan with thresholds, statistics, overheads and tensors of a calibration run."""
    n = int(wins.numel())
    thresholds = {key_of(*k): r["threshold"] for k, r in found.items()}
    stats = {key_of(*k): {"achieved_sparsity": r["achieved"], "n_tokens": n} for k, r in found.items()}
    devs = [abs(r["achieved"] - targets[k]) for k, r in found.items()]
    run = {"text": str(text), "n_tokens": n, "ctx": int(wins.shape[1]), "windows": len(wins), "positions": "all",
           "statistic": f"log-histogram, {BINS} bins over ln|x| in [{LO}, {HI}]",
           "order": "layer by layer, upstream thresholds on", "max_abs_deviation": max(devs),
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if learned is not None:
        run["learned"] = learned
    paid = [replace(e, overhead=costs[e.layer, e.kind], sparsity=targets[e.layer, e.kind],
                    rank=base[e.layer, e.kind].lowrank[0].shape[1] if base[e.layer, e.kind].lowrank is not None else 0)
            for e in plan.projections]
    paid_plan = replace(plan, projections=paid, score=score, compensation=compensation)
    out = paid_plan.with_thresholds(thresholds, stats, run)
    tensors = {}
    for e in out.projections:
        s = base[(e.layer, e.kind)]
        for name, t in (("score", s.score), ("bias", s.bias)) + (
                (("lowrank_u", s.lowrank[0]), ("lowrank_v", s.lowrank[1])) if s.lowrank is not None else ()):
            if t is not None:
                tensors[f"{e.key}.{name}"] = t.detach().float().cpu()
    out.tensors = tensors
    out.check_tensors()
    out.to_dict()
    return out
