"""What every stage's configuration shares: the ``updated`` copy of its defaults, and the defaults that
several stages use alike.

Each stage holds its own defaults once, in a frozen dataclass beside its code (``AllocationConfig``,
``CalibrationConfig``, ``EvalConfig``, ``GreedyConfig``, ``SensitivityConfig``, ``TuneConfig``); the API verbs
take one as ``config=`` plus keyword overrides, and the command line reads its option defaults from them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import ClassVar

from .errors import ActTailError

CTX = 512  # tokens per window wherever a stage reads text (calibration, evaluation, greedy, sensitivity)
CALIBRATION_TEXT = "c4"  # the text measurements are taken on (never the evaluation text: wiki)
DEVICE = "cpu"  # where a model opened from a folder runs


class Config:
    """A frozen dataclass of defaults; ``updated(**options)`` is a copy with some fields changed."""

    stage: ClassVar[str] = "stage"  # named in the error for an unknown option

    def updated(self, **options):
        """A copy with some fields changed; an unknown option is an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ActTailError(f"unknown {self.stage} option(s) {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(names))})")
        return replace(self, **options)
