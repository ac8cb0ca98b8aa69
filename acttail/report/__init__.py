"""Stage 4: turn an analysis (and optionally plans and eval results) into figures and one HTML page.

``build_report`` reads and cross-checks the inputs (every plan and eval result must be for the analysed
model), recomputes the eigenvalues of a bounded number of projections for the ESD figures, draws the
figures, and writes ``DIR/index.html`` (self-contained) plus ``DIR/figures/*.png|svg`` atomically.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import analysis as analysis_stage
from ..errors import ActTailError
from ..files import cache_dir, read_json
from ..outputs import folder_replaced, write_text, writing
from ..plan import Plan
from ..validation import check_model, check_schema
from . import figures as F
from .html import render_report

MAX_GRID = 12  # thumbnails in an ESD small-multiples grid


@dataclass
class PlanView:
    """A plan file as the report needs it: a label, the budget, the method, its entries as rows (dicts)."""

    path: Path
    label: str
    budget: float
    method: dict
    rows: list[dict]
    calibrated: bool
    weighted_sparsity: float
    raw: dict


@dataclass
class Report:
    """Everything ``render_report`` draws on: inputs, figures (as PNG bytes) and report-level warnings."""

    analysis: dict
    plans: list[PlanView]
    evals: list[dict]
    figures: list[dict] = field(default_factory=list)  # {"section", "name", "title", "caption", "png"}
    speed: list[tuple[float, float]] | None = None  # (sparsity, decode speed-up) from benchmarks.gpu_e2e
    warnings: list[str] = field(default_factory=list)


# ---- inputs ----------------------------------------------------------------------------------------

def load_analysis(path) -> dict:
    """Read analysis.json with the analysis stage's reader (it checks the fields the report uses)."""
    return analysis_stage.load_analysis(path)


def load_plan_for(path, analysis: dict) -> PlanView:
    """Read a plan (validated by acttail.plan) and check it belongs to the analysed model."""
    plan = Plan.load(path, expect_fingerprint=analysis["model"]["fingerprint"])
    shapes = {r["key"]: (r["in_features"], r["out_features"]) for r in analysis["projections"]}
    unknown = [e.key for e in plan.projections if e.key not in shapes]
    if unknown:
        raise ActTailError(f"plan {path} does not match the analysis (unknown projections: {', '.join(unknown[:3])})")
    for e in plan.projections:  # same fingerprint, other shapes: an edited plan
        if (e.in_features, e.out_features) != shapes[e.key]:
            raise ActTailError(f"plan {path} does not match the analysis: {e.key} is {(e.in_features, e.out_features)} "
                               f"(in, out) in the plan but {shapes[e.key]} in the analysis")
    budget, method = float(plan.budget), plan.method
    label = f"{Path(path).stem} ({method_name(method)} {budget:.0%})"
    raw = plan.to_dict()
    return PlanView(Path(path), label, budget, method, raw["projections"], plan.calibrated, plan.weighted_sparsity,
                    raw)


def method_name(method) -> str:
    """The allocation method's name ('acttail', 'uniform', ...) from a plan's or eval's method field."""
    return str(method.get("name", "plan")) if isinstance(method, dict) else str(method)


def load_eval_for(path, analysis: dict, plans: list[PlanView]) -> dict:
    """Read an ``acttail eval -o`` result; it must be for the analysed model and, when it names one of
    the given plan files, agree with that plan."""
    e = read_json(path, "eval result")
    if not isinstance(e, dict) or e.get("format") != "acttail-eval":
        raise ActTailError(f"{path} is not an acttail eval result (format is not 'acttail-eval')")
    if e.get("version") != 1:
        raise ActTailError(f"{path}: eval result version {e.get('version')!r} is not supported (expected 1)")
    if not isinstance(e.get("perplexity"), (int, float)) or not math.isfinite(e["perplexity"]):
        raise ActTailError(f"eval result {path} has no finite 'perplexity'")
    check_schema(e, "eval", f"eval result {path}")
    check_model((e.get("model") or {}).get("fingerprint"), analysis["model"]["fingerprint"], f"eval result {path}",
                "is for another model", against="the analysis")
    summary = e.get("plan")
    if summary is not None:
        if not isinstance(summary, dict) or not isinstance(summary.get("budget"), (int, float)):
            raise ActTailError(f"eval result {path}: its plan summary has no numeric budget")
        for p in plans:
            if summary.get("path") and Path(summary["path"]).resolve() == p.path.resolve():
                _check_same_plan(path, summary, p)
    e["_path"] = str(path)
    return e


