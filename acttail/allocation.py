"""Allocation: per-projection metrics (alpha) -> one activation sparsity per projection, under one budget.

The pipeline, one small function per step:

1. ``metric_values``: one number per projection from an analysis column (alpha by default). Failed fits
   (null metric) take the median of their normalisation group (the projection kind for ``per-kind``, all
   projections for ``global``); for ``layer`` the layer mean skips nulls and a layer with no valid value
   takes the median of the other layer means. The median keeps a failed fit neutral: it neither gets the
   densest nor the sparsest setting, and it still counts toward the budget.
2. A method turns values into positive ratios. ``uniform``: all 1 (the TEAL baseline). ``acttail``: the
   AlphaPruning linear map r = (1 - eps) + 2 eps (m - m_min) / (m_max - m_min) inside each group, so lower
   alpha (heavier tail, better trained) gets lower sparsity; ``direction="decreasing"`` reverses it.
   The published ActTail formula is not available to us: this form is ours and every choice is an option.
3. ``fit_budget``: scale the ratios to the budget (AlphaPruning's multiplicative scaling), then clip to
   [min_sparsity, max_sparsity] and find by bisection the additive shift c for which the weighted mean of
   clip(v + c) equals the budget to 1e-9. Clipping and a common shift keep the map monotone.

Budget weighting: by parameter count (default) or by bytes read at decode. Skipping an input element of a
projection skips one column of its weight, so the bytes saved are sparsity x weight bytes; for one storage
dtype bytes = params x itemsize and the two weightings give the same allocation. Rows may carry a
``bytes`` column (mixed precision); without it ``weight="bytes"`` uses params.

Every default lives once, in ``AllocationConfig``. New methods: register ``fn(rows, *, scope, metric,
epsilon, direction, **params) -> ratios`` with ``@register_method("name")``; extra keyword arguments reach
``fn`` and are recorded in the plan. Any numeric column of the rows (e.g. a per-projection
``sensitivity``) is read with ``metric_values(rows, "sensitivity", scope)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from .config import Config
from .errors import ActTailError
from .plan import MODEL_KEYS, Plan, PlanEntry
from .validation import check_model

SCOPES = ("global", "per-kind", "layer")
DIRECTIONS = ("increasing", "decreasing")  # sparsity increasing (default) or decreasing in the metric
WEIGHTS = ("params", "bytes")
NULL_METRIC = "median"  # what a failed fit gets; recorded in the plan
TOLERANCE = 1e-9  # |weighted mean - budget| after fit_budget

METHODS: dict[str, Callable[..., np.ndarray]] = {}


@dataclass(frozen=True)
class AllocationConfig(Config):
    """How sparsity is spread over projections; each field is a CLI option of ``acttail allocate``.

    method: greedy (TEAL's block-wise greedy allocation, from the paths ``acttail greedy`` adds to the
    analysis: the best measured, reports/quality/), uniform (TEAL's baseline), acttail (the alpha map,
    direction measured from a ``sensitivity`` column when present, else assumed), alpha-map (assumed
    direction), acttail-sens (measured, required), sensitivity (measured sensitivity alone, no alpha). scope: where the metric is normalised. epsilon:
    ratios span [1 - eps, 1 + eps]. direction: sparsity increasing in the metric or not. weight: budget
    weighting. min/max_sparsity: bounds of every projection. gamma: strength of the sensitivity method.
    rank_split: the alpha split of bytes between sparsity and rank (``alpha_ranks``): the largest rank of
    low-rank compensation, given to the heaviest tail (0: no split).
    """

    method: str = "greedy"
    scope: str = "global"
    metric: str = "alpha"
    epsilon: float = 0.3
    direction: str = "increasing"
    weight: str = "params"
    min_sparsity: float = 0.0
    max_sparsity: float = 0.99
    gamma: float = 0.5
    rank_split: int = 0
    stage = "allocation"


def register_method(name: str):
    """Register an allocation method: ``fn(rows, *, scope, metric, epsilon, direction) -> ratios``."""

    def register(fn):
        METHODS[name] = fn
        return fn

    return register


# ---- inputs -----------------------------------------------------------------------------------------


def check_rows(rows: list[dict]) -> None:
    """Every row needs a unique key, a layer, a kind and a positive parameter count."""
    if not rows:
        raise ActTailError("no projections to allocate")
    seen = set()
    for i, row in enumerate(rows):
        for field in ("key", "layer", "kind", "params"):
            if field not in row:
                raise ActTailError(f"projection {i} has no {field!r} field")
        if not _is_number(row["params"]) or row["params"] <= 0:
            raise ActTailError(f"projection {row['key']} has a non-positive parameter count")
        if row["key"] in seen:
            raise ActTailError(f"projection {row['key']} appears twice")
        seen.add(row["key"])


def check_bounds(budget: float, min_sparsity: float, max_sparsity: float) -> None:
    """An infeasible request is an error: the budget must lie in (0, 1) and between the bounds."""
    if not _is_number(budget) or not 0.0 < budget < 1.0:
        raise ActTailError(f"budget must be strictly between 0 and 1, got {budget}")
    if not 0.0 <= min_sparsity <= max_sparsity <= 1.0:
        raise ActTailError(
            f"sparsity bounds must satisfy 0 <= min <= max <= 1, got min {min_sparsity}, max {max_sparsity}"
        )
    if not min_sparsity <= budget <= max_sparsity:
        raise ActTailError(
            f"budget {budget} is outside the sparsity bounds [{min_sparsity}, {max_sparsity}]: infeasible"
        )


def budget_weights(rows: list[dict], weight: str = "params") -> np.ndarray:
    """The weight of each projection in the budget: parameters, or bytes (same thing for one dtype)."""
    if weight not in WEIGHTS:
        raise ActTailError(f"unknown budget weight {weight!r} (choose from {', '.join(WEIGHTS)})")
    if weight == "bytes" and all(_is_number(r.get("bytes")) and r["bytes"] > 0 for r in rows):
        return np.array([float(r["bytes"]) for r in rows])
    return np.array([float(r["params"]) for r in rows])


def metric_values(rows: list[dict], metric: str, scope: str = "global") -> np.ndarray:
    """One value per row from column ``metric``; nulls imputed by group median; layer scope averages."""
    if scope not in SCOPES:
        raise ActTailError(f"unknown scope {scope!r} (choose from {', '.join(SCOPES)})")
    raw = _column(rows, metric)
    if np.isnan(raw).all():
        raise ActTailError(f"no projection has a value for {metric!r} (every fit failed?)")
    if scope == "layer":
        return _layer_means(rows, raw)
    groups = _groups(rows, scope)
    values = raw.copy()
    fallback = float(np.nanmedian(raw))
    for g in set(groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        known = raw[members][~np.isnan(raw[members])]
        fill = float(np.median(known)) if known.size else fallback
        for i in members:
            if math.isnan(values[i]):
                values[i] = fill
    return values


def _column(rows: list[dict], metric: str) -> np.ndarray:
    """Column ``metric`` as floats with NaN for null; a missing or non-numeric column is an error."""
    if not any(metric in r for r in rows):
        numeric = sorted({k for r in rows for k, v in r.items() if _is_number(v)} - {"layer"})
        raise ActTailError(f"no column {metric!r} in the analysis (numeric columns: {', '.join(numeric)})")
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        v = r.get(metric)
        if v is None:
            out[i] = math.nan
        elif _is_number(v):
            out[i] = float(v) if math.isfinite(v) else math.nan
        else:
            raise ActTailError(f"column {metric!r} of {r['key']} is not a number: {v!r}")
    return out


def _layer_means(rows: list[dict], raw: np.ndarray) -> np.ndarray:
    """AlphaPruning's block-wise mode: every projection gets the mean metric of its decoder layer."""
    layers = sorted({r["layer"] for r in rows})
    means = {}
    for layer in layers:
        vals = [raw[i] for i, r in enumerate(rows) if r["layer"] == layer and not math.isnan(raw[i])]
        means[layer] = float(np.mean(vals)) if vals else math.nan
    known = [m for m in means.values() if not math.isnan(m)]
    fill = float(np.median(known))
    return np.array([fill if math.isnan(means[r["layer"]]) else means[r["layer"]] for r in rows])


