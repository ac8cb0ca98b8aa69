"""The ops a decoder block computes with: its projections, norms and attention (``model.py``'s block calls
only these). ``TorchOps`` is the reference, in plain torch; ``kernel_ops.KernelOps`` runs decode steps
through the Triton kernels and everything else through this.

A block hands the residual add to the next norm (``norm_linear``, ``add_norm``), as vLLM does, so that
kernels can fuse residual add + RMSNorm + projection into one launch; here the add is just x + residual.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import GROUPS
from .sparsify import PerThread, Sparsifier

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}  # of the MLP's gate


class TorchOps:
    """The reference ops: projections through ``sparsifier`` (it zeroes the inputs a plan says, counts what
    it zeroed and lets calibration watch each group's input), the model's RMSNorm modules, torch attention.

    ``installed`` is the Sparsifier of every thread (``acttail.apply`` sets it); ``using(sp)`` gives the
    calling thread another one for a while (``Transformer.sparsified``), leaving other threads as they were."""

    def __init__(self, sparsifier: Sparsifier | None = None):
        self.installed = sparsifier if sparsifier is not None else Sparsifier.dense()
        self._local = PerThread()  # .sparsifier: this thread's, inside using()

    @property
    def sparsifier(self) -> Sparsifier:
        """The Sparsifier this thread projects with now."""
        mine = getattr(self._local, "sparsifier", None)
        return self.installed if mine is None else mine

    @contextmanager
    def using(self, sparsifier: Sparsifier):
        """This thread projects with ``sparsifier`` inside the block; what it had before comes back after."""
        outer = getattr(self._local, "sparsifier", None)
        self._local.sparsifier = sparsifier
        try:
            yield sparsifier
        finally:
            self._local.sparsifier = outer

    def set_positions(self, pos: Tensor) -> None:
        """The token positions [T] of the batch about to run (the prefill policy reads them)."""
        self.sparsifier.set_positions(pos)

    def linear(self, layer: int, group: str, x: Tensor, linear: nn.Linear, sizes=None) -> Tensor:
        """The projections of ``group`` (layout.GROUPS) of x, concatenated; ``linear`` holds their weights
        stacked, ``sizes`` rows each."""
        return self.sparsifier.project(layer, GROUPS[group], x, linear, sizes)

    def norm_linear(self, layer: int, group: str, x: Tensor, residual: Tensor | None, norm: nn.Module,
                    linear: nn.Linear, sizes=None, act: str | None = None) -> tuple[Tensor, Tensor]:
        """(the group's projections of norm(x + residual), x + residual: the residual stream); with ``act``
        the two halves of the output (gate | up) become act(gate) * up."""
        if residual is not None:
            x = x + residual
        y = self.linear(layer, group, norm(x), linear, sizes)
        if act is not None:
            gate, up = y.chunk(2, dim=-1)
            y = ACTIVATIONS[act](gate) * up
        return y, x

    def norm(self, norm: nn.Module | None, x: Tensor) -> Tensor:
        """norm(x), or x where the block has no such norm (the sandwich norms of Gemma 2/3 only)."""
        return x if norm is None else norm(x)

    def add_norm(self, norm: nn.Module, x: Tensor, residual: Tensor | None) -> Tensor:
        """norm(x + residual): the final norm of the last block's stream."""
        return norm(x if residual is None else x + residual)

    def attention(self, attn: nn.Module, qkv: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor | None) -> Tensor:
        """The layer's attention on its projected q/k/v (``model.Attention.forward``)."""
        return attn(qkv, rope, input_pos)