def expand_folders(paths) -> list[Path]:
    """Paths as given, a folder standing for the ``*.json`` files in it (e.g. a study's runs/)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise ActTailError(f"--eval {p}: folder holds no .json file")
            out += found
        else:
            out.append(p)
    return out


def _check_same_plan(path, summary: dict, plan: PlanView) -> None:
    """The eval ran ``plan``'s file: budget, method and calibration must still be those of the file."""
    current = (("budget", plan.budget), ("method", plan.method), ("calibration", plan.raw.get("calibration")))
    for field_, mine in current:
        theirs = summary.get(field_)
        same = math.isclose(theirs, mine) if field_ == "budget" else theirs == mine
        if field_ in summary and not same:
            raise ActTailError(f"eval result {path} was made with another version of plan {plan.path} "
                               f"({field_} {theirs!r} there, {mine!r} now)")


# ---- spectra ---------------------------------------------------------------------------------------

def choose_esd_keys(analysis: dict, keys: list[str]) -> list[str]:
    """The projections drawn full-size: those asked for, else the one with the lowest alpha."""
    rows = analysis["projections"]
    known = {r["key"] for r in rows}
    bad = [k for k in keys if k not in known]
    if bad:
        raise ActTailError(f"--esd {bad[0]}: no such projection in the analysis (e.g. {rows[0]['key']})")
    if keys:
        return list(keys)
    fitted = [r for r in rows if r.get("alpha") is not None]
    return [min(fitted, key=lambda r: r["alpha"])["key"] if fitted else rows[0]["key"]]


def grid_keys(analysis: dict, layer: int | None, kind: str | None) -> tuple[str, list[str]]:
    """Keys for the small-multiples grid: every kind of one layer, or one kind over <= MAX_GRID layers."""
    rows = analysis["projections"]
    if kind is not None:
        picked = [r for r in rows if r["kind"] == kind]
        if not picked:
            raise ActTailError(f"--esd-kind {kind}: no such projection kind in the analysis")
        idx = np.unique(np.linspace(0, len(picked) - 1, min(MAX_GRID, len(picked))).round().astype(int))
        return f"ESD of {kind} across layers", [picked[i]["key"] for i in idx]
    layers = sorted({r["layer"] for r in rows})
    if layer not in layers:
        raise ActTailError(f"--esd-layer {layer}: the model has layers {layers[0]}..{layers[-1]}")
    return f"ESD of every projection in layer {layer}", [r["key"] for r in rows if r["layer"] == layer][:MAX_GRID]


def model_folder(analysis: dict, model: str | None = None) -> tuple[str | None, list[str]]:
    """Where the analysed weights are: ``model`` if given, else the analysis' path, else the same folder
    name in the acttail cache (an analysis made on another machine). Returns (path or None, tried)."""
    if model is not None:
        if not Path(model).exists():
            raise ActTailError(f"--model {model}: not found")
        return str(model), [str(model)]
    path = analysis["model"].get("path")
    tried = [path] if path else []
    if path:
        tried.append(str(cache_dir() / "models" / Path(path).name))
    return next((p for p in tried if Path(p).exists()), None), tried


