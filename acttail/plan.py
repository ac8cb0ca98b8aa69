"""The sparsity plan: the one file format every runtime reads, ours and others'.

This module is the only code that reads or writes plan files. A plan is JSON, versioned
(``"format": "acttail-plan", "version": 2``; version 1 files are read too), described by
``schemas/plan.schema.json`` and validated on every read and write. One entry per projection holds its
sparsity and, once calibrated, its threshold (inputs whose score is <= threshold are zeroed) and calibration
statistics. The plan's ``score`` says how inputs are ranked (magnitude |x|, or |x_i| s_i with per-channel
weights s) and its ``compensation`` what restores the dropped inputs' contribution (none,
learned output biases, low-rank factors). Their tensors live in one safetensors file beside the plan, named
in it with its sha256 (``<key>.score``, ``<key>.bias``, ``<key>.lowrank_u``/``lowrank_v``).

Budgets count bytes: an entry's ``overhead`` is what its compensation adds to every token's reads, as a
fraction of the projection's weight bytes, and the plan saves ``sparsity - overhead`` of each projection. A plan
for a rotated checkpoint (``model.rotation``, ``acttail.rotation``) also pays each layer's basis change there.

In Python a plan is a ``Plan`` (``Plan.load`` / ``plan.save``) holding one ``PlanEntry`` per projection.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__, validation
from .errors import ActTailError
from .files import read_json
from .layout import KINDS, Key, check_projections
from .outputs import to_json, write_files
from .sidecar import free_tensors_path, read_tensors, tensors_path
from .validation import check_model, check_schema

FORMAT = "acttail-plan"
VERSION = 2
READS = (1, 2)  # version 1: no score, compensation, tensors, overhead or rank (magnitude, none)
TOP_KEYS = ("format", "version", "tool_version", "created", "model", "budget", "method", "score", "compensation",
            "source", "projections", "calibration", "tensors")
MODEL_KEYS = ("fingerprint", "architecture", "model_type", "num_layers", "path", "rotation")  # rotation: if rotated
ENTRY_KEYS = ("key", "layer", "kind", "in_features", "out_features", "params", "metric", "sparsity", "overhead",
              "rank", "threshold", "calibration")
# tensor name -> its shape from (in, out, rank)
TENSORS = {"score": lambda i, o, r: (i,), "bias": lambda i, o, r: (o,), "lowrank_u": lambda i, o, r: (o, r),
           "lowrank_v": lambda i, o, r: (r, i)}


def schema() -> dict:
    """The plan JSON Schema shipped inside the package."""
    return validation.schema("plan")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the typed plan ---------------------------------------------------------------------------------


@dataclass
class PlanEntry:
    """One projection's sparsity; after calibration its threshold and what the calibration run measured."""

    layer: int
    kind: str
    in_features: int
    out_features: int
    sparsity: float
    metric: float | None = None
    threshold: float | None = None
    calibration: dict | None = None
    overhead: float = 0.0
    rank: int = 0

    @property
    def key(self) -> str:
        return str(Key(self.layer, self.kind))

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def to_dict(self) -> dict:
        return {"key": self.key, "layer": self.layer, "kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features, "params": self.params, "metric": self.metric,
                "sparsity": self.sparsity, "overhead": self.overhead, "rank": self.rank, "threshold": self.threshold,
                "calibration": self.calibration}

    @classmethod
    def from_dict(cls, e: dict) -> "PlanEntry":
        return cls(layer=e["layer"], kind=e["kind"], in_features=e["in_features"], out_features=e["out_features"],
                   sparsity=e["sparsity"], metric=e["metric"], threshold=e["threshold"],
                   calibration=copy.deepcopy(e["calibration"]), overhead=e.get("overhead", 0.0), rank=e.get("rank", 0))


