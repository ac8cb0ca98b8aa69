"""The evaluation stage: perplexity of the dense or planned-sparse model on held-out text, its KL divergence
and top-1 agreement with the dense model, and the sparsity each projection achieved -> an eval result.

With a plan, every position of every window is sparsified (``prefill="all"``, what the accuracy study
measures) or the first half of each window stays dense (``"half"``: decoding after a dense prefill), and
every position is scored. The result is a JSON document (format ``acttail-eval``) that ``acttail report``
reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from . import __version__
from .config import CTX, Config
from .runtime import achieved_report, plan_sparsifier
from .runtime.perplexity import perplexity
from .runtime.sparsify import MODE, check_plan, dense_prefix

FORMAT, VERSION = "acttail-eval", 1


@dataclass(frozen=True)
class EvalConfig(Config):
    """How a model is evaluated; each field is an option of ``acttail eval``.

    tokens, ctx: the text's first ``tokens`` tokens, in windows of ``ctx``. mode: a plan's thresholds or its
    top-k counts. prefill: which positions a plan sparsifies (see the module docstring). batch_size:
    windows per forward pass.
    """

    tokens: int = 32768
    ctx: int = CTX
    mode: str = MODE
    prefill: str = "all"
    batch_size: int = 8
    stage = "evaluation"


def evaluate_windows(model, wins: torch.Tensor, plan=None, mode: str = EvalConfig.mode,
                     prefill: str = EvalConfig.prefill, batch_size: int = EvalConfig.batch_size,
                     progress: bool = True, compare: bool = True) -> dict:
    """Metrics of ``model`` (our decoder) on windows [n, ctx]: perplexity, nll, predictions; with a plan
    also kl and top1_agreement against the dense run (``compare``) and the achieved sparsity report."""
    if plan is None:
        return perplexity(model, wins, batch_size, progress)
    check_plan(plan, model.args)
    with model.sparsified(plan_sparsifier(plan, mode, "plan", dense_prefix(wins.shape[1], prefill))) as sp:
        out = perplexity(model, wins, batch_size, progress, compare=compare)
    out["achieved"] = achieved_report(plan, sp)
    return out


def result(model_ref: dict, settings: dict, metrics: dict, plan=None, plan_path=None) -> dict:
    """The eval result document: the model, the settings, the metrics and the plan it ran (or dense)."""
    out = {
        "format": FORMAT, "version": VERSION, "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_ref, "settings": settings,
        "perplexity": metrics["perplexity"], "nll": metrics["nll"], "predictions": metrics["predictions"],
        "kl": metrics.get("kl"), "top1_agreement": metrics.get("top1_agreement"),
        "plan": None, "achieved": metrics.get("achieved"),
    }
    if plan is not None:
        out["plan"] = {"path": str(plan_path) if plan_path else None, "budget": plan.budget, "method": plan.method,
                       "weighted_sparsity": plan.weighted_sparsity, "calibration": plan.calibration}
    return out
