"""Reference backends: the same per-matrix row computed by weightwatcher 0.7.7 or powerlaw 1.5.

For users who want the established tools' numbers, and for our cross-check tests. Both are optional
(``pip install acttail[reference]``). powerlaw 2.x bounds alpha below 3 unless given a range, and
weightwatcher 0.7.7's ``fix_fingers='xmin_peak'`` breaks with powerlaw 2.0, hence the pins.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .errors import ActTailError
from .esd import EVAL_FLOOR, MIN_EVALS, eigenvalues, spectral_metrics


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ActTailError(f"backend {module} is not installed: pip install 'acttail[reference]'") from None


def weightwatcher_fit(w: torch.Tensor, fit: str = "ks") -> dict:
    """alpha, xmin, n_tail, ks_distance, sigma from weightwatcher's default ``analyze()`` of one matrix."""
    ww = _need("weightwatcher")
    if fit == "median":
        raise ActTailError("weightwatcher has no median fit; use --fit ks or peak with this backend")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.detach().float().cpu().clone()
    kwargs = {"fix_fingers": "xmin_peak"} if fit == "peak" else {}
    df = ww.WeightWatcher(model=torch.nn.Sequential(lin)).analyze(**kwargs)
    r = df.iloc[0]
    return {"alpha": float(r.alpha), "xmin": float(r.xmin), "n_tail": int(r.num_pl_spikes),
            "ks_distance": float(r.D), "sigma": float(r.sigma)}


def powerlaw_fit(evals: np.ndarray, fit: str = "ks") -> dict:
    """The same fit through the powerlaw package (continuous power law, xmax = the largest eigenvalue)."""
    powerlaw = _need("powerlaw")
    x = np.sort(evals[evals > EVAL_FLOOR])
    if fit == "median":
        xmin = float(np.median(x))
    elif fit == "peak":
        counts, edges = np.histogram(np.log10(x), bins=100)
        peak = 10 ** edges[int(np.argmax(counts))]
        xmin = (0.95 * peak, 1.05 * peak)
    else:
        xmin = None
    f = powerlaw.Fit(x, xmin=xmin, xmax=float(x[-1]), verbose=False)
    pl = f.power_law
    n_tail = int((x >= pl.xmin).sum())
    return {"alpha": float(pl.alpha), "xmin": float(pl.xmin), "n_tail": n_tail, "ks_distance": float(pl.D),
            "sigma": float(pl.sigma)}


def analyze_matrix(w: torch.Tensor, backend: str, fit: str = "ks") -> dict:
    """The analysis row of one matrix, fitted by ``backend`` (norm metrics always from our eigenvalues)."""
    evals = eigenvalues(w, dtype=torch.float64)
    row = {"n_evals": len(evals), **spectral_metrics(evals), "warnings": []}
    if int((evals > EVAL_FLOOR).sum()) < MIN_EVALS:
        row.update(alpha=None, xmin=None, n_tail=None, ks_distance=None, sigma=None, alpha_weighted=None)
        row["warnings"].append(f"too few eigenvalues above {EVAL_FLOOR}")
        return row
    row.update(weightwatcher_fit(w, fit) if backend == "weightwatcher" else powerlaw_fit(evals, fit))
    row["alpha_weighted"] = row["alpha"] * math.log10(row["lambda_max"])
    return row
