"""ActTail: per-projection activation sparsity allocated from weight-spectrum heavy tails.

The Python API (``acttail.api``; README, "Python API"), one verb per stage: ``download`` and
``convert_gguf`` (models and texts), ``analyze`` -> ``Analysis``, ``measure_greedy`` and
``measure_sensitivity`` (what the default allocations measure), ``allocate`` -> ``Plan``, ``export_plan``,
``calibrate``, ``tune`` (the largest budget within a perplexity bound), ``apply`` (returns a removable
handle), ``evaluate``, ``generate``, ``write_report``; ``load`` opens a model folder as our decoder. Each
stage's defaults live once in its config dataclass (``AllocationConfig``, ``CalibrationConfig``, ...).

The API names are imported on first use (PEP 562), so ``import acttail.kernels`` or
``acttail.runtime.decoder`` does not pull in the plan and API stack (jsonschema, the analysis code): a GPU
machine can run the kernels and the decode benchmarks with torch and triton alone.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_VERBS = ("allocate", "analyze", "apply", "calibrate", "decoder", "download", "evaluate", "export_plan", "generate", "load",
          "measure_greedy", "measure_sensitivity", "rotate", "tune", "write_report")
_LAZY = {"ActTailError": ".errors", "ActTailWarning": ".errors", "AllocationConfig": ".allocation",
         "Analysis": ".analysis", "AnalysisConfig": ".analysis", "CalibrationConfig": ".calibration",
         "EvalConfig": ".evaluation", "GenerateConfig": ".api", "GreedyConfig": ".greedy", "Plan": ".plan",
         "PlanEntry": ".plan", "RotationConfig": ".rotation", "SensitivityConfig": ".sensitivity", "TuneConfig": ".tuning",
         "convert_gguf": ".convert", **{verb: ".api" for verb in _VERBS}}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