def _groups(rows: list[dict], scope: str) -> list:
    """The normalisation group of each row: one group, or its projection kind."""
    return [r["kind"] for r in rows] if scope == "per-kind" else [0] * len(rows)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v):
    """A finite number as float, anything else (null, inf, a string) as None."""
    return float(v) if _is_number(v) and math.isfinite(v) else None


# ---- methods ----------------------------------------------------------------------------------------


def normalise(values: np.ndarray, groups: list) -> np.ndarray:
    """(m - m_min) / (m_max - m_min) within each group; 0.5 for a group whose values are all equal."""
    t = np.empty_like(values)
    for g in set(groups):
        idx = np.array([i for i, gi in enumerate(groups) if gi == g])
        lo, hi = values[idx].min(), values[idx].max()
        span = hi - lo
        if span <= 1e-12 * max(abs(hi), abs(lo), 1.0):
            t[idx] = 0.5
        else:
            t[idx] = (values[idx] - lo) / span
    return np.clip(t, 0.0, 1.0)


def linear_map(t: np.ndarray, epsilon: float, direction: str = "increasing") -> np.ndarray:
    """AlphaPruning's map of t in [0, 1] to ratios in [1 - eps, 1 + eps]; ``decreasing`` flips t."""
    if not 0.0 <= epsilon <= 1.0:
        raise ActTailError(f"epsilon must be in [0, 1], got {epsilon}")
    if direction not in DIRECTIONS:
        raise ActTailError(f"unknown direction {direction!r} (choose from {', '.join(DIRECTIONS)})")
    if direction == "decreasing":
        t = 1.0 - t
    return (1.0 - epsilon) + 2.0 * epsilon * t