@dataclass
class Plan:
    """A sparsity plan: the model it was made for, the budget, the method, and one entry per projection.

    ``model`` is the analysis' model section (fingerprint, architecture, model_type, num_layers, path);
    ``calibration`` describes the calibration run once thresholds are set (None before); ``tensors`` maps
    ``<key>.<name>`` to the score weights, biases or low-rank factors calibration made."""

    model: dict
    budget: float
    method: dict
    projections: list[PlanEntry]
    source: dict | None = None
    calibration: dict | None = None
    score: str = "magnitude"
    compensation: str = "none"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tool_version: str = __version__
    created: str = field(default_factory=_now)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        same = self.to_dict() == other.to_dict()
        return same and self.tensors.keys() == other.tensors.keys() and all(
            torch.equal(t, other.tensors[k]) for k, t in self.tensors.items())

    # ---- files and documents -----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, expect_fingerprint: str | None = None) -> "Plan":
        """Read and validate a plan file (and its tensors file); with ``expect_fingerprint``, refuse a plan
        made for other weights."""
        doc = read_json(path, "plan")
        plan = cls.from_dict(doc, where=f"plan {path}")
        if expect_fingerprint is not None:
            plan.check_model(expect_fingerprint, where=f"plan {path}")
        if doc.get("tensors"):
            plan.tensors = read_tensors(Path(path).parent / doc["tensors"]["file"], doc["tensors"]["sha256"],
                                         f"plan {path}")
        plan.check_tensors(f"plan {path}")  # also with no tensors file: a declared compensation needs its tensors
        return plan

    def save(self, path: str | Path) -> None:
        """Validate and write the plan (keys in a stable order, indented by 2); its tensors go to
        ``tensors_path(path)`` beside it, named in the plan with their sha256. The two are written as one
        unit (``outputs.write_files``, tensors first): a failure anywhere leaves the previous pair as it was."""
        path = Path(path)
        beside = free_tensors_path(path) if self.tensors else tensors_path(path)
        ref = {"file": beside.name, "sha256": "0" * 64} if self.tensors else None  # the sha256 is set below
        doc = self.to_dict(ref)  # validate (once: 10^5 projections take seconds) before writing anything
        self.check_tensors()
        outputs = {}
        if self.tensors:
            from safetensors.torch import save as to_bytes

            data = to_bytes({k: t.detach().contiguous().cpu() for k, t in sorted(self.tensors.items())})
            ref["sha256"] = hashlib.sha256(data).hexdigest()
            outputs[beside] = data
        outputs[path] = to_json(doc)  # last: it names the tensors file's sha256
        write_files(outputs, check=(lambda: free_tensors_path(path)) if self.tensors else None)

    @classmethod
    def from_dict(cls, doc, where: str = "plan") -> "Plan":
        """A Plan from a plan document (validated first: one clear error naming the field)."""
        validate(doc, where)
        return cls(model=dict(doc["model"]), budget=doc["budget"], method=dict(doc["method"]),
                   projections=[PlanEntry.from_dict(e) for e in doc["projections"]],
                   source=copy.deepcopy(doc.get("source")), calibration=copy.deepcopy(doc["calibration"]),
                   score=doc.get("score", "magnitude"), compensation=doc.get("compensation", "none"),
                   tool_version=doc["tool_version"], created=doc["created"])

    def to_dict(self, tensors_ref: dict | None = None) -> dict:
        """The plan document (validated), as written to plan.json; ``tensors_ref`` names the tensors file."""
        doc = {"format": FORMAT, "version": VERSION, "tool_version": self.tool_version, "created": self.created,
               "model": {k: self.model.get(k) for k in MODEL_KEYS}, "budget": float(self.budget),
               "method": dict(self.method), "score": self.score, "compensation": self.compensation,
               "projections": [e.to_dict() for e in self.projections],
               "calibration": copy.deepcopy(self.calibration), "tensors": tensors_ref}
        if self.source is not None:
            doc["source"] = copy.deepcopy(self.source)
        return validate(_ordered(doc))

    def check_tensors(self, where: str = "plan") -> None:
        """The tensors are exactly those the plan's score and compensation declare (``tensor_names``), each
        named ``<key>.<name>`` for a projection of the plan, float32, finite (score weights also >= 0), of the
        shape its name implies (score [in], bias [out], lowrank_u [out, rank], lowrank_v [rank, in]): one line
        naming the tensor."""
        entries = {e.key: e for e in self.projections}
        for name, t in self.tensors.items():
            key, _, kind = name.rpartition(".")
            e = entries.get(key)
            if e is None or kind not in TENSORS:
                raise ActTailError(f"{where}: tensor {name!r} names no projection of the plan "
                                   f"(expected <key>.{{{','.join(TENSORS)}}})")
            if kind not in self.tensor_names(e):
                raise ActTailError(f"{where}: tensor {name} does not belong in a plan with score {self.score!r} "
                                   f"and compensation {self.compensation!r}" + (f" (its rank is {e.rank})"
                                                                                if kind.startswith("lowrank") else ""))
            want = TENSORS[kind](e.in_features, e.out_features, e.rank)
            if tuple(t.shape) != want:
                raise ActTailError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {want}")
            if t.dtype != torch.float32:
                raise ActTailError(f"{where}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, expected float32")
            if not torch.isfinite(t).all():
                raise ActTailError(f"{where}: tensor {name} holds NaN or infinite values")
            if kind == "score" and bool((t < 0).any()):  # norms and mean |gradients|: |x_i| s_i ranks by size
                raise ActTailError(f"{where}: tensor {name} holds negative score weights (a score is |x_i| s_i, "
                                   "s_i >= 0)")
        for e in self.projections:
            for kind in self.tensor_names(e):
                if f"{e.key}.{kind}" not in self.tensors:
                    raise ActTailError(f"{where}: tensor {e.key}.{kind} is missing (a plan with score {self.score!r} "
                                       f"and compensation {self.compensation!r} has one for every projection"
                                       + (" of rank > 0)" if kind.startswith("lowrank") else ")"))

    def tensor_names(self, e: PlanEntry) -> tuple[str, ...]:
        """The tensors an entry has under the plan's score and compensation: ``score`` for a weight or
        attribution score, ``bias`` for learned compensation, ``lowrank_u`` and ``lowrank_v`` for low rank
        (rank > 0)."""
        names = ("score",) if self.score != "magnitude" else ()
        if self.compensation == "learned":
            names += ("bias",)
        if self.compensation == "lowrank" and e.rank > 0:
            names += ("lowrank_u", "lowrank_v")
        return names

    def tensor(self, key: str, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"{key}.{name}")

    def check_model(self, fingerprint: str, where: str = "plan") -> None:
        """Refuse a plan made for other weights."""
        check_model(self.model["fingerprint"], fingerprint, where)

    def check_shapes(self, num_layers: int, shape, where: str = "the plan") -> None:
        """Refuse a plan that does not describe a model of ``num_layers`` layers whose projection (layer,
        kind) is ``shape(layer, kind)`` = (in, out) (None: the model has none), and tensors that do not
        match the plan (``check_tensors``). The one check of a plan against a model: ours
        (``runtime.sparsify.check_plan``) and transformers models (``runtime.hf``)."""
        if self.model["num_layers"] != num_layers:
            raise ActTailError(f"{where} is for {self.model['num_layers']} layers, the model has {num_layers}")
        for e in self.projections:
            got = shape(e.layer, e.kind)
            if got != (e.in_features, e.out_features):
                raise ActTailError(f"{where}: {e.key} is {got} (in, out) in the model but "
                                   f"{(e.in_features, e.out_features)} in the plan")
        self.check_tensors(where)

    # ---- reading -----------------------------------------------------------------------------------

    def entry(self, layer: int, kind: str) -> PlanEntry:
        for e in self.projections:
            if e.layer == layer and e.kind == kind:
                return e
        raise KeyError(str(Key(layer, kind)))

    @property
    def calibrated(self) -> bool:
        """True when every projection has a threshold."""
        return all(e.threshold is not None for e in self.projections)

    @property
    def weighted_sparsity(self) -> float:
        return weighted_sparsity(self.projections)

    @property
    def weighted_saving(self) -> float:
        """Fraction of projection bytes not read per token, net of what compensation adds."""
        total = sum(e.params for e in self.projections)
        return sum((e.sparsity - e.overhead) * e.params for e in self.projections) / total

    def sparsities(self) -> dict[tuple[int, str], float]:
        return {(e.layer, e.kind): e.sparsity for e in self.projections}

    def thresholds(self) -> dict[tuple[int, str], float | None]:
        return {(e.layer, e.kind): e.threshold for e in self.projections}

    # ---- building ----------------------------------------------------------------------------------

    def with_thresholds(self, thresholds: dict[str, float], stats: dict[str, dict] | None = None,
                        calibration: dict | None = None) -> "Plan":
        """A copy with a threshold (and optional statistics) for every projection.

        ``thresholds`` and ``stats`` map projection keys ("layers.3.up") to a threshold >= 0 and to a dict
        of statistics (e.g. {"achieved_sparsity": 0.49, "n_tokens": 4096}); ``calibration`` describes the run.
        """
        keys = {e.key for e in self.projections}
        unknown = sorted(set(thresholds) - keys) + sorted(set(stats or {}) - keys)
        if unknown:
            raise ActTailError(f"thresholds for projections not in the plan: {', '.join(unknown[:5])}")
        missing = sorted(keys - set(thresholds), key=lambda k: Key.parse(k).order)
        if missing:
            raise ActTailError(f"no threshold for {len(missing)} projections, e.g. {', '.join(missing[:5])}")
        entries = []
        for e in self.projections:
            t = thresholds[e.key]
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
                raise ActTailError(f"threshold for {e.key} must be a finite number >= 0, got {t!r}")
            stat = dict(stats[e.key]) if stats is not None and e.key in stats else e.calibration
            entries.append(replace(e, threshold=float(t), calibration=stat))
        out = replace(self, projections=entries,
                      calibration=dict(calibration) if calibration is not None else self.calibration)
        out.to_dict()  # validates
        return out

    # ---- summaries ---------------------------------------------------------------------------------

    def summary(self) -> dict:
        """Sparsity per kind and per layer (parameter-weighted mean, min, max) and the overall mean."""
        entries = self.projections
        by_layer, by_kind = defaultdict(list), defaultdict(list)  # one pass: linear in the number of entries
        for e in entries:
            by_layer[e.layer].append(e)
            by_kind[e.kind].append(e)
        per_layer = [{"layer": layer, **_stats(es), "by_kind": {e.kind: e.sparsity for e in es}}
                     for layer, es in sorted(by_layer.items())]
        return {
            "budget": self.budget,
            "weighted_sparsity": weighted_sparsity(entries),
            "calibrated": self.calibrated,
            "overall": _stats(entries),
            "per_kind": {k: _stats(by_kind[k]) for k in KINDS if k in by_kind},
            "per_layer": per_layer,
        }

    def format_summary(self) -> str:
        """A readable text summary for ``acttail plan show``."""
        s, m, meth = self.summary(), self.model, self.method
        params = ", ".join(f"{k}={v}" for k, v in meth.items() if k != "name")
        lines = [
            f"model      {m['path']}  ({m['architecture']}, {m['num_layers']} layers, fingerprint {m['fingerprint']})",
            f"method     {meth['name']}  ({params})",
            f"budget     {self.budget:.4f}   weighted mean sparsity {s['weighted_sparsity']:.6f}",
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


def weighted_sparsity(entries: list[PlanEntry]) -> float:
    """Parameter-weighted mean sparsity of some plan entries."""
    total = sum(e.params for e in entries)
    return sum(e.sparsity * e.params for e in entries) / total


def _stats(entries: list[PlanEntry]) -> dict:
    s = [e.sparsity for e in entries]
    t = [e.threshold for e in entries if e.threshold is not None]
    achieved = [(e.calibration or {}).get("achieved_sparsity") for e in entries]
    params = sum(e.params for e in entries)
    return {
        "n": len(entries),
        "params": params,
        "mean": weighted_sparsity(entries),
        "achieved": (sum(a * e.params for a, e in zip(achieved, entries)) / params
                     if all(a is not None for a in achieved) else None),
        "min": min(s),
        "max": max(s),
        "threshold_min": min(t) if t else None,
        "threshold_max": max(t) if t else None,
    }


# ---- validation of plan documents -------------------------------------------------------------------


def validate(plan, where: str = "plan") -> dict:
    """Check format, version, schema and consistency; raise one clear ActTailError naming the field."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        found = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise ActTailError(f"{where} is not an acttail plan (format is {found!r}, expected {FORMAT!r})")
    if type(plan.get("version")) is not int or plan["version"] not in READS:  # 1.0 and True equal 1 in Python
        raise ActTailError(f"{where} has plan version {plan.get('version')!r}; acttail {__version__} reads "
                           f"versions {', '.join(map(str, READS))} (integers)")
    check_schema(plan, "plan", where)  # also refuses NaN and infinities, which "number" admits
    _check_consistency(plan, where)
    return plan


def _check_consistency(plan: dict, where: str) -> None:
    """What a schema cannot say: every projection of the model once, keys agreeing with layer and kind, and
    each entry's rank and overhead what the plan's compensation makes of them."""
    check_projections(plan["projections"], plan["model"]["num_layers"], where)
    compensation = plan.get("compensation", "none")
    rotation = rotation_overheads(plan["projections"], plan["model"].get("rotation"))
    split = plan["method"].get("rank_split")
    split = split if isinstance(split, int) and not isinstance(split, bool) else 0
    for i, e in enumerate(plan["projections"]):
        at, shape, rank = f"{where}: field $.projections[{i}]", (e["in_features"], e["out_features"]), e.get("rank", 0)
        if rank > min(shape):
            raise ActTailError(f"{at}.rank: {rank} exceeds the projection's smaller side, {min(shape)}")
        if rank and compensation != "lowrank" and not (compensation == "none" and rank <= split):
            raise ActTailError(f"{at}.rank: {rank}, but the plan's compensation is {compensation!r}: a rank needs "
                               "lowrank factors (or, before calibration, an allocation's rank_split at least as large)")
        cost = overhead(shape, compensation, rank)
        turn = rotation.get((e["layer"], e["kind"]), 0.0) if plan.get("calibration") else 0.0
        if not math.isclose(e.get("overhead", 0.0), cost + turn, rel_tol=1e-9, abs_tol=1e-12):
            paid = f" and the layer's basis change {turn:.6g}" if turn else ""
            raise ActTailError(f"{at}.overhead: {e.get('overhead', 0.0)}, but {compensation!r} compensation of a "
                               f"{shape[0]} x {shape[1]} projection at rank {rank} costs {cost:.6g}{paid}")


def overhead(shape: tuple[int, int], compensation: str, rank: int = 0) -> float:
    """What a compensation reads per token, as a fraction of the projection's weight (in x out): an entry's
    ``overhead`` (learned: out biases; lowrank: r (in + out) factor values)."""
    n_in, n_out = shape
    if compensation == "learned":
        return 1.0 / n_in
    if compensation == "lowrank":
        return min(rank, n_in, n_out) * (n_in + n_out) / (n_in * n_out)
    return 0.0


def rotation_overheads(projections, rotation: str | None) -> dict[tuple[int, str], float]:
    """(layer, kind) -> what the projection pays for its layer's basis change in a rotated checkpoint
    (``acttail.rotation``: a d x d matrix read per token before every layer but the first), as a fraction of its
    weight: d^2 over the layer's projection weights, the same on each, so the layer pays its own. ``projections``:
    the plan document's entries; {} when ``rotation`` is None."""
    if not rotation:
        return {}
    params, dim = defaultdict(int), {}
    for e in projections:
        params[e["layer"]] += e["in_features"] * e["out_features"]
        if e["kind"] == "q":
            dim[e["layer"]] = e["in_features"]
    return {(e["layer"], e["kind"]): dim[e["layer"]] ** 2 / params[e["layer"]] for e in projections if e["layer"] > 0}


def _ordered(plan: dict) -> dict:
    """The plan with its keys in the documented order, projections in layer/kind order."""
    out = {k: plan[k] for k in TOP_KEYS if k in plan}
    out.update({k: v for k, v in plan.items() if k not in out})
    out["projections"] = sorted(
        ({**{k: e[k] for k in ENTRY_KEYS if k in e}, **{k: v for k, v in e.items() if k not in ENTRY_KEYS}}
         for e in out["projections"]), key=lambda e: Key(e["layer"], e["kind"]).order)
    return out
