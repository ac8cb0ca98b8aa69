"""Allocation: budget met exactly, bounds, monotone map, null metrics, errors; hypothesis properties."""

import random
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail import allocation
from acttail.allocation import METHODS, fit_budget, metric_values, register_method
from acttail.errors import ActTailError
from stage2_synthetic import KINDS, analysis, rows as make_rows


def sparsities(rows, budget, **kw):
    """The alpha map (method acttail) unless a test names another method: what this file tests."""
    return allocation.sparsities(rows, budget, **{"method": "acttail", **kw})


def plan_from_analysis(analysis, budget, **kw):
    return allocation.plan_from_analysis(analysis, budget, **{"method": "acttail", **kw})


def weighted_mean(rows, s, weight="params"):
    w = np.array([r[weight] for r in rows], dtype=float)
    return float(w @ np.array(s) / w.sum())


# ---- hypothesis strategies -------------------------------------------------------------------------

@st.composite
def row_sets(draw, max_rows=28, nulls=True, equal=False):
    """Rows with unique (layer, kind), positive params, alphas (maybe null, maybe all equal)."""
    slots = draw(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(KINDS)), min_size=1, max_size=max_rows,
                          unique=True))
    common = draw(st.floats(1.0, 10.0))
    out = []
    for layer, kind in slots:
        alpha = common if equal else draw(st.floats(1.0, 10.0))
        if nulls and draw(st.integers(0, 9)) == 0:
            alpha = None
        out.append({"key": f"layers.{layer}.{kind}", "layer": layer, "kind": kind,
                    "params": draw(st.integers(1, 2_000_000)), "alpha": alpha})
    return out


@st.composite
def requests(draw):
    """A feasible (budget, min_sparsity, max_sparsity)."""
    budget = draw(st.floats(0.01, 0.98))
    lo = draw(st.floats(0.0, budget))
    hi = draw(st.floats(budget, 1.0))
    return budget, lo, hi


scopes = st.sampled_from(["global", "per-kind", "layer"])
directions = st.sampled_from(["increasing", "decreasing"])
epsilons = st.floats(0.0, 1.0)


@settings(max_examples=150, deadline=None)
@given(rows=row_sets(), req=requests(), scope=scopes, direction=directions, eps=epsilons)
def test_budget_met_and_bounds_respected(rows, req, scope, direction, eps):
    budget, lo, hi = req
    if all(r["alpha"] is None for r in rows):
        rows[0]["alpha"] = 3.0
    s = sparsities(rows, budget, scope=scope, direction=direction, epsilon=eps, min_sparsity=lo, max_sparsity=hi)
    assert abs(weighted_mean(rows, s) - budget) <= 1e-9
    assert all(lo <= x <= hi for x in s)


@settings(max_examples=150, deadline=None)
@given(rows=row_sets(nulls=False), req=requests(), scope=scopes, direction=directions, eps=epsilons)
def test_monotone_in_metric(rows, req, scope, direction, eps):
    budget, lo, hi = req
    s = sparsities(rows, budget, scope=scope, direction=direction, epsilon=eps, min_sparsity=lo, max_sparsity=hi)
    m = metric_values(rows, "alpha", scope)  # the value that drives each row (layer mean for scope=layer)
    sign = 1 if direction == "increasing" else -1
    for i in range(len(rows)):
        for j in range(len(rows)):
            same_group = scope != "per-kind" or rows[i]["kind"] == rows[j]["kind"]
            if same_group and sign * m[i] < sign * m[j]:
                assert s[i] <= s[j] + 1e-12


@settings(max_examples=100, deadline=None)
@given(rows=row_sets(nulls=False, equal=True), req=requests(), scope=scopes, eps=epsilons)
def test_uniform_when_all_metrics_equal(rows, req, scope, eps):
    budget, lo, hi = req
    s = sparsities(rows, budget, scope=scope, epsilon=eps, min_sparsity=lo, max_sparsity=hi)
    assert max(abs(x - budget) for x in s) <= 1e-9


@settings(max_examples=100, deadline=None)
@given(rows=row_sets(), req=requests(), scope=scopes, seed=st.integers(0, 10**6))
def test_deterministic_and_order_invariant(rows, req, scope, seed):
    budget, lo, hi = req
    if all(r["alpha"] is None for r in rows):
        rows[0]["alpha"] = 3.0
    kw = dict(scope=scope, min_sparsity=lo, max_sparsity=hi)
    first = sparsities(rows, budget, **kw)
    assert sparsities(rows, budget, **kw) == first
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    again = dict(zip((r["key"] for r in shuffled), sparsities(shuffled, budget, **kw)))
    assert {r["key"]: x for r, x in zip(rows, first)} == again  # bit-identical, not just close


