"""The sparsity plan: the one file format every runtime reads, ours and others'.

This module is the only code that reads or writes plan files. A plan is JSON, versioned
(``"format": "acttail-plan", "version": 1``), described by ``schemas/plan.schema.json`` and validated on
every read and write. One entry per projection holds its sparsity and, once calibrated, its magnitude
threshold (inputs with |x| <= threshold are zeroed) and calibration statistics.
"""

from __future__ import annotations

import copy
import json
import math
from datetime import datetime, timezone
from functools import lru_cache
from itertools import islice
from pathlib import Path

from . import __version__
from .errors import ActTailError
from .files import check_schema, read_json, write_json

FORMAT = "acttail-plan"
VERSION = 1
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
TOP_KEYS = ("format", "version", "tool_version", "created", "model", "budget", "method", "source",
            "projections", "calibration")
MODEL_KEYS = ("fingerprint", "architecture", "model_type", "num_layers", "path")
ENTRY_KEYS = ("key", "layer", "kind", "in_features", "out_features", "params", "metric", "sparsity",
              "threshold", "calibration")


@lru_cache(maxsize=1)
def schema() -> dict:
    """The plan JSON Schema shipped inside the package."""
    return json.loads((Path(__file__).parent / "schemas" / "plan.schema.json").read_text(encoding="utf-8"))


# ---- building ---------------------------------------------------------------------------------------


def new_entry(row: dict, metric: float | None, sparsity: float) -> dict:
    """A plan entry for one projection (an analysis row), uncalibrated."""
    return {
        "key": row["key"],
        "layer": int(row["layer"]),
        "kind": row["kind"],
        "in_features": int(row["in_features"]),
        "out_features": int(row["out_features"]),
        "params": int(row["params"]),
        "metric": metric,
        "sparsity": float(sparsity),
        "threshold": None,
        "calibration": None,
    }


def new_plan(model: dict, budget: float, method: dict, projections: list[dict], source: dict | None = None) -> dict:
    """A validated, uncalibrated plan. ``model`` is the analysis' model section."""
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {k: model.get(k) for k in MODEL_KEYS},
        "budget": float(budget),
        "method": dict(method),
        "projections": sorted(projections, key=_entry_order),
        "calibration": None,
    }
    if source is not None:
        plan["source"] = source
    return validate(_ordered(plan))


def with_thresholds(plan: dict, thresholds: dict[str, float], stats: dict[str, dict] | None = None,
                    calibration: dict | None = None) -> dict:
    """A copy of ``plan`` with a threshold (and optional statistics) for every projection.

    ``thresholds`` and ``stats`` map projection keys ("layers.3.up") to a threshold >= 0 and to a dict
    of statistics (e.g. {"achieved_sparsity": 0.49, "n_tokens": 4096}); ``calibration`` describes the run.
    """
    keys = {e["key"] for e in plan["projections"]}
    unknown = sorted(set(thresholds) - keys) + sorted(set(stats or {}) - keys)
    if unknown:
        raise ActTailError(f"thresholds for projections not in the plan: {', '.join(unknown[:5])}")
    missing = sorted(keys - set(thresholds), key=_key_order)
    if missing:
        raise ActTailError(f"no threshold for {len(missing)} projections, e.g. {', '.join(missing[:5])}")
    out = copy.deepcopy(plan)
    for e in out["projections"]:
        t = thresholds[e["key"]]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ActTailError(f"threshold for {e['key']} must be a finite number >= 0, got {t!r}")
        e["threshold"] = float(t)
        if stats is not None and e["key"] in stats:
            e["calibration"] = dict(stats[e["key"]])
    if calibration is not None:
        out["calibration"] = dict(calibration)
    return validate(_ordered(out))


# ---- validation and files ---------------------------------------------------------------------------


