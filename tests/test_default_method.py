"""The `acttail` method (the alpha map): direction measured from a sensitivity column when present, else
assumed. (The default method is greedy: tests/test_greedy.py.)"""

import numpy as np
import pytest

from acttail import allocation


def allocate(rows, budget, **kw):
    return allocation.sparsities(rows, budget, **{"method": "acttail", **kw})
from acttail.errors import ActTailError
from stage2_synthetic import rows


def with_sensitivity(rs, sign: float):
    """Rows whose sensitivity rises (sign > 0) or falls (sign < 0) with alpha."""
    return [{**r, "sensitivity": float(np.exp(sign * r["alpha"]))} for r in rs]


def test_without_sensitivity_equals_assumed_alpha_map():
    rs = rows(num_layers=6, seed=1)
    assert allocate(rs, 0.5) == allocate(rs, 0.5, method="alpha-map")
    with pytest.raises(ActTailError, match="sensitivity"):
        allocate(rs, 0.5, method="acttail-sens")


@pytest.mark.parametrize("sign,expected", [(1.0, "decreasing"), (-1.0, "increasing")])
def test_with_sensitivity_direction_is_measured(sign, expected):
    rs = with_sensitivity(rows(num_layers=6, seed=2), sign)
    got = allocate(rs, 0.5)
    assert got == allocate(rs, 0.5, method="acttail-sens")
    assert got == allocate(rs, 0.5, method="alpha-map", direction=expected)
    alphas = np.array([r["alpha"] for r in rs])
    corr = np.corrcoef(alphas, got)[0, 1]
    assert (corr < 0) if expected == "decreasing" else (corr > 0)


def test_sensitivity_unrelated_to_alpha_gives_uniform():
    rs = rows(num_layers=6, seed=3)
    rng = np.random.default_rng(0)
    rs = [{**r, "sensitivity": float(s)} for r, s in zip(rs, rng.permutation(len(rs)) + 1.0)]
    rho_bound = 2 / np.sqrt(len(rs))
    from acttail.allocation import spearman

    alphas = np.array([r["alpha"] for r in rs])
    assert abs(spearman(alphas, np.array([r["sensitivity"] for r in rs]))) <= rho_bound  # chance level
    assert np.allclose(allocate(rs, 0.5), 0.5)


def test_plan_records_the_measured_direction():
    from acttail.allocation import plan_from_analysis
    from stage2_synthetic import analysis

    doc = analysis(num_layers=6, seed=4)
    assert "direction" not in plan_from_analysis(doc, 0.5, method="acttail").source
    doc["projections"] = with_sensitivity(doc["projections"], 1.0)
    rec = plan_from_analysis(doc, 0.5, method="acttail").source["direction"]
    assert rec["direction"] == "decreasing" and rec["spearman"] > rec["chance_bound"] > 0
