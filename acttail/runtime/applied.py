"""The handle of a plan applied to a model (``acttail.apply``): one class for our decoder and for transformers
models, and the registry that finds it (no attribute is attached to the model).

Threads may share an applied model: ``dense()`` switches the plan off for the calling thread only, and
``counting()`` counts one call's zeros apart from the others' (what ``acttail.evaluate`` reports)."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from torch import nn

from ..errors import ActTailError
from .sparsify import MODE, PerThread, Sparsifier, check_plan

_APPLIED: "weakref.WeakKeyDictionary[nn.Module, Applied]" = weakref.WeakKeyDictionary()
_REGISTRY = threading.Lock()  # two threads applying plans to one model at once: one of them is refused


class Applied:
    """``plan`` applied to ``model`` in ``mode``: ``remove()`` (or the end of a ``with`` block) puts the model
    back as it was; ``dense()`` is a context in which it runs dense (the reference run of a comparison);
    ``achieved()`` the sparsity measured per projection (layer, kind) since ``reset_counts()`` (inputs of the
    reference path; the kernels do not count). ``dense_run``: the context that makes ``model`` dense in this
    thread, for a model whose forwards do not read ``enabled`` (ours). ``compiled_switch(on)``: told whether
    compiled graphs run the plan (False while a ``dense()`` block is open in any thread), for forwards that
    keep that flag where torch.compile reads it cheaply (transformers models)."""

    def __init__(self, model: nn.Module, sparsifier: Sparsifier, undo: Callable[[], None], plan=None,
                 mode: str = MODE, dense_run: Callable | None = None,
                 compiled_switch: Callable[[bool], None] | None = None):
        self.model, self.sparsifier, self.plan, self.mode = model, sparsifier, plan, mode
        self.launches: dict = {}  # (layer, group) -> Launch, where decode steps run the kernels
        self._undo, self._dense_run, self._switch = undo, dense_run, compiled_switch
        self._local = PerThread()  # .dense: inside dense() in this thread
        self._dense_blocks, self._lock = 0, threading.Lock()  # dense() blocks open in any thread
        with _REGISTRY:  # the check and the claim in one step: the model is patched only after this
            if _APPLIED.get(model) is not None:
                raise ActTailError("a plan is already applied to this model: remove() it first")
            _APPLIED[model] = self

    @property
    def enabled(self) -> bool:
        """Whether the plan runs now: not inside ``dense()`` in this thread (inside a torch.compile graph,
        which cannot read per-thread state: not inside ``dense()`` in any thread)."""
        if torch.compiler.is_compiling():
            return self._dense_blocks == 0
        return not getattr(self._local, "dense", False)

    def achieved(self) -> dict:
        return self.sparsifier.achieved()

    def reset_counts(self) -> None:
        self.sparsifier.reset_counts()

    def counting(self):
        """A context whose ``Counts`` (yielded) hold what this thread runs inside it (``Sparsifier.counting``)."""
        return self.sparsifier.counting()

    @contextmanager
    def dense(self):
        """Run the model dense inside the block (same weights, nothing zeroed) in this thread, sparse again
        after it; other threads keep the plan."""
        outer = getattr(self._local, "dense", False)
        self._local.dense = True
        self._count_dense(+1)
        try:
            with self._dense_run() if self._dense_run is not None else nullcontext():
                yield self
        finally:
            self._local.dense = outer
            self._count_dense(-1)

    def _count_dense(self, step: int) -> None:
        with self._lock:
            self._dense_blocks += step
            if self._switch is not None:
                self._switch(self._dense_blocks == 0)

    def remove(self) -> None:
        with _REGISTRY:
            mine = _APPLIED.get(self.model) is self
            if mine:
                del _APPLIED[self.model]
        if mine:
            self._undo()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def applied(model: nn.Module) -> Applied | None:
    """The plan applied to ``model`` now, if any."""
    return _APPLIED.get(model)


def apply_ours(model, plan, mode: str = MODE) -> Applied:
    """Our decoder: its blocks run with the plan's Sparsifier in every thread until the handle is removed
    (whatever sparsifier was installed before comes back then); a plan for another shape is refused."""
    from . import plan_sparsifier

    check_plan(plan, model.args)
    sp = plan_sparsifier(plan, mode)
    before = []

    def undo() -> None:
        model.ops.installed = before[0]

    handle = Applied(model, sp, undo, plan, mode, dense_run=lambda: model.sparsified(Sparsifier.dense()))
    before.append(model.ops.installed)  # installed only once the model is claimed (Applied refuses a second plan)
    model.ops.installed = sp
    return handle