def validate(plan, where: str = "plan") -> dict:
    """Check format, version, schema and consistency; raise one clear ActTailError naming the field."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        found = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise ActTailError(f"{where} is not an acttail plan (format is {found!r}, expected {FORMAT!r})")
    if plan.get("version") != VERSION:
        raise ActTailError(
            f"{where} has plan version {plan.get('version')!r}; acttail {__version__} reads version {VERSION}"
        )
    check_schema(plan, "plan", where)  # also refuses NaN and infinities, which "number" admits
    _check_consistency(plan, where)
    return plan


def _check_consistency(plan: dict, where: str) -> None:
    """What a schema cannot say: unique keys that agree with layer and kind, layers inside the model, and
    every projection of the model present (a missing one would silently run dense)."""
    seen = set()
    num_layers = plan["model"]["num_layers"]
    for i, e in enumerate(plan["projections"]):
        if e["key"] != f"layers.{e['layer']}.{e['kind']}":
            raise ActTailError(f"{where}: field $.projections[{i}].key: {e['key']!r} does not match its layer and kind")
        if e["key"] in seen:
            raise ActTailError(f"{where}: field $.projections[{i}].key: {e['key']!r} appears twice")
        if e["layer"] >= num_layers:
            raise ActTailError(f"{where}: field $.projections[{i}].layer: {e['layer']} >= num_layers {num_layers}")
        if e["params"] != e["in_features"] * e["out_features"]:
            raise ActTailError(f"{where}: field $.projections[{i}].params: not in_features x out_features")
        seen.add(e["key"])
    if len(seen) < num_layers * len(KINDS):  # keys are unique and inside the model: some are missing
        missing = (f"layers.{i}.{k}" for i in range(num_layers) for k in KINDS if f"layers.{i}.{k}" not in seen)
        raise ActTailError(f"{where}: field $.projections: {num_layers * len(KINDS) - len(seen)} of the model's "
                           f"{num_layers} x {len(KINDS)} projections missing, e.g. {', '.join(islice(missing, 3))}")


def load_plan(path: str | Path, expect_fingerprint: str | None = None) -> dict:
    """Read and validate a plan; with ``expect_fingerprint``, refuse a plan made for other weights."""
    plan = validate(read_json(path, "plan"), where=f"plan {path}")
    if expect_fingerprint is not None and plan["model"]["fingerprint"] != expect_fingerprint:
        raise ActTailError(
            f"plan {path} was made for another checkpoint (fingerprint {plan['model']['fingerprint']}, "
            f"this model has {expect_fingerprint})"
        )
    return plan


def save_plan(plan: dict, path: str | Path) -> None:
    """Validate and write ``plan`` atomically, keys in a stable order, indented by 2."""
    write_json(path, validate(_ordered(plan)))


def _ordered(plan: dict) -> dict:
    """The plan with its keys in the documented order (unknown keys kept last, for the schema to reject)."""
    out = {k: plan[k] for k in TOP_KEYS if k in plan}
    out.update({k: v for k, v in plan.items() if k not in out})
    if isinstance(out.get("model"), dict):
        m = out["model"]
        out["model"] = {**{k: m[k] for k in MODEL_KEYS if k in m},
                        **{k: v for k, v in m.items() if k not in MODEL_KEYS}}
    if isinstance(out.get("projections"), list):
        out["projections"] = [
            {**{k: e[k] for k in ENTRY_KEYS if k in e}, **{k: v for k, v in e.items() if k not in ENTRY_KEYS}}
            if isinstance(e, dict) else e
            for e in out["projections"]
        ]
    return out


def _entry_order(e: dict):
    return (e["layer"], KINDS.index(e["kind"]) if e["kind"] in KINDS else len(KINDS), e["key"])


def _key_order(key: str):
    _, layer, kind = key.split(".")
    return (int(layer), KINDS.index(kind))


# ---- reading ----------------------------------------------------------------------------------------


def is_calibrated(plan: dict) -> bool:
    """True when every projection has a threshold."""
    return all(e["threshold"] is not None for e in plan["projections"])


def weighted_sparsity(entries: list[dict]) -> float:
    """Parameter-weighted mean sparsity of some plan entries."""
    total = sum(e["params"] for e in entries)
    return sum(e["sparsity"] * e["params"] for e in entries) / total


def thresholds(plan: dict) -> dict[str, float | None]:
    """Projection key -> threshold (None until calibrated)."""
    return {e["key"]: e["threshold"] for e in plan["projections"]}


def _stats(entries: list[dict]) -> dict:
    s = [e["sparsity"] for e in entries]
    t = [e["threshold"] for e in entries if e["threshold"] is not None]
    achieved = [(e.get("calibration") or {}).get("achieved_sparsity") for e in entries]
    return {
        "n": len(entries),
        "params": sum(e["params"] for e in entries),
        "mean": weighted_sparsity(entries),
        "achieved": (sum(a * e["params"] for a, e in zip(achieved, entries)) / sum(e["params"] for e in entries)
                     if all(a is not None for a in achieved) else None),
        "min": min(s),
        "max": max(s),
        "threshold_min": min(t) if t else None,
        "threshold_max": max(t) if t else None,
    }


def plan_summary(plan: dict) -> dict:
    """Sparsity per kind and per layer (parameter-weighted mean, min, max) and the overall mean."""
    entries = plan["projections"]
    kinds = [k for k in KINDS if any(e["kind"] == k for e in entries)]
    layers = sorted({e["layer"] for e in entries})
    per_layer = []
    for layer in layers:
        es = [e for e in entries if e["layer"] == layer]
        row = {"layer": layer, **_stats(es)}
        row["by_kind"] = {e["kind"]: e["sparsity"] for e in es}
        per_layer.append(row)
    return {
        "budget": plan["budget"],
        "weighted_sparsity": weighted_sparsity(entries),
        "calibrated": is_calibrated(plan),
        "overall": _stats(entries),
        "per_kind": {k: _stats([e for e in entries if e["kind"] == k]) for k in kinds},
        "per_layer": per_layer,
    }


def format_summary(plan: dict) -> str:
    """A readable text summary for ``acttail plan show``."""
    s = plan_summary(plan)
    m, meth = plan["model"], plan["method"]
    params = ", ".join(f"{k}={v}" for k, v in meth.items() if k != "name")
    lines = [
        f"model      {m['path']}  ({m['architecture']}, {m['num_layers']} layers, fingerprint {m['fingerprint']})",
        f"method     {meth['name']}  ({params})",
        f"budget     {plan['budget']:.4f}   weighted mean sparsity {s['weighted_sparsity']:.6f}",
        f"projections {s['overall']['n']}   sparsity min {s['overall']['min']:.4f}  max {s['overall']['max']:.4f}",
        f"calibrated {'yes' if s['calibrated'] else 'no (thresholds are null)'}",
        "",
        f"{'kind':<6}{'n':>5}{'params':>12}{'mean':>9}{'min':>9}{'max':>9}"
        + (f"{'achieved':>10}" if s["overall"]["achieved"] is not None else "")
        + ("   threshold min..max" if s["calibrated"] else ""),
    ]
    for kind, st in s["per_kind"].items():
        line = f"{kind:<6}{st['n']:>5}{st['params']:>12}{st['mean']:>9.4f}{st['min']:>9.4f}{st['max']:>9.4f}"
        if st["achieved"] is not None:
            line += f"{st['achieved']:>10.4f}"
        if s["calibrated"]:
            line += f"   {st['threshold_min']:.4g}..{st['threshold_max']:.4g}"
        lines.append(line)
    kinds = list(s["per_kind"])
    lines += ["", f"{'layer':<6}{'mean':>8}{'min':>8}{'max':>8}  " + "".join(f"{k:>7}" for k in kinds)]
    for row in s["per_layer"]:
        cells = "".join(f"{row['by_kind'][k]:>7.3f}" if k in row["by_kind"] else f"{'-':>7}" for k in kinds)
        lines.append(f"{row['layer']:<6}{row['mean']:>8.4f}{row['min']:>8.4f}{row['max']:>8.4f}  {cells}")
    return "\n".join(lines)
