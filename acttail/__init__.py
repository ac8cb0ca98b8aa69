"""ActTail: per-projection activation sparsity allocated from weight-spectrum heavy tails.

The Python API (see README, "Python API"): ``analyze`` -> ``Analysis``, ``allocate`` -> ``Plan``,
``calibrate``, ``apply`` (returns a removable handle), ``decoder`` (the fast kernel decoder), ``evaluate``, ``tune`` (the largest budget within a
perplexity bound); ``load`` opens a model folder as our
decoder. ``AllocationConfig`` holds the allocation defaults.

The API names are imported on first use (PEP 562), so ``import acttail.kernels`` or
``acttail.runtime.cuda`` does not pull in the plan and API stack (jsonschema, the analysis code): a GPU
machine can run the kernels and the decode benchmarks with torch and triton alone.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"AllocationConfig": ".allocation", "Analysis": ".analysis", "ActTailError": ".errors",
         "Plan": ".plan", "PlanEntry": ".plan", "allocate": ".api", "analyze": ".api", "apply": ".api",
         "calibrate": ".api", "decoder": ".api", "evaluate": ".api", "load": ".api", "tune": ".api"}

__all__ = ["ActTailError", "AllocationConfig", "Analysis", "Plan", "PlanEntry", "allocate", "analyze", "apply",
           "calibrate", "decoder", "evaluate", "load", "tune", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
