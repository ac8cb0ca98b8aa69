"""ESD analyzer: eigenvalues, the three fits, agreement with weightwatcher and powerlaw."""

import logging

import numpy as np
import pytest
import torch

from acttail import esd
from acttail.checkpoint import Checkpoint


def pareto(alpha: float, n: int, xmin: float = 1.0, seed: int = 0) -> np.ndarray:
    """n samples of p(x) ~ x^-alpha for x >= xmin (inverse-CDF sampling)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


def naive_ks(x):
    """The plain O(N^2) loop the vectorised fit replaces (as in WeightWatcher's WWFit)."""
    logs = np.log(x)
    best = (np.inf, None, None)
    for i in range(len(x) - 1):
        n = len(x) - i
        a = 1 + n / (logs[i:].sum() - n * logs[i])
        d = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - a) - np.arange(n) / n)) if a > 1 else 1.0
        if d < best[0]:
            best = (d, a, x[i])
    return best


@pytest.mark.parametrize("shape", [(40, 100), (100, 40)])
def test_eigenvalues_match_svd(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ev = esd.eigenvalues(w, dtype=torch.float64)
    sv = torch.linalg.svdvals(w.double()).numpy() ** 2
    assert ev.shape == (40,) and np.all(np.diff(ev) >= 0)
    np.testing.assert_allclose(ev, np.sort(sv), rtol=1e-9, atol=1e-9)
    ev32 = esd.eigenvalues(w)
    np.testing.assert_allclose(ev32[-5:], np.sort(sv)[-5:], rtol=1e-4)


@pytest.mark.parametrize("alpha", [2.2, 3.0, 4.5])
@pytest.mark.parametrize("fit", esd.FITS)
def test_fits_recover_known_exponent(alpha, fit):
    x = pareto(alpha, 4000, xmin=0.5, seed=int(alpha * 10))
    pl = esd.fit_powerlaw(x, fit)
    assert abs(pl.alpha - alpha) < 0.2, (fit, pl)
    assert pl.sigma == pytest.approx((pl.alpha - 1) / np.sqrt(pl.n_tail))


def test_ks_tail_found_above_bulk():
    """A power-law tail above a uniform bulk: the KS fit puts xmin near the start of the tail."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(0.01, 1.0, 3000), pareto(2.5, 600, xmin=1.0, seed=2)])
    pl = esd.fit_powerlaw(x, "ks")
    assert 0.8 < pl.xmin < 1.6 and abs(pl.alpha - 2.5) < 0.3


def test_vectorised_ks_equals_loop():
    x = np.sort(pareto(3.0, 700, seed=5) + np.random.default_rng(5).random(700))
    d, a, xmin = naive_ks(x)
    pl = esd.fit_ks(x)
    assert pl.alpha == pytest.approx(a, rel=1e-10) and pl.xmin == xmin and pl.ks_distance == pytest.approx(d)


def test_floor_dropped_and_warnings():
    row = esd.analyze_matrix(torch.randn(64, 5) @ torch.randn(5, 64))  # rank 5
    assert row["alpha"] is None and "too few eigenvalues" in row["warnings"][0]
    w = torch.randn(32, 32)
    w[3, 3] = float("nan")
    row = esd.analyze_matrix(w)
    assert row["alpha"] is None and "NaN" in row["warnings"][0]


def test_metrics_definitions():
    w = torch.randn(50, 80, dtype=torch.float64)
    row = esd.analyze_matrix(w, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    assert row["spectral_norm"] == pytest.approx(s[0].item(), rel=1e-9)
    assert row["lambda_max"] == pytest.approx(s[0].item() ** 2, rel=1e-9)
    assert row["stable_rank"] == pytest.approx((s ** 2).sum().item() / s[0].item() ** 2, rel=1e-9)
    assert row["log_norm"] == pytest.approx(np.log10((w ** 2).sum().item()), rel=1e-9)
    assert row["alpha_weighted"] == pytest.approx(row["alpha"] * np.log10(row["lambda_max"]))


def test_agrees_with_powerlaw_package():
    powerlaw = pytest.importorskip("powerlaw")
    x = np.sort(pareto(2.8, 800, seed=9) * np.random.default_rng(9).uniform(0.9, 1.1, 800))
    ours = esd.fit_powerlaw(x, "ks")
    ref = powerlaw.Fit(x, xmax=float(x.max()), verbose=False).power_law
    assert ours.xmin == pytest.approx(ref.xmin) and ours.alpha == pytest.approx(ref.alpha, abs=1e-6)


def test_agrees_with_weightwatcher_on_smollm2(smollm2):
    """On real matrices our ks alpha equals weightwatcher 0.7.7's default analyze() alpha."""
    pytest.importorskip("weightwatcher")
    from acttail.reference import weightwatcher_fit

    logging.disable(logging.WARNING)
    try:
        ckpt = Checkpoint.open(smollm2)
        projs = [p for p in ckpt.projections() if p.layer in (0, 17)]
        diffs = []
        for p in projs:
            w = ckpt.load(p)
            ours = esd.analyze_matrix(w)["alpha"]
            diffs.append(abs(ours - weightwatcher_fit(w)["alpha"]))
    finally:
        logging.disable(logging.NOTSET)  # for the rest of the session (other tests read logs)
    assert np.median(diffs) < 1e-3 and max(diffs) < 0.02, diffs
