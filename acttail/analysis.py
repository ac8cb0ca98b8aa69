"""The analysis stage: ESD metrics of every projection of a checkpoint -> ``analysis.json``.

Projections are streamed one at a time from the checkpoint. Results are cached under ``cache_dir()/analysis``,
keyed by the weights' fingerprint, the model's projections and the settings, and checked against them when
read, so a re-run is instant unless forced. In Python the result is an
``Analysis`` (``Analysis.load`` / ``analysis.save``): the model it describes, the settings, and one row per
projection (a dict: key, layer, kind, shapes, alpha, xmin, ... and any column a later stage adds, such as
``sensitivity``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import math
import os
import tempfile
import threading
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .checkpoint import Checkpoint
from .config import DEVICE, Config
from .errors import ActTailError
from .layout import KINDS, check_projections
from .esd import EVAL_FLOOR, FITS, analyze_matrix
from .files import cache_dir, read_json
from .outputs import to_json, write_files, write_json, write_text
from .validation import check_model, check_schema

FORMAT, VERSION = "acttail-analysis", 1
BACKENDS = ("acttail", "weightwatcher", "powerlaw")
METRICS = ("n_evals", "alpha", "xmin", "n_tail", "ks_distance", "sigma", "lambda_max", "spectral_norm",
           "stable_rank", "alpha_weighted", "log_norm")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
GPU_WORKERS = 8


@dataclass(frozen=True)
class AnalysisConfig(Config):
    """How spectra are analysed; each field is an option of ``acttail analyze``. fit: the power-law fit
    (``esd.FITS``); dtype, device: of the Gram matrix and its eigenvalues; backend: ours or a reference tool."""

    fit: str = "ks"
    dtype: str = "float32"
    device: str = DEVICE
    backend: str = "acttail"
    stage = "analysis"


def settings(fit: str = AnalysisConfig.fit, dtype: str = AnalysisConfig.dtype, device: str = AnalysisConfig.device,
             backend: str = AnalysisConfig.backend) -> dict:
    """Validated analysis settings, as stored in analysis.json."""
    if fit not in FITS:
        raise ActTailError(f"unknown fit {fit!r}; choose one of {', '.join(FITS)}")
    if dtype not in DTYPES:
        raise ActTailError(f"unknown dtype {dtype!r}; choose float32 or float64")
    if backend not in BACKENDS:
        raise ActTailError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ActTailError(f"--device {device} asked for, but no CUDA device is available")
    return {"fit": fit, "dtype": dtype, "device": device, "eval_floor": EVAL_FLOOR, "backend": backend}


def analyze_checkpoint(ckpt: Checkpoint, cfg: dict, progress: bool = True, workers: int | None = None) -> dict:
    """Analyse every projection of ``ckpt`` with settings ``cfg``; returns the analysis document.

    Matrices are analysed by a few workers while the next tensors are read. On CPU: one single-threaded
    worker per core (LAPACK's eigvalsh scales poorly with threads at these sizes, whole matrices in
    parallel do better). On CUDA: ``GPU_WORKERS`` workers, each on its own stream, so that one matrix's
    eigensolver overlaps another's. At most two tensors per worker are in memory at once.
    """
    projs = ckpt.projections()
    on_cpu = cfg["device"] == "cpu"
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, torch.get_num_threads())) if on_cpu else GPU_WORKERS
    if not on_cpu and cfg["backend"] == "acttail":  # cuSOLVER loads lazily, and not safely from several
        torch.linalg.eigvalsh(torch.eye(2, device=cfg["device"]))  # threads at once: load it here first
    rows = []
    with _single_threaded(on_cpu and workers > 1), ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(projs), desc="ESD", unit="matrix", disable=not progress) as bar:
        pending = deque()
        for proj in projs:
            pending.append((proj, pool.submit(_analyze_one, ckpt.load(proj), cfg)))
            while len(pending) > 2 * workers or (pending and pending[0][1].done()):
                rows.append(_row(*pending.popleft()))
                bar.update()
        while pending:
            rows.append(_row(*pending.popleft()))
            bar.update()
    return {"format": FORMAT, "version": VERSION, "tool_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": _model_section(ckpt),
            "settings": cfg, "projections": rows, "summary": summarize(rows)}


def _row(proj, future) -> dict:
    return {"key": proj.key, "layer": proj.layer, "kind": proj.kind, "out_features": proj.out_features,
            "in_features": proj.in_features, "params": proj.params, **future.result()}


_local = threading.local()


def _worker_stream(device: str):
    """This worker thread's own CUDA stream (created once per thread)."""
    if getattr(_local, "stream", None) is None:
        _local.stream = torch.cuda.Stream(device)
    return _local.stream


