"""Empirical spectral density (ESD) of a weight matrix and power-law fits of its tail (HT-SR theory).

The ESD is the set of eigenvalues of W^T W, i.e. the squared singular values of W as stored. Heavy-Tailed
Self-Regularization reads training quality from the tail exponent alpha of p(lambda) ~ lambda^-alpha for
lambda >= xmin: well-trained layers sit near 2-4, alpha > 6 suggests an under-trained matrix.

Eigenvalues come from the Gram matrix of the smaller side (W W^T or W^T W, then ``eigvalsh``): the same
non-zero spectrum as an SVD for a fraction of the time (see reports/esd-benchmark.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

EVAL_FLOOR = 1e-5  # eigenvalues at or below are dropped before fitting, as WeightWatcher does
MIN_EVALS = 10  # fewer eigenvalues above the floor than this: no fit, a warning
FITS = ("ks", "peak", "median")


def eigenvalues(w: torch.Tensor, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> np.ndarray:
    """Eigenvalues of W^T W (squared singular values of W), ascending, as float64 numpy.

    The Gram matrix of the smaller side is formed in ``dtype`` on ``device`` and diagonalised with
    ``torch.linalg.eigvalsh``. Values under the Gram matrix's round-off level, lambda_max * max(m, n) *
    eps(dtype) (numpy's rank tolerance), are numerically zero and set to zero, so a rank-deficient matrix
    grows no spurious eigenvalues above the fit floor. For an (m, n) matrix this returns min(m, n) values.
    """
    w = w.to(device=device, dtype=dtype)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    evals = torch.linalg.eigvalsh(gram)
    noise = evals[-1].clamp_min(0) * max(w.shape) * torch.finfo(dtype).eps
    return torch.where(evals > noise, evals, 0.0).double().cpu().numpy()


@dataclass
class PowerLawFit:
    """A continuous power-law fit of an eigenvalue tail: p(x) ~ x^-alpha for x >= xmin."""

    alpha: float
    xmin: float
    n_tail: int
    ks_distance: float
    sigma: float


def _mle_alphas(x: np.ndarray) -> np.ndarray:
    """alpha_i = 1 + n_i / sum_{j>=i} ln(x_j / x_i) for every candidate xmin = x_i (x ascending).

    One reverse cumulative sum gives all the sums of logs at once: O(N) for all candidates.
    """
    logs = np.log(x)
    n = np.arange(len(x), 0, -1, dtype=np.float64)
    tail_sums = np.cumsum(logs[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 + n / (tail_sums - n * logs)


def _ks_distances(x: np.ndarray, alphas: np.ndarray, idx: np.ndarray, device: str = "cpu") -> np.ndarray:
    """KS distance D_i = max_{j>=i} |F_emp(x_j) - (1 - (x_j/x_i)^(1-alpha_i))| for each candidate i in idx.

    The empirical CDF of the tail is (j - i) / n_i, as in WeightWatcher and powerlaw. Candidates are
    processed in chunks of rows on ``device``, each chunk only over the columns j >= its first candidate
    (the triangle the maximum needs): vectorised, about 16 MiB of float64 per chunk.
    """
    N = len(x)
    chunk = max(1, (1 << 21) // N)
    xt = torch.from_numpy(x).to(device)
    j = torch.arange(N, dtype=torch.float64, device=device)
    out = []
    for s in range(0, len(idx), chunk):
        sel = torch.from_numpy(idx[s:s + chunk]).to(device)
        a = torch.from_numpy(alphas[idx[s:s + chunk]]).to(device)
        i = sel.to(torch.float64)
        lo = int(idx[s:s + chunk].min())
        xs, js = xt[lo:], j[lo:]
        theory = 1 - (xs[None, :] / xt[sel][:, None]) ** (1 - a[:, None])
        emp = (js[None, :] - i[:, None]) / (N - i)[:, None]
        diff = (theory - emp).abs().masked_fill_(js[None, :] < i[:, None], 0)
        out.append(torch.where(a > 1, diff.max(dim=1).values, 1.0))
    return torch.cat(out).cpu().numpy()


def _fit_at(x: np.ndarray, alphas: np.ndarray, candidates: np.ndarray, device: str = "cpu") -> PowerLawFit:
    """The fit among ``candidates`` (indices into x) with the smallest KS distance."""
    ds = _ks_distances(x, alphas, candidates, device)
    best = int(np.argmin(ds))
    i = int(candidates[best])
    n_tail = len(x) - i
    alpha = float(alphas[i])
    return PowerLawFit(alpha, float(x[i]), n_tail, float(ds[best]), (alpha - 1) / math.sqrt(n_tail))


def fit_ks(x: np.ndarray, device: str = "cpu") -> PowerLawFit:
    """WeightWatcher-compatible fit (its default ``ww`` power law, ``xmax`` = largest eigenvalue).

    For every candidate xmin = x_i (all but the largest eigenvalue): alpha_i = 1 + n_i / sum ln(x/x_i)
    (continuous MLE over the n_i eigenvalues >= x_i), then xmin = the candidate with the smallest KS
    distance; sigma = (alpha - 1) / sqrt(n_tail).
    """
    return _fit_at(x, _mle_alphas(x), np.arange(len(x) - 1), device)


def fit_peak(x: np.ndarray, device: str = "cpu", bins: int = 100, width: float = 0.05) -> PowerLawFit:
    """AlphaPruning's alpha_peak (WeightWatcher's ``fix_fingers='xmin_peak'``).

    xmin is searched only among eigenvalues within +-5% of the peak of the histogram of log10(lambda)
    (100 bins); the same MLE and KS choice as ``fit_ks`` within that window. This keeps xmin away from the
    few largest eigenvalues ("fingers") where the plain KS search can land, giving alphas of 10-30.
    """
    counts, edges = np.histogram(np.log10(x), bins=bins)
    peak = 10 ** edges[int(np.argmax(counts))]
    cand = np.nonzero((x >= (1 - width) * peak) & (x <= (1 + width) * peak))[0]
    cand = cand[cand < len(x) - 1]
    if len(cand) == 0:
        cand = np.array([min(int(np.argmin(np.abs(x - peak))), len(x) - 2)])
    return _fit_at(x, _mle_alphas(x), cand, device)


def fit_median(x: np.ndarray, device: str = "cpu") -> PowerLawFit:
    """xmin = the median eigenvalue, no search: alpha = 1 + n / sum ln(x/xmin) over the upper half."""
    i = min(len(x) // 2, len(x) - 2)
    return _fit_at(x, _mle_alphas(x), np.array([i]), device)


FIT_FUNCTIONS = {"ks": fit_ks, "peak": fit_peak, "median": fit_median}


def fit_powerlaw(evals: np.ndarray, fit: str = "ks", device: str = "cpu") -> PowerLawFit:
    """Fit the tail of ``evals`` (any order; values <= EVAL_FLOOR are dropped) with method ``fit``; the KS
    distances are computed on ``device``."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > EVAL_FLOOR]
    if len(x) < MIN_EVALS:
        raise ValueError(f"only {len(x)} eigenvalues above {EVAL_FLOOR}")
    return FIT_FUNCTIONS[fit](x, device)


