"""Per-projection sensitivity: how much the loss on calibration text rises when one projection alone is
sparsified (top-k at a given level, every other projection dense).

This is what decides whether a projection can take more sparsity than the budget; the study compares it
with alpha to see whether (and in which direction) the alpha map points the right way. Measured on the
calibration text (c4), never on the evaluation text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from .config import CTX, Config
from .layout import KINDS, Key
from .runtime.perplexity import perplexity
from .runtime.sparsify import ProjectionSparsity, Sparsifier, keep_count


@dataclass(frozen=True)
class SensitivityConfig(Config):
    """How sensitivity is measured: ``acttail sensitivity``'s options. tokens, ctx: the calibration text's
    first tokens, in windows of ctx; levels: the top-k sparsities each projection is probed at (``dnll_50``,
    ``dnll_80``); batch_size: windows per forward pass."""

    tokens: int = 16384
    ctx: int = CTX
    levels: tuple[float, ...] = (0.5, 0.8)
    batch_size: int = 8
    stage = "sensitivity"


@torch.no_grad()
def sensitivity(model, wins: torch.Tensor, keys: list[tuple[int, str]], levels=SensitivityConfig.levels,
                batch_size: int = SensitivityConfig.batch_size, progress: bool = True) -> dict:
    """{"dense_nll": nll, "dnll": {(layer, kind): {level: nll(sparse p) - dense_nll}}} on windows ``wins``."""
    with model.sparsified(Sparsifier.dense()):
        base = perplexity(model, wins, batch_size, progress=False)["nll"]
    out = {}
    bar = tqdm(total=len(keys) * len(levels), desc="sensitivity", disable=not progress)
    for key in keys:
        out[key] = {}
        for level in levels:
            keep = keep_count(level, model.args.in_features(key[1]))
            with model.sparsified(Sparsifier({key: ProjectionSparsity(keep=keep)}, measure=False)):
                out[key][level] = perplexity(model, wins, batch_size, progress=False)["nll"] - base
            bar.update()
    bar.close()
    return {"dense_nll": base, "dnll": out}


def measure(model, wins: torch.Tensor, fingerprint: str, text: str, levels=SensitivityConfig.levels,
            progress: bool = True, batch_size: int = SensitivityConfig.batch_size) -> dict:
    """The sensitivity document (JSON-ready) of ``model`` (our decoder) on windows of ``text``: one row per
    projection with ``dnll_50``, ``dnll_80``, ... (loss increase at each top-k level). Costs 1 +
    n_projections x levels forward passes: minutes on a GPU, hours for a 135M model on two CPU cores."""
    import time

    keys = [Key(layer, kind) for layer in range(model.args.n_layer) for kind in KINDS]
    t0 = time.time()
    r = sensitivity(model, wins, keys, levels, batch_size, progress)
    return {"model": {"fingerprint": fingerprint}, "text": str(text), "tokens": int(wins.numel()),
            "mode": "topk", "levels": list(levels), "dense_nll": r["dense_nll"], "seconds": time.time() - t0,
            "projections": [{"key": str(k), "layer": k.layer, "kind": k.kind,
                             **{f"dnll_{round(100 * lv)}": d[lv] for lv in levels}} for k, d in r["dnll"].items()]}


# ---- allocation from alpha and sensitivity ---------------------------------------------------------

def with_sensitivity(analysis: dict, sens: dict, level: str = "dnll_80") -> dict:
    """A copy of an analysis whose rows carry ``sensitivity``: loss increase per parameter zeroed when the
    projection alone is sparsified at the level (from ``sensitivity.json``), floored at a small positive
    value (a projection whose loss change is within noise of zero is nearly free to sparsify)."""
    import copy

    check_sensitivity(sens, analysis, level)
    by_key = {p["key"]: p for p in sens["projections"]}
    out = copy.deepcopy(analysis)
    per_param = {k: p[level] / (float(level.split("_")[1]) / 100 * _params(out, k)) for k, p in by_key.items()}
    positive = sorted(v for v in per_param.values() if v > 0)
    floor = positive[len(positive) // 2] * 1e-2 if positive else 1e-12
    for row in out["projections"]:
        row["sensitivity"] = max(per_param[row["key"]], floor)
        row.update({k: v for k, v in by_key[row["key"]].items() if k.startswith("dnll_")})
    out["sensitivity"] = {k: sens[k] for k in ("text", "tokens", "mode", "dense_nll") if k in sens}
    out["sensitivity"]["level"] = level
    return out


def load_sensitivity(path) -> dict:
    """Read a sensitivity.json written by ``acttail sensitivity``, checked against its schema."""
    from .files import read_json
    from .validation import check_schema

    sens = read_json(path, "sensitivity file")
    check_schema(sens, "sensitivity", f"sensitivity file {path}")
    return sens


def check_sensitivity(sens, analysis: dict, level: str = "dnll_80", where: str = "sensitivity measurement") -> None:
    """One clear error unless ``sens`` follows schemas/sensitivity.schema.json, is for the analysed
    weights, and has ``level`` for exactly the analysis' projections."""
    from .errors import ActTailError
    from .validation import check_model, check_schema

    fingerprint = sens.get("model", {}).get("fingerprint") if isinstance(sens, dict) else None
    if isinstance(fingerprint, str):  # else the schema names what is missing
        check_model(fingerprint, analysis["model"]["fingerprint"], f"the {where} and the analysis",
                    "are for different checkpoints", against="the analysis")
    check_schema(sens, "sensitivity", where)
    keys = [p["key"] for p in sens["projections"]]
    wanted = [r["key"] for r in analysis["projections"]]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    missing, extra = [k for k in wanted if k not in set(keys)], sorted(set(keys) - set(wanted))
    no_level = [p["key"] for p in sens["projections"] if level not in p]
    for problem, found in (("appear twice", twice), ("are missing", missing), ("are not in the analysis", extra),
                           (f"have no {level}", no_level)):
        if found:
            raise ActTailError(f"{where}: {len(found)} projections {problem}, e.g. {', '.join(found[:3])}")


def _params(analysis: dict, key: str) -> int:
    return next(r["params"] for r in analysis["projections"] if r["key"] == key)

