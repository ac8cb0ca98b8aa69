"""ActTail: per-projection activation sparsity allocated from weight-spectrum heavy tails.

The Python API (see README, "Python API"): ``analyze`` -> ``Analysis``, ``allocate`` -> ``Plan``,
``calibrate``, ``apply`` (returns a removable handle), ``evaluate``; ``load`` opens a model folder as our
decoder. ``AllocationConfig`` holds the allocation defaults.
"""

__version__ = "0.1.0"

from .allocation import AllocationConfig  # noqa: E402
from .analysis import Analysis  # noqa: E402
from .api import allocate, analyze, apply, calibrate, evaluate, load  # noqa: E402
from .errors import ActTailError  # noqa: E402
from .plan import Plan, PlanEntry  # noqa: E402

__all__ = ["ActTailError", "AllocationConfig", "Analysis", "Plan", "PlanEntry", "allocate", "analyze", "apply",
           "calibrate", "evaluate", "load", "__version__"]