@register_method("uniform")
def uniform_ratios(rows, **_) -> np.ndarray:
    """Every projection gets the budget (TEAL's uniform baseline)."""
    return np.ones(len(rows))


def alpha_map_ratios(rows, *, scope, metric, epsilon, direction, **_) -> np.ndarray:
    """AlphaPruning's map with an assumed direction: lower metric (alpha) -> lower sparsity, linearly within
    each normalisation group (``direction="decreasing"`` reverses it)."""
    values = metric_values(rows, metric, scope)
    groups = [0] * len(rows) if scope == "layer" else _groups(rows, scope)
    return linear_map(normalise(values, groups), epsilon, direction)


@register_method("acttail")
def acttail_ratios(rows, *, scope, metric, epsilon, direction, **_) -> np.ndarray:
    """The default: the alpha map, with its direction measured (``acttail-sens``) when the rows carry a
    ``sensitivity`` column, else assumed (``alpha-map``: lower alpha -> lower sparsity).

    Measured on SmolLM2-135M and Qwen2.5-Coder-0.5B (reports/accuracy/): the assumed direction loses to
    uniform on both; the measured one beats uniform on SmolLM2 at 40-70% and falls back to uniform on Qwen.
    """
    if has_sensitivity(rows):
        return acttail_sens_ratios(rows, scope=scope, metric=metric, epsilon=epsilon, direction=direction)
    return alpha_map_ratios(rows, scope=scope, metric=metric, epsilon=epsilon, direction=direction)


register_method("alpha-map")(alpha_map_ratios)


def has_sensitivity(rows) -> bool:
    """Whether every row carries a measured ``sensitivity`` (from ``acttail sensitivity``)."""
    return all(isinstance(r.get("sensitivity"), (int, float)) for r in rows)


@register_method("acttail-sens")
def acttail_sens_ratios(rows, *, scope, metric, epsilon, direction, **_) -> np.ndarray:
    """The acttail map with its direction and strength set by measured sensitivity (column ``sensitivity``:
    loss increase per parameter zeroed, from ``acttail sensitivity``) instead of assumed.

    rho = Spearman(metric, sensitivity) over all projections. |rho| <= 2 / sqrt(n) (alpha does not rank
    sensitivity better than chance): no map, every ratio 1 (uniform). Otherwise the acttail map with
    ``epsilon``, sparsity decreasing in alpha when rho > 0 (higher alpha, more sensitive), increasing when
    rho < 0. ``direction="decreasing"`` inverts the measured direction (ablation).
    """
    chosen = measured_direction(rows, metric, direction)["direction"]
    if chosen == "uniform":
        return np.ones(len(rows))
    return alpha_map_ratios(rows, scope=scope, metric=metric, epsilon=epsilon, direction=chosen)


def measured_direction(rows, metric: str, direction: str) -> dict:
    """How the measured sensitivity orients the map: Spearman rho of (metric, sensitivity), the chance
    bound 2/sqrt(n), and the direction chosen ("uniform" when |rho| is within the bound)."""
    values = metric_values(rows, metric, "global")
    sens = _column(rows, "sensitivity")
    if np.isnan(sens).any():
        raise ActTailError("method acttail-sens needs a 'sensitivity' value for every projection "
                           "(run `acttail sensitivity` on the analysis first)")
    rho = spearman(values, sens)
    bound = 2.0 / math.sqrt(len(rows))
    if abs(rho) <= bound:
        chosen = "uniform"
    else:
        chosen = "decreasing" if (rho > 0) != (direction == "decreasing") else "increasing"
    return {"spearman": rho, "chance_bound": bound, "direction": chosen}


