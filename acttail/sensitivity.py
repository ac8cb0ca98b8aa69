"""Per-projection sensitivity: how much the loss on calibration text rises when one projection alone is
sparsified (top-k at a given level, every other projection dense).

This is what decides whether a projection can take more sparsity than the budget; the study compares it
with alpha to see whether (and in which direction) the alpha map points the right way. Measured on the
calibration text (c4), never on the evaluation text.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .allocate import metric_values, normalise, register_method

from .runtime.perplexity import perplexity
from .runtime.sparsify import Sparsifier


@torch.no_grad()
def sensitivity(model, wins: torch.Tensor, keys: list[tuple[int, str]], levels=(0.5, 0.8), batch_size: int = 8,
                progress: bool = True) -> dict:
    """{"dense_nll": nll, "dnll": {(layer, kind): {level: nll(sparse p) - dense_nll}}} on windows ``wins``."""
    model.sparsifier = Sparsifier.dense()
    base = perplexity(model, wins, batch_size, progress=False)["nll"]
    out = {}
    bar = tqdm(total=len(keys) * len(levels), desc="sensitivity", disable=not progress)
    for key in keys:
        out[key] = {}
        for level in levels:
            model.sparsifier = Sparsifier("topk", sparsities={key: level}, measure=False)
            out[key][level] = perplexity(model, wins, batch_size, progress=False)["nll"] - base
            bar.update()
    bar.close()
    model.sparsifier = Sparsifier.dense()
    return {"dense_nll": base, "dnll": out}


# ---- allocation from alpha and sensitivity ---------------------------------------------------------

def with_sensitivity(analysis: dict, sens: dict, level: str = "dnll_80") -> dict:
    """A copy of an analysis whose rows carry ``sensitivity``: loss increase per parameter zeroed when the
    projection alone is sparsified at the level (from ``sensitivity.json``), floored at a small positive
    value (a projection whose loss change is within noise of zero is nearly free to sparsify)."""
    import copy

    by_key = {p["key"]: p for p in sens["projections"]}
    out = copy.deepcopy(analysis)
    per_param = {k: p[level] / (float(level.split("_")[1]) / 100 * _params(out, k)) for k, p in by_key.items()}
    positive = sorted(v for v in per_param.values() if v > 0)
    floor = positive[len(positive) // 2] * 1e-2 if positive else 1e-12
    for row in out["projections"]:
        row["sensitivity"] = max(per_param[row["key"]], floor)
    return out


def _params(analysis: dict, key: str) -> int:
    return next(r["params"] for r in analysis["projections"] if r["key"] == key)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return 0.0
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    c = np.corrcoef(ra, rb)[0, 1]
    return 0.0 if not np.isfinite(c) else float(c)


@register_method("acttail-sens")
def acttail_sens_ratios(rows, *, scope="per-kind", metric="alpha", epsilon=0.3, direction="increasing",
                        gamma=0.5, **_) -> np.ndarray:
    """Alpha map inside each projection kind, its direction and strength set by sensitivity; kind levels
    from sensitivity.

    Within kind k: t = alpha normalised in [0, 1]; rho_k = Spearman(alpha, sensitivity) over the kind's
    projections; ratio = (1 - eps |rho_k|) + 2 eps |rho_k| t', where t' = 1 - t if rho_k > 0 (sensitivity
    grows with alpha: give high alpha less sparsity) else t. Across kinds: ratio x (S_k / S)^-gamma, with
    S_k the geometric mean per-parameter sensitivity of the kind and S that of all projections. The
    ``direction`` option flips t' (ablation).
    """
    alpha = metric_values(rows, metric, "per-kind")
    sens = np.array([float(r["sensitivity"]) for r in rows])
    kinds = np.array([r["kind"] for r in rows])
    log_all = np.log(sens).mean()
    out = np.empty(len(rows))
    for k in dict.fromkeys(kinds):
        idx = np.flatnonzero(kinds == k)
        rho = _spearman(alpha[idx], sens[idx])
        t = normalise(alpha[idx], [0] * len(idx))
        if (rho > 0) != (direction == "decreasing"):
            t = 1.0 - t
        e = epsilon * abs(rho)
        level = np.exp(np.log(sens[idx]).mean() - log_all) ** -gamma
        out[idx] = level * ((1.0 - e) + 2.0 * e * t)
    return out


@register_method("sensitivity")
def sensitivity_ratios(rows, *, gamma=0.5, **_) -> np.ndarray:
    """Ablation without alpha: ratio = (sensitivity / geometric mean)^-gamma per projection."""
    sens = np.array([float(r["sensitivity"]) for r in rows])
    return np.exp(np.log(sens) - np.log(sens).mean()) ** -gamma