def spectral_metrics(evals: np.ndarray) -> dict:
    """Norm-based metrics of one ESD (all eigenvalues, floor not applied).

    lambda_max: largest eigenvalue of W^T W; spectral_norm: sqrt(lambda_max) = largest singular value;
    stable_rank: sum(lambda) / lambda_max = ||W||_F^2 / ||W||_2^2; log_norm: log10 ||W||_F^2 (WeightWatcher's
    ``log_norm``).
    """
    lam_max = float(np.max(evals))
    total = float(np.sum(evals))
    return {"lambda_max": lam_max, "spectral_norm": math.sqrt(lam_max),
            "stable_rank": total / lam_max if lam_max > 0 else None,
            "log_norm": math.log10(total) if total > 0 else None}


def analyze_matrix(w: torch.Tensor, fit: str = "ks", dtype: torch.dtype = torch.float32,
                   device: str = "cpu") -> dict:
    """ESD metrics and power-law fit of one matrix; problems become warnings and null metrics, not errors."""
    row = {"n_evals": min(w.shape), "alpha": None, "xmin": None, "n_tail": None, "ks_distance": None,
           "sigma": None, "lambda_max": None, "spectral_norm": None, "stable_rank": None,
           "alpha_weighted": None, "log_norm": None, "warnings": []}
    if not torch.isfinite(w).all():
        row["warnings"].append("weights contain NaN or Inf: no spectrum")
        return row
    evals = eigenvalues(w, dtype=dtype, device=device)
    row.update(spectral_metrics(evals))
    n_above = int((evals > EVAL_FLOOR).sum())
    if n_above < MIN_EVALS:
        row["warnings"].append(f"too few eigenvalues: {n_above} above {EVAL_FLOOR} (need {MIN_EVALS})")
        return row
    try:
        pl = fit_powerlaw(evals, fit, device)
    except (ValueError, FloatingPointError) as e:
        row["warnings"].append(f"fit failed: {e}")
        return row
    if not math.isfinite(pl.alpha):
        row["warnings"].append("fit failed: alpha is not finite")
        return row
    row.update(asdict(pl))
    row["alpha_weighted"] = pl.alpha * math.log10(row["lambda_max"])
    if pl.alpha < 2:
        row["warnings"].append(f"alpha {pl.alpha:.2f} < 2 (very heavy tail: possibly over-trained)")
    elif pl.alpha > 6:
        row["warnings"].append(f"alpha {pl.alpha:.2f} > 6 (light tail: under-trained, or a fit on few eigenvalues)")
    return row