def compute_spectra(analysis: dict, keys: list[str], path: str | None, tried: list[str]) -> tuple[dict, str | None]:
    """Recompute eigenvalues for ``keys`` from the model folder ``path``; (spectra, warning or None)."""
    if path is None:
        return {}, (f"model folder not found (tried {', '.join(tried) or 'nothing: the analysis has no path'}): "
                    "ESD figures skipped; give it with --model")
    from ..checkpoint import Checkpoint
    from ..esd import eigenvalues

    try:
        ckpt = Checkpoint.open(path)
    except ActTailError as e:
        if tried == [path]:  # given with --model: the user asked for this folder
            raise
        return {}, f"cannot open model folder ({e}): ESD figures skipped"
    check_model(ckpt.fingerprint, analysis["model"]["fingerprint"], f"model folder {path}",
                "holds other weights than the analysis", against="the analysis",
                advice=": give the analysed model with --model, or analyse this one")
    settings = analysis.get("settings") or {}
    dtype = getattr(torch, str(settings.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ActTailError(f"analysis settings.dtype {settings.get('dtype')!r} is not a torch dtype")
    device = _usable_device(settings.get("device", "cpu"))
    by_key = {p.key: p for p in ckpt.projections()}
    spectra = {}
    empty = []
    for key in tqdm(keys, desc="eigenvalues", unit="proj", leave=False, disable=None):
        evals = np.asarray(eigenvalues(ckpt.load(by_key[key]), dtype=dtype, device=device))
        evals = evals[evals > (settings.get("eval_floor") or 0.0)]  # the eigenvalues the fit saw
        if len(evals):
            spectra[key] = evals
        else:
            empty.append(key)
    warning = f"no eigenvalue above the floor for {', '.join(empty)}: no ESD drawn for them" if empty else None
    return spectra, warning


def _usable_device(device: str) -> str:
    """The analysis device, or the CPU when this machine lacks it (the spectrum is the same)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "cpu"
    return device


# ---- figures ---------------------------------------------------------------------------------------

def draw_figures(rep: Report, folder: Path, esd_keys: list[str], grid_title: str, grid: list[str],
                 model: tuple[str | None, list[str]]) -> None:
    """Draw every figure the inputs allow into ``folder`` and record them (PNG bytes) in ``rep``."""
    rows = rep.analysis["projections"]
    by_key = {r["key"]: r for r in rows}

    bar = tqdm(desc="figures", unit="fig", leave=False, disable=None)

    def add(section, name, title, caption, fig):
        png = F.save(fig, folder, name)
        rep.figures.append({"section": section, "name": name, "title": title, "caption": caption, "png": png})
        bar.update()

    spectra, warning = compute_spectra(rep.analysis, list(dict.fromkeys(esd_keys + grid)), *model)
    if warning:
        rep.warnings.append(warning)
    for key in esd_keys:
        if key in spectra:
            add("spectra", f"esd_{key.replace('.', '_')}", f"ESD of {key}",
                "Eigenvalues of WᵀW: histogram with logarithmic bins and complementary CDF, with the "
                "power law fitted from xmin (dashed) drawn over the tail.", F.esd_figure(spectra[key], by_key[key]))
    thumbs = [(by_key[k], spectra[k]) for k in grid if k in spectra]
    if thumbs:
        add("spectra", "esd_grid", grid_title,
            "Thumbnails: complementary CDF per projection with the fitted power law (red) and xmin (dashed).",
            F.esd_grid_figure(thumbs, grid_title))

    add("alpha", "alpha_heatmap", "Alpha per layer and projection kind",
        "Diverging scale centred on the HT-SR band 2 ≤ α ≤ 6 (pale). × marks a projection with a warning; "
        "grey cells have no fit.", F.alpha_heatmap(rows))
    if rep.plans:
        draw_plan_figures(rep, add)
    bar.close()


def draw_plan_figures(rep: Report, add) -> None:
    """Sparsity maps, plan vs uniform per kind, alpha vs sparsity and, for calibrated plans, calibration."""
    for i, p in enumerate(rep.plans):
        add("allocation", f"sparsity_heatmap_{i}", f"Sparsity of {p.label}",
            "Planned activation sparsity (share of input activations skipped) per projection.",
            F.sparsity_heatmap(p.rows, f"Sparsity per layer and kind — {p.label}"))
    add("allocation", "kind_bars", "Sparsity per kind: plans vs uniform",
        "Parameter-weighted mean sparsity per projection kind (whiskers: min–max over layers) beside a "
        "uniform allocation at the same budget.",
        F.kind_bars([(p.label, p.rows, p.budget) for p in rep.plans]))
    add("allocation", "alpha_vs_sparsity", "Alpha vs sparsity",
        "Each point is one projection: the allocation maps alpha to sparsity; flat runs show clipping "
        "to the plan's minimum or maximum sparsity.",
        F.alpha_sparsity_scatter([(p.label, p.rows, p.method.get("metric", "alpha"))
                                  for p in rep.plans]))
    for i, p in enumerate(rep.plans):
        if p.calibrated:
            measured, text = eval_achieved(rep.evals, p)
            caption = ("Left: sparsity measured on the calibration text (filled, by kind) against the plan's "
                       "target" + (f", and in the eval run on {text} (hollow)" if measured else "") +
                       ". Right: the calibrated magnitude threshold per layer.")
            add("calibration", f"calibration_{i}", f"Calibration of {p.label}", caption,
                F.calibration_figure(p.rows, p.label, measured, text))


def eval_achieved(evals: list[dict], plan: PlanView) -> tuple[dict, str]:
    """Per-projection sparsity achieved in the first eval run of ``plan``'s file (key -> value), its text."""
    for e in evals:
        summary = e.get("plan") or {}
        if summary.get("path") and Path(summary["path"]).resolve() == plan.path.resolve():
            rows = (e.get("achieved") or {}).get("projections") or []
            text = Path(str((e.get("settings") or {}).get("text", "eval text"))).name
            return {r["key"]: r.get("achieved") for r in rows if "key" in r}, text
    return {}, ""


def eval_labels(evals: list[dict]) -> dict[int, str]:
    """A series name per sparse eval result (by index): a study's own run name when recorded, else the
    method name plus the method options that differ from the most common ones, plus a non-default mode."""
    sparse = [(i, e) for i, e in enumerate(evals) if e.get("plan") is not None]
    methods = [e["plan"].get("method") if isinstance(e["plan"].get("method"), dict) else {} for _, e in sparse]
    keys = {k for m in methods for k in m}
    values = {k: [json.dumps(m.get(k), sort_keys=True) for m in methods] for k in keys}  # absent = null
    usual = {k: max(sorted(set(vs)), key=vs.count) for k, vs in values.items()}
    labels = {}
    for (i, e), m in zip(sparse, methods):
        study = e.get("study") if isinstance(e.get("study"), dict) else {}
        if isinstance(study.get("name"), str):
            labels[i] = study["name"]
            continue
        extra = [f"{k}={v}" for k, v in m.items() if k != "name" and json.dumps(v, sort_keys=True) != usual.get(k)]
        mode = (e.get("settings") or {}).get("mode")
        labels[i] = " ".join([method_name(m), *extra] + ([f"({mode})"] if mode not in (None, "threshold") else []))
    return labels


def comparability_warnings(evals: list[dict]) -> list[str]:
    """Perplexities are comparable only on the same text, window length and token count."""
    out = []
    for key in ("text", "ctx", "tokens"):
        values = {str((e.get("settings") or {}).get(key)) for e in evals}
        if len(values) > 1:
            out.append(f"eval results differ in {key} ({', '.join(sorted(values))}): "
                       "their perplexities are not comparable")
    return out


def draw_accuracy(rep: Report, folder: Path) -> None:
    """Perplexity vs budget for the given eval results, one line per allocation method."""
    if not rep.evals:
        return
    series, dense = {}, []
    for e in rep.evals:
        if e.get("plan") is None:
            dense.append(e["perplexity"])
        else:
            series.setdefault(e["_label"], []).append((e["plan"]["budget"], e["perplexity"]))
    for name, pts in series.items():
        budgets = [b for b, _ in pts]
        if len(set(budgets)) < len(budgets):
            rep.warnings.append(f"several eval results for '{name}' at one budget: their plans differ in "
                                "something the eval result does not record (e.g. the ESD fit)")
    rep.warnings += comparability_warnings(rep.evals)
    if not series:
        return
    texts = {str((e.get("settings") or {}).get("text")) for e in rep.evals}
    text = Path(texts.pop()).name if len(texts) == 1 else "mixed texts"
    fig = F.perplexity_figure(series, dense, f"Perplexity vs sparsity budget ({text})")
    png = F.save(fig, folder, "perplexity_vs_budget")
    rep.figures.append({"section": "accuracy", "name": "perplexity_vs_budget", "title": "Perplexity vs budget",
                        "caption": "Perplexity (log scale) of each allocation method at each budget; the "
                                   "dotted line is the dense model.", "png": png})
    points = {}
    for e in rep.evals:
        if e.get("plan") is not None:
            points.setdefault(e["_label"], []).append((e["plan"]["budget"], e["perplexity"], e.get("kl")))
    if dense and any(p[2] is not None for pts in points.values() for p in pts):
        fig = F.frontier_figure(points, dense[0], rep.speed, f"What a budget costs ({text})")
        png = F.save(fig, folder, "frontier")
        rep.figures.append({"section": "accuracy", "name": "frontier", "title": "Quality against budget and speed",
                            "caption": "Perplexity increase over dense and KL divergence to the dense model at each "
                                       "budget" + (", and the perplexity increase against the decode speed-up the "
                                                   "GPU benchmark measured at that sparsity (--speed)" if rep.speed
                                                   else "") + ".", "png": png})


# ---- output ----------------------------------------------------------------------------------------

def load_speed(path) -> list[tuple[float, float]]:
    """(uniform sparsity, decode speed-up) of the Llama-2-7B shape from ``benchmarks.gpu_e2e``'s e2e.json
    (schemas/speed.schema.json; the rows with use_sparse dispatch, as the decoder runs a plan), with (0, 1)
    for dense."""
    doc = read_json(path, "speed table")
    check_schema(doc, "speed", f"speed table {path}")
    pts = [(0.0, 1.0)] + [(float(r["target_mean_sparsity"]), float(r["speedup"])) for r in doc["rows"]
                          if r["variant"].endswith("use_sparse dispatch") and r.get("step", "current") == "current"
                          and r["model"].startswith("Llama-2-7B")]
    if len(pts) < 2:
        raise ActTailError(f"{path} has no Llama-2-7B rows with use_sparse dispatch")
    return pts


def build_report(analysis_path, plan_paths=(), eval_paths=(), out_dir="report", esd=(), esd_layer=None,
                 esd_kind=None, model=None, speed=None) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/figures/``; return the path of index.html."""
    start = time.perf_counter()
    analysis = load_analysis(analysis_path)
    eval_files, model_path = expand_folders(eval_paths), model_folder(analysis, model)
    _refuse_overwrite(Path(out_dir), analysis_path, plan_paths, eval_files, speed, model_path[0])
    plans = [load_plan_for(p, analysis) for p in plan_paths]
    evals = [load_eval_for(e, analysis, plans) for e in eval_files]
    speed_points = load_speed(speed) if speed else None
    labels = eval_labels(evals)
    for i, e in enumerate(evals):
        e["_label"] = labels.get(i, "dense")
    esd_keys = choose_esd_keys(analysis, list(esd))
    layer = esd_layer if esd_layer is not None else next(
        r["layer"] for r in analysis["projections"] if r["key"] == esd_keys[0])
    grid_title, grid = grid_keys(analysis, layer, esd_kind)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ActTailError(f"output {out} exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ActTailError(f"cannot create output folder {out}: {e.strerror}") from None
    rep = Report(analysis, plans, evals, speed=speed_points)
    tmp = None
    try:
        with writing(out):
            tmp = Path(tempfile.mkdtemp(prefix=".figures.", dir=out))
            tmp.chmod(0o755)
        draw_figures(rep, tmp, esd_keys, grid_title, grid, model_path)
        draw_accuracy(rep, tmp)
        html = render_report(rep, seconds=time.perf_counter() - start)
        with folder_replaced(tmp, out / "figures"):  # index.html and figures/ are replaced together, or neither
            write_text(out / "index.html", html)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


OS_METADATA = {".DS_Store", "Thumbs.db", "desktop.ini"}  # files a file browser leaves in a folder it showed


def _refuse_overwrite(out: Path, analysis, plans, evals, speed, model) -> None:
    """Refuse, before any figure is drawn, a report folder whose index.html or figures/ is one of the inputs
    or holds one."""
    from ..inputs import model_files, plan_files, refuse_overwrite

    inputs = [("the analysis", analysis), *(f for p in plans for f in plan_files(p)),
              *(("eval result", e) for e in evals), ("the speed table", speed), *model_files(model)]
    refuse_overwrite([("report", out / "index.html"), ("report figures folder", out / "figures")], files=inputs)
    figures = out / "figures"  # replaced whole: it may hold only an earlier report's figures
    if figures.exists() and not figures.is_dir():
        raise ActTailError(f"{figures} is a file, which the report's figures folder would replace: choose another "
                           "output folder")
    if figures.is_dir():
        stray = next((p for p in sorted(figures.iterdir())
                      if not p.is_file() or (p.suffix not in (".png", ".svg") and p.name not in OS_METADATA)), None)
        if stray is not None:
            raise ActTailError(f"report figures folder {figures} holds {stray.name}, no figure of a report, which "
                               "replacing the folder would delete: choose another output folder")