@settings(max_examples=100, deadline=None)
@given(rows=row_sets(), req=requests())
def test_uniform_method_gives_the_budget(rows, req):
    budget, lo, hi = req
    s = sparsities(rows, budget, method="uniform", min_sparsity=lo, max_sparsity=hi)
    assert max(abs(x - budget) for x in s) <= 1e-12


# ---- examples --------------------------------------------------------------------------------------

def test_alphapruning_map_without_clipping():
    """Unclipped, the sparsities are budget * r / mean(r): sparsest / densest = (1 + eps) / (1 - eps)."""
    rows = make_rows(30)
    s = sparsities(rows, 0.3, epsilon=0.3)
    assert max(s) / min(s) == pytest.approx(1.3 / 0.7, rel=1e-12)
    lowest = min(range(len(rows)), key=lambda i: rows[i]["alpha"])
    highest = max(range(len(rows)), key=lambda i: rows[i]["alpha"])
    assert s[lowest] == min(s) and s[highest] == max(s)  # lower alpha -> lower sparsity
    r = sparsities(rows, 0.3, epsilon=0.3, direction="decreasing")
    assert r[lowest] == max(r) and r[highest] == min(r)


def test_high_budget_clips_and_redistributes():
    rows = make_rows(30)
    s = sparsities(rows, 0.85, max_sparsity=0.95)
    assert max(s) == 0.95 and sum(x == 0.95 for x in s) > 1
    assert abs(weighted_mean(rows, s) - 0.85) <= 1e-9


def test_budget_equal_to_a_bound_is_all_at_the_bound():
    rows = make_rows(4)
    assert sparsities(rows, 0.9, max_sparsity=0.9) == pytest.approx([0.9] * len(rows), abs=1e-12)


def test_per_kind_scope_normalises_within_each_kind():
    """Per kind, the lowest alpha of every kind gets the same (lowest) ratio when nothing clips."""
    rows = make_rows(30)
    s = sparsities(rows, 0.3, scope="per-kind", epsilon=0.3)
    lows = []
    for kind in KINDS:
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        lows.append(s[min(idx, key=lambda i: rows[i]["alpha"])])
        assert s[min(idx, key=lambda i: rows[i]["alpha"])] == min(s[i] for i in idx)
    assert max(lows) - min(lows) < 1e-12


def test_layer_scope_gives_one_sparsity_per_layer():
    rows = make_rows(30)
    s = sparsities(rows, 0.5, scope="layer")
    for layer in range(30):
        vals = {s[i] for i, r in enumerate(rows) if r["layer"] == layer}
        assert len(vals) == 1
    assert len(set(s)) == 30


def test_null_metric_gets_the_group_median():
    rows = make_rows(5, null_every=5)
    nulls = [i for i, r in enumerate(rows) if r["alpha"] is None]
    per_kind = metric_values(rows, "alpha", "per-kind")
    for i in nulls:
        kind = rows[i]["kind"]
        known = [r["alpha"] for r in rows if r["kind"] == kind and r["alpha"] is not None]
        assert per_kind[i] == statistics.median(known)
    layer = metric_values(rows, "alpha", "layer")
    for i in nulls:  # the layer mean skips the null
        known = [r["alpha"] for r in rows if r["layer"] == rows[i]["layer"] and r["alpha"] is not None]
        assert layer[i] == pytest.approx(statistics.mean(known), rel=1e-12)


def test_null_metric_falls_back_to_the_global_median():
    rows = make_rows(5, null_every=7)  # one null per layer (the down projection)
    assert sum(r["alpha"] is None for r in rows) == 5
    values = metric_values(rows, "alpha", "global")
    median = statistics.median(r["alpha"] for r in rows if r["alpha"] is not None)
    assert all(values[i] == median for i, r in enumerate(rows) if r["alpha"] is None)
    # per kind: here every "down" alpha is null, so that kind falls back to the global median
    per_kind = metric_values(rows, "alpha", "per-kind")
    assert all(per_kind[i] == median for i, r in enumerate(rows) if r["kind"] == "down")


def test_other_metric_columns_and_weights():
    rows = make_rows(6)
    by_rank = sparsities(rows, 0.5, metric="stable_rank")
    order = sorted(range(len(rows)), key=lambda i: rows[i]["stable_rank"])
    assert [by_rank[i] for i in order] == sorted(by_rank)
    # bytes weighting: identical without a bytes column, different with a mixed-precision one
    assert sparsities(rows, 0.5, weight="bytes") == sparsities(rows, 0.5)
    mixed = [dict(r, bytes=r["params"] * (1 if r["kind"] == "down" else 2)) for r in rows]
    s = sparsities(mixed, 0.5, weight="bytes")
    assert abs(weighted_mean(mixed, s, "bytes") - 0.5) <= 1e-9
    assert abs(weighted_mean(mixed, s, "params") - 0.5) > 1e-6


