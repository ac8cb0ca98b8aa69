"""Checks of the documents acttail reads (plans, analyses, measurements, eval results, config.json): against
the JSON Schema of their format, shipped in ``schemas/``, and against the weights they were made for (their
fingerprint)."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import jsonschema
import referencing

from .errors import ActTailError

SCHEMAS = Path(__file__).parent / "schemas"


@lru_cache(maxsize=None)
def schema(name: str) -> dict:
    """The JSON Schema of a file format, shipped in the package as ``schemas/<name>.schema.json``."""
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _registry() -> referencing.Registry:
    """Every shipped schema under its $id, so one format can embed another (the analysis' greedy section)."""
    docs = [schema(p.name.removesuffix(".schema.json")) for p in sorted(SCHEMAS.glob("*.schema.json"))]
    return referencing.Registry().with_resources((d["$id"], referencing.Resource.from_contents(d)) for d in docs)


# JSON Schema's "integer" admits 30.0; our readers index and count with these, so only true integers pass.
_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=(
    jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))))


def check_schema(doc, name: str, where: str) -> None:
    """One ActTailError naming the first field of ``doc`` that breaks schema ``name`` or is NaN/infinite."""
    bad = nonfinite_path(doc)
    if bad is not None:
        raise ActTailError(f"{where}: field {bad}: not a finite number (NaN or infinite)")
    error = jsonschema.exceptions.best_match(_Validator(schema(name), registry=_registry()).iter_errors(doc))
    if error is not None:
        message = error.message if len(error.message) < 160 else error.message[:157] + "..."
        raise ActTailError(f"{where}: field {error.json_path}: {message}")


def nonfinite_path(doc, path: str = "$") -> str | None:
    """The JSON path of the first NaN or infinite number in ``doc`` (JSON Schema's "number" admits them)."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return path
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        found = nonfinite_path(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}")
        if found is not None:
            return found
    return None


def check_model(found, fingerprint: str, where: str, refusal: str = "was made for another checkpoint", *,
                against: str = "this model", advice: str = "") -> None:
    """Refuse a document (plan, analysis, eval result, measurement) made for other weights: its fingerprint
    ``found`` must be ``fingerprint``, that of the weights it is used with (``against``: this model, the
    analysis). One line: "{where} {refusal} (fingerprint {found}, {against} has {fingerprint}){advice}"."""
    if found != fingerprint:
        raise ActTailError(f"{where} {refusal} (fingerprint {found}, {against} has {fingerprint}){advice}")