@contextlib.contextmanager
def _single_threaded(on: bool):
    """Run torch single-threaded inside the block (when ``on``), restoring the thread count after."""
    n = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _analyze_one(w: torch.Tensor, cfg: dict) -> dict:
    if cfg["backend"] == "acttail" and cfg["device"] != "cpu":
        with torch.cuda.stream(_worker_stream(cfg["device"])):
            return analyze_matrix(w, cfg["fit"], DTYPES[cfg["dtype"]], cfg["device"])
    if cfg["backend"] == "acttail":
        return analyze_matrix(w, cfg["fit"], DTYPES[cfg["dtype"]], cfg["device"])
    from . import reference

    return reference.analyze_matrix(w, cfg["backend"], cfg["fit"])


def summarize(rows: list[dict]) -> dict:
    """Per-kind mean/min/max alpha, and how many alphas fall above 8 and below 2."""
    by_kind = defaultdict(list)
    for r in rows:
        if r["alpha"] is not None:
            by_kind[r["kind"]].append(r["alpha"])
    alphas = [a for v in by_kind.values() for a in v]
    per_kind = {k: {"n": len(v), "mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                for k in KINDS if (v := by_kind.get(k))}
    return {"n_projections": len(rows), "n_fitted": len(alphas),
            "n_alpha_above_8": sum(a > 8 for a in alphas), "n_alpha_below_2": sum(a < 2 for a in alphas),
            "n_warnings": sum(bool(r.get("warnings")) for r in rows),
            "alpha_median": float(np.median(alphas)) if alphas else None, "per_kind": per_kind}


def cache_path(ckpt: Checkpoint, cfg: dict, projs: list | None = None) -> Path:
    """The cache entry of ``ckpt`` analysed with settings ``cfg``: keyed by everything the result depends on
    (the weights' fingerprint, the model section, every projection's shape, the settings but the device, the
    tool's version)."""
    key = json.dumps({"version": __version__, "model": _model_section(ckpt), "settings": _cache_settings(cfg),
                      "projections": _shapes(projs if projs is not None else ckpt.projections())}, sort_keys=True)
    return cache_dir() / "analysis" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _model_section(ckpt: Checkpoint) -> dict:
    """What the analysis says of the model; ``rotation`` only for a rotated checkpoint (``acttail.rotation``)."""
    out = {"path": str(ckpt.path), "fingerprint": ckpt.fingerprint, "architecture": ckpt.architecture,
           "model_type": ckpt.model_type, "num_layers": ckpt.num_layers}
    if getattr(ckpt, "rotation", None):
        out["rotation"] = ckpt.rotation
    return out


def _cache_settings(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "device"}  # a result holds on any device


def _shapes(rows) -> list:
    return [[r["key"], r["out_features"], r["in_features"]] if isinstance(r, dict) else
            [r.key, r.out_features, r.in_features] for r in rows]


def _cached(path: Path, ckpt: Checkpoint, cfg: dict, projs: list) -> dict | None:
    """The cache entry at ``path`` if it is a valid analysis of exactly this model with these settings (its
    fingerprint, model section, settings, version, projections and summary); None otherwise: a damaged,
    stale or planted entry is recomputed, never served."""
    if not os.path.lexists(path):
        return None
    try:
        doc = load_analysis(path)
    except ActTailError:
        return None
    model = {k: v for k, v in _model_section(ckpt).items() if k != "path"}
    same = (set(doc) == set(_WRITTEN) and doc["tool_version"] == __version__
            and {k: doc["model"].get(k) for k in model} == model
            and isinstance(doc["settings"], dict) and _cache_settings(doc["settings"]) == _cache_settings(cfg)
            and _shapes(doc["projections"]) == _shapes(projs) and doc["summary"] == summarize(doc["projections"]))
    return doc if same else None


_WRITTEN = ("format", "version", "tool_version", "created", "model", "settings", "projections", "summary")


def run_analysis(model: str | Path, fit: str = AnalysisConfig.fit, dtype: str = AnalysisConfig.dtype,
                 device: str = AnalysisConfig.device, backend: str = AnalysisConfig.backend, force: bool = False,
                 progress: bool = True) -> tuple[dict, bool]:
    """Analyse ``model`` (a folder, a .safetensors file, or a .gguf file: converted into a temporary folder
    first, so the fingerprint is that of the weights ``acttail convert-gguf`` writes), reusing a cached
    result unless ``force``.

    Returns (analysis, was_cached).
    """
    cfg = settings(fit, dtype, device, backend)
    if str(model).endswith(".gguf"):
        from .convert import check_architecture, convert_gguf

        check_architecture(model)
        with tempfile.TemporaryDirectory(prefix="acttail-gguf-") as tmp:
            doc, cached = _run(Checkpoint.open(convert_gguf(model, Path(tmp) / "model")), cfg, force, progress)
        doc["model"]["path"] = str(model)
        return doc, cached
    return _run(Checkpoint.open(model), cfg, force, progress)


def _run(ckpt: Checkpoint, cfg: dict, force: bool, progress: bool) -> tuple[dict, bool]:
    projs = ckpt.projections()  # config.json must agree with the weights, cached result or not
    cached = cache_path(ckpt, cfg, projs)
    doc = None if force else _cached(cached, ckpt, cfg, projs)
    if doc is not None:
        doc["model"]["path"] = str(ckpt.path)
        return doc, True
    doc = analyze_checkpoint(ckpt, cfg, progress)
    with contextlib.suppress(OSError, ActTailError):  # an unwritable cache costs a recomputation, not the result
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json(cached, doc)
    return doc, False


def load_analysis(path: str | Path) -> dict:
    """Read an analysis.json and check it (``check_analysis``): the one reader for all stages."""
    doc = read_json(path, "analysis")
    if not isinstance(doc, dict) or doc.get("format") != "acttail-analysis":
        raise ActTailError(f"{path} is not an acttail analysis (format field missing or different)")
    if doc.get("version") != 1:
        raise ActTailError(f"{path}: analysis version {doc.get('version')!r} is not supported (expected 1)")
    check_analysis(doc, f"analysis {path}")
    return doc


@dataclass
class Analysis:
    """ESD metrics of every projection of one checkpoint; ``projections`` holds one row (dict) each."""

    model: dict
    settings: dict
    projections: list[dict]
    summary: dict
    tool_version: str = __version__
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    extra: dict = field(default_factory=dict)  # further top-level sections, e.g. "sensitivity"
    from_cache: bool = field(default=False, compare=False, repr=False)  # served by ``acttail.analyze``'s cache

    @classmethod
    def load(cls, path: str | Path) -> "Analysis":
        """Read and check an analysis.json (the one reader every stage uses)."""
        return cls.from_dict(load_analysis(path))

    @classmethod
    def from_dict(cls, doc: dict) -> "Analysis":
        known = _WRITTEN
        return cls(model=doc["model"], settings=doc.get("settings") or {}, projections=doc["projections"],
                   summary=doc.get("summary") or summarize(doc["projections"]),
                   tool_version=doc.get("tool_version", __version__), created=doc.get("created", ""),
                   extra={k: v for k, v in doc.items() if k not in known})

    def check_model(self, fingerprint: str, where: str = "analysis") -> None:
        """Refuse an analysis made for other weights."""
        check_model(self.model["fingerprint"], fingerprint, where)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "tool_version": self.tool_version, "created": self.created,
                "model": self.model, "settings": self.settings, "projections": self.projections,
                "summary": self.summary, **self.extra}

    def save(self, path: str | Path, csv_path: str | Path | None = None) -> None:
        """Check and write analysis.json (and the CSV when asked): both files appear, or neither."""
        doc = self.to_dict()
        check_analysis(doc)
        save(doc, path, csv_path)

    def format_summary(self) -> str:
        return format_summary(self.to_dict())


def check_analysis(doc: dict, where: str = "analysis") -> None:
    """Raise one clear error unless ``doc`` follows schemas/analysis.schema.json and each of the model's
    num_layers x 7 projections appears once, its key agreeing with its layer, kind and shape."""
    check_schema(doc, "analysis", where)
    check_projections(doc["projections"], doc["model"]["num_layers"], where)


def to_csv(doc: dict) -> str:
    """The per-projection rows as CSV (warnings joined with '; ')."""
    cols = ["key", "layer", "kind", "out_features", "in_features", "params", *METRICS, "warnings"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in doc["projections"]:
        w.writerow({**r, "warnings": "; ".join(r["warnings"])})
    return buf.getvalue()


def save(doc: dict, out: str | Path, csv_path: str | Path | None = None) -> None:
    """Write analysis.json (and the CSV if asked) atomically: both files appear, or neither."""
    write_files({out: to_json(doc), **({csv_path: to_csv(doc)} if csv_path else {})})


def save_csv(doc: dict, path: str | Path) -> None:
    write_text(path, to_csv(doc))


def format_summary(doc: dict) -> str:
    """A terminal table: alpha per projection kind, counts of extreme alphas, warnings."""
    s, m, cfg = doc["summary"], doc["model"], doc["settings"]
    lines = [f"model        {m['path']}  ({m['architecture']}, {m['num_layers']} layers, {m['fingerprint']})",
             f"fit          {cfg['fit']} ({cfg['backend']}, {cfg['dtype']}, eigenvalues > {cfg['eval_floor']})",
             f"projections  {s['n_projections']} analysed, {s['n_fitted']} fitted, {s['n_warnings']} with warnings",
             f"alpha        median {_f(s['alpha_median'])}; {s['n_alpha_above_8']} above 8, "
             f"{s['n_alpha_below_2']} below 2",
             "", f"{'kind':<6} {'n':>4} {'mean':>7} {'min':>7} {'max':>7}"]
    for kind, k in s["per_kind"].items():
        lines.append(f"{kind:<6} {k['n']:>4} {k['mean']:>7.2f} {k['min']:>7.2f} {k['max']:>7.2f}")
    return "\n".join(lines)


def _f(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"

