"""The handle of a plan applied to a model (``acttail.apply``): one class for our decoder and for transformers
models, and the registry that finds it (no attribute is attached to the model)."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable

from torch import nn

from .sparsify import Sparsifier

_APPLIED: "weakref.WeakKeyDictionary[nn.Module, Applied]" = weakref.WeakKeyDictionary()


class Applied:
    """A plan applied to ``model``: ``remove()`` (or the end of a ``with`` block) puts the model back as it
    was; ``dense()`` is a context in which it runs dense (the reference run of a comparison); ``achieved()``
    the sparsity measured per projection (layer, kind) since ``reset_counts()`` (inputs of the reference
    path; the kernels do not count)."""

    def __init__(self, model: nn.Module, sparsifier: Sparsifier, undo: Callable[[], None],
                 switch: Callable[[bool], None] | None = None):
        self.model, self.sparsifier = model, sparsifier
        self.enabled = True
        self.launches: dict = {}  # (layer, group) -> Launch, where decode steps run the kernels
        self._undo, self._switch = undo, switch
        _APPLIED[model] = self

    def achieved(self) -> dict:
        return self.sparsifier.achieved()

    def reset_counts(self) -> None:
        self.sparsifier.reset_counts()

    @contextmanager
    def dense(self):
        """Run the model dense inside the block (same weights, nothing zeroed), sparse again after it."""
        kept = self.enabled
        self._set(False)
        try:
            yield self
        finally:
            self._set(kept)

    def _set(self, on: bool) -> None:
        self.enabled = on
        if self._switch is not None:
            self._switch(on)

    def remove(self) -> None:
        if _APPLIED.get(self.model) is self:
            del _APPLIED[self.model]
            self._undo()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def applied(model: nn.Module) -> Applied | None:
    """The plan applied to ``model`` now, if any."""
    return _APPLIED.get(model)


def apply_ours(model, plan, mode: str = "threshold") -> Applied:
    """Our decoder: run its blocks with the plan's Sparsifier until the handle is removed (whatever sparsifier
    was installed before comes back then)."""
    from . import plan_sparsifier

    sp = plan_sparsifier(plan, mode)
    context = model.sparsified(sp)
    context.__enter__()

    def switch(on: bool) -> None:
        model.ops.sparsifier = sp if on else Sparsifier.dense()

    return Applied(model, sp, lambda: context.__exit__(None, None, None), switch)