@pytest.mark.parametrize("kw, message", [
    (dict(budget=0.0), "strictly between 0 and 1"),
    (dict(budget=1.0), "strictly between 0 and 1"),
    (dict(budget=0.5, min_sparsity=0.6), "infeasible"),
    (dict(budget=0.995), "infeasible"),
    (dict(budget=0.5, min_sparsity=0.7, max_sparsity=0.6), "min <= max"),
    (dict(budget=0.5, metric="nope"), "no column 'nope'"),
    (dict(budget=0.5, method="magic"), "unknown method"),
    (dict(budget=0.5, scope="galaxy"), "unknown scope"),
    (dict(budget=0.5, epsilon=1.5), "epsilon"),
    (dict(budget=0.5, direction="sideways"), "direction"),
    (dict(budget=0.5, weight="flops"), "budget weight"),
])
def test_infeasible_or_bad_requests_are_clear_errors(kw, message):
    with pytest.raises(ActTailError, match=message):
        sparsities(make_rows(2), **kw)


def test_rows_must_be_usable():
    rows = make_rows(2)
    with pytest.raises(ActTailError, match="appears twice"):
        sparsities(rows + rows[:1], 0.5)
    with pytest.raises(ActTailError, match="every fit failed"):
        sparsities([dict(r, alpha=None) for r in rows], 0.5)
    with pytest.raises(ActTailError, match="non-positive"):
        sparsities([dict(rows[0], params=0)], 0.5)
    with pytest.raises(ActTailError, match="no projections"):
        sparsities([], 0.5)


def test_fit_budget_directly():
    s = fit_budget([0.1, 1.0, 5.0], [1, 1, 1], 0.5, 0.0, 0.99)
    assert abs(np.mean(s) - 0.5) <= 1e-9 and s[2] == 0.99 and s[0] < s[1]


def test_a_new_method_plugs_in():
    """Another stage can register a method (e.g. sensitivity-aware) reading any numeric column."""

    @register_method("test-sensitivity")
    def sensitivity_ratios(rows, power=1.0, **_):
        return metric_values(rows, "sensitivity") ** -power  # more sensitive -> denser

    try:
        rows = [dict(r, sensitivity=float(i + 1)) for i, r in enumerate(make_rows(2))]
        s = sparsities(rows, 0.4, method="test-sensitivity", power=0.5)
        assert s == sorted(s, reverse=True) and abs(weighted_mean(rows, s) - 0.4) <= 1e-9
        an = dict(analysis(num_layers=2), projections=rows)
        plan = plan_from_analysis(an, 0.4, method="test-sensitivity", metric="sensitivity", power=0.5)
        assert plan.method["power"] == 0.5 and plan.projections[3].metric == 4.0
        with pytest.raises(ActTailError, match="invalid ratios"):
            sparsities(rows, 0.4, method="test-sensitivity", power=float("nan"))
    finally:
        METHODS.pop("test-sensitivity")


def test_plan_from_analysis_records_everything():
    an = analysis(num_layers=3, null_every=5)
    plan = plan_from_analysis(an, 0.7, analysis_path="a.json", scope="per-kind", epsilon=0.2).to_dict()
    assert plan["method"] == {"name": "acttail", "metric": "alpha", "scope": "per-kind", "epsilon": 0.2,
                              "direction": "increasing", "null_metric": "median", "weight": "params",
                              "min_sparsity": 0.0, "max_sparsity": 0.99}
    assert plan["model"]["fingerprint"] == "synthetic-fp" and plan["source"]["analysis"] == "a.json"
    assert [e["key"] for e in plan["projections"]] == [r["key"] for r in an["projections"]]
    assert [e["metric"] for e in plan["projections"]] == [r["alpha"] for r in an["projections"]]
    assert abs(weighted_mean(plan["projections"], [e["sparsity"] for e in plan["projections"]]) - 0.7) <= 1e-9
    uniform = plan_from_analysis(an, 0.7, method="uniform")
    assert set(uniform.method) == {"name", "metric", "weight", "min_sparsity", "max_sparsity"}


def test_allocation_table_script(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "allocation_table.py"
    spec = importlib.util.spec_from_file_location("allocation_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    an = tmp_path / "analysis.json"
    an.write_text(json.dumps(analysis(num_layers=6, null_every=9)))
    out = tmp_path / "allocation.md"
    module.main([str(an), "-o", str(out), "--budgets", "0.5", "0.8"])
    text = out.read_text()
    assert "## Budget 50%" in text and "## Budget 80%" in text and "epsilon 0.3 (ratios in [0.7, 1.3])" in text
    assert text.count("**0.500000**") == 4 and text.count("**0.800000**") == 4
    assert sum(line.startswith("| up |") for line in text.splitlines()) == 2