@register_method("greedy")
def greedy_ratios(rows, *, budget, greedy=None, **_) -> np.ndarray:
    """TEAL's greedy allocation: each projection's sparsity in the step of its block's greedy path (from
    ``acttail greedy``) whose weighted sparsity is nearest the budget; the solver then meets the budget."""
    if not greedy or not greedy.get("layers"):
        raise ActTailError("method greedy needs the greedy paths of `acttail greedy` in the analysis")
    paths = greedy["layers"]
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        if r["layer"] >= len(paths) or not paths[r["layer"]]:
            raise ActTailError(f"the greedy paths have no step for layer {r['layer']}")
        step = min(paths[r["layer"]], key=lambda s: abs(s["effective"] - budget))
        out[i] = step["sparsity"][r["kind"]]
    return out


@register_method("sensitivity")
def sensitivity_ratios(rows, *, gamma, **_) -> np.ndarray:
    """Study ablation without alpha: ratio = (sensitivity / geometric mean)^-gamma per projection."""
    if not has_sensitivity(rows):
        raise ActTailError("method sensitivity needs a 'sensitivity' value for every projection "
                           "(run `acttail sensitivity` on the analysis first)")
    sens = np.array([float(r["sensitivity"]) for r in rows])
    return np.exp(np.log(sens) - np.log(sens).mean()) ** -gamma


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no tie correction; 0 when undefined)."""
    if len(a) < 3:
        return 0.0
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    c = np.corrcoef(ra, rb)[0, 1]
    return float(c) if np.isfinite(c) else 0.0


RANK_STEP = 8  # alpha_ranks rounds to multiples of this


def alpha_ranks(rows, max_rank: int, metric: str = "alpha") -> np.ndarray:
    """ActTail's split of each projection's bytes between sparsity and rank: rank r = max_rank (1 - t),
    t the metric normalised over all projections (0 at the smallest alpha), rounded to a multiple of 8.

    Why alpha: a heavy-tailed spectrum (small alpha) holds more of its energy in its top singular
    directions, so the same rank restores more of what sparsity drops (R-Sparse's premise). The bytes a
    rank adds, r (in + out) per token, are paid in sparsity at calibration (``PlanEntry.overhead``)."""
    if max_rank < 0:
        raise ActTailError(f"rank_split must be >= 0, got {max_rank}")
    if max_rank == 0:
        return np.zeros(len(rows), dtype=int)
    t = normalise(metric_values(rows, metric, "global"), [0] * len(rows))
    ranks = np.round(max_rank * (1.0 - t) / RANK_STEP).astype(int) * RANK_STEP
    caps = np.array([min(int(r["in_features"]), int(r["out_features"])) for r in rows])
    return np.minimum(ranks, caps)


# ---- solver -----------------------------------------------------------------------------------------


def fit_budget(ratios, weights, budget: float, min_sparsity: float = AllocationConfig.min_sparsity,
               max_sparsity: float = AllocationConfig.max_sparsity):
    """Sparsities clip(budget * r / mean_w(r) + c) with the shift c found so the weighted mean = budget."""
    check_bounds(budget, min_sparsity, max_sparsity)
    r = np.asarray(ratios, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean_r = float(w @ r)
    v = budget * r / mean_r if mean_r > 0 else np.full_like(r, budget)

    def mean_at(c):
        return float(w @ np.clip(v + c, min_sparsity, max_sparsity))

    lo, hi = min_sparsity - v.max(), max_sparsity - v.min()  # mean_at(lo) = min, mean_at(hi) = max
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if mean_at(mid) < budget:
            lo = mid
        else:
            hi = mid
    c = lo if abs(mean_at(lo) - budget) < abs(mean_at(hi) - budget) else hi
    s = np.clip(v + c, min_sparsity, max_sparsity)
    if abs(float(w @ s) - budget) > TOLERANCE:
        raise ActTailError(f"could not meet budget {budget} within {TOLERANCE} (got {float(w @ s)})")
    return s


# ---- allocation -------------------------------------------------------------------------------------


def sparsities(rows: list[dict], budget: float, config: AllocationConfig | None = None, **options) -> list[float]:
    """One sparsity per row (same order), weighted mean = budget within 1e-9, bounds respected.

    Rows are analysis projections (dicts with key, layer, kind, params and the metric column). ``options``
    change fields of ``config`` (AllocationConfig() by default); options that are not fields go to the
    method function (for registered methods). The work is done in key order, so the result does not depend
    on the order of ``rows``.
    """
    cfg, params = _split_options(config, options)
    check_rows(rows)
    check_bounds(budget, cfg.min_sparsity, cfg.max_sparsity)
    if cfg.method not in METHODS:
        raise ActTailError(f"unknown method {cfg.method!r} (choose from {', '.join(sorted(METHODS))})")
    if cfg.scope not in SCOPES:
        raise ActTailError(f"unknown scope {cfg.scope!r} (choose from {', '.join(SCOPES)})")
    order = sorted(range(len(rows)), key=lambda i: str(rows[i]["key"]))
    ordered = [rows[i] for i in order]
    ratios = METHODS[cfg.method](ordered, scope=cfg.scope, metric=cfg.metric, epsilon=cfg.epsilon,
                                 direction=cfg.direction, gamma=cfg.gamma, budget=budget, **params)
    ratios = np.asarray(ratios, dtype=np.float64)
    if ratios.shape != (len(rows),) or not np.isfinite(ratios).all() or (ratios < 0).any():
        raise ActTailError(f"method {cfg.method!r} gave invalid ratios (need one finite value >= 0 per projection)")
    s = fit_budget(ratios, budget_weights(ordered, cfg.weight), budget, cfg.min_sparsity, cfg.max_sparsity)
    out = [0.0] * len(rows)
    for pos, i in enumerate(order):
        out[i] = float(s[pos])
    return out


def _split_options(config: AllocationConfig | None, options: dict) -> tuple[AllocationConfig, dict]:
    """(config with the options that are its fields, the remaining options for the method)."""
    names = {f.name for f in fields(AllocationConfig)}
    cfg = (config or AllocationConfig()).updated(**{k: v for k, v in options.items() if k in names})
    return cfg, {k: v for k, v in options.items() if k not in names}


def method_record(cfg: AllocationConfig, **params) -> dict:
    """The plan's ``method`` object: the name and every parameter that shaped the allocation."""
    rec = {"name": cfg.method, "metric": cfg.metric}  # metric: the column copied into projections[].metric
    if cfg.method == "sensitivity":
        rec.update(gamma=cfg.gamma)
    elif cfg.method != "uniform":
        rec.update(scope=cfg.scope, epsilon=cfg.epsilon, direction=cfg.direction, null_metric=NULL_METRIC)
    rec.update(weight=cfg.weight, min_sparsity=cfg.min_sparsity, max_sparsity=cfg.max_sparsity, **params)
    if cfg.rank_split:
        rec.update(rank_split=cfg.rank_split, rank_metric=cfg.metric)
    return rec


def plan_from_analysis(analysis, budget: float, config: AllocationConfig | None = None, *,
                       analysis_path: str | None = None, **options) -> Plan:
    """The uncalibrated ``Plan`` for an analysis (an ``Analysis`` or its document): one sparsity per
    projection. ``options`` change fields of ``config``; everything that shaped the plan is recorded in it."""
    doc = analysis.to_dict() if hasattr(analysis, "to_dict") else analysis
    rows = doc["projections"]
    cfg, params = _split_options(config, options)
    if cfg.method == "greedy":
        params["greedy"] = doc.get("greedy")
        if params["greedy"] and params["greedy"].get("fingerprint") is not None:
            check_model(params["greedy"]["fingerprint"], doc["model"]["fingerprint"], "the greedy paths in the "
                        "analysis", "were measured on other weights", against="the analysis")
    values = sparsities(rows, budget, cfg, **params)
    ranks = alpha_ranks(rows, cfg.rank_split, cfg.metric)
    entries = [PlanEntry(layer=int(r["layer"]), kind=r["kind"], in_features=int(r["in_features"]),
                         out_features=int(r["out_features"]), sparsity=float(s), metric=_finite(r.get(cfg.metric)),
                         rank=int(k)) for r, s, k in zip(rows, values, ranks)]
    source = {"analysis": analysis_path, "settings": doc.get("settings")}
    if cfg.method == "acttail-sens" or (cfg.method == "acttail" and has_sensitivity(rows)):
        source["direction"] = measured_direction(rows, cfg.metric, cfg.direction)
    if cfg.method == "greedy":
        g = params.pop("greedy")
        source["greedy"] = {k: g[k] for k in ("text", "tokens", "base_step", "max_sparsity", "last_fraction")}
    plan = Plan(model={k: doc["model"].get(k) for k in MODEL_KEYS if k in doc["model"] or k != "rotation"},
                budget=float(budget), method=method_record(cfg, **params), projections=entries, source=source)
    plan.to_dict()  # validates
    return plan

