"""The plan -> kernel-launch mapping, in one place: what a decode step of one projection group passes the
sparse kernel, and whether the group runs sparse at all.

A ``Launch`` is built once when a plan is applied, from the plan's runtime settings (``sparsify.settings``)
for the projections that share one input-major weight (a group of our decoder: q/k/v, o, gate/up, down; or
one Linear of a transformers model): the thresholds on the device (threshold mode) or the keep counts (topk
mode), one fp32 epilogue bias (the Linear's own bias plus the learned biases), the low-rank factors, its
own ticket counters, and the kernel's launch fixed (``kernels.PreparedLaunch``). The GPU decoder
(``kernel_ops.KernelOps``) and ``acttail.apply`` on transformers models both build their launches here, so
one plan runs the same way through both.

The dispatch rule (``kernels.use_sparse``): a group runs sparse at a batch size when its planned sparsity
(weighted by the projections' widths) pays for the kernel there; else the caller runs it dense (its own
weights, no compensation, as the reference does on positions it does not sparsify).

Inside torch.compile a launch is one opaque custom op, ``acttail::launch(x, key)``, that finds its ``Launch``
by an integer key (``run``): the compiled graph holds no tensor, setting or object of the launch, so dynamo
guards one integer per launch instead of its weights, thresholds, biases, counters and settings (about a
hundred checks a layer that every compiled call evaluates: a millisecond a 7B token).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from acttail.kernels import (MAX_BATCH, PreparedLaunch, new_locks, quantize, sparse_glu,
                             sparse_linear, topk_thresholds, use_sparse)
from acttail.kernels.ops import IN_GRAPH  # inside a compiled graph: no programmatic dependent launch

from ..errors import ActTailError
from .ops import ACTIVATIONS
from .sparsify import ProjectionSparsity, compensation_term

ALL_ROWS = 1 << 30  # the keep count of a projection a topk launch leaves dense

_BY_KEY: "weakref.WeakValueDictionary[int, Launch]" = weakref.WeakValueDictionary()  # live launches
_KEYS = itertools.count(1)


class Launch:
    """The sparse kernel launch of the projections ``kinds`` of ``layer`` sharing x and the input-major
    weights ``wt`` [in, sum of widths]; with ``act`` the pair (gate, up) returns act(gate) * up.

    ``runs_sparse(B)`` is the dispatch rule's answer at batch size B; calling it computes the group's output
    [B, widths] (or [B, width of one] for act) of x [B, in].

    ``weights`` "int8", "int4" or "q4_1" (``layout.WEIGHT_FORMATS``): the launch reads its own quantized copy of wt
    (``kernels.quantize``) and runs at every batch size, a group left dense reading every row: the dense
    alternative of the same bytes is this kernel, not cuBLAS on fp16."""

    def __init__(self, layer: int, kinds: tuple[str, ...], wt: Tensor, widths: tuple[int, ...],
                 found: list[ProjectionSparsity | None], sparsity: float | None, bias: Tensor | None = None,
                 act: str | None = None, config: dict | None = None, weights: str | None = None):
        self.layer, self.kinds, self.widths, self.act = layer, kinds, tuple(widths), act
        dev = wt.device
        self.keeps = None if all(s is None or s.keep is None for s in found) else \
            [s.keep if s is not None and s.keep is not None else ALL_ROWS for s in found]
        thresholds = None if self.keeps is not None else torch.tensor(
            [s.threshold if s is not None and s.threshold is not None else -1.0 for s in found],
            dtype=torch.float32, device=dev)
        self.lowrank = [_on(dev, s.lowrank) if s is not None and s.lowrank is not None else None for s in found]
        if not any(self.lowrank):
            self.lowrank = None
        learned = [s.bias if s is not None else None for s in found]
        self.bias = _epilogue_bias(bias, learned, self.widths, dev, self.lowrank is None)
        self.own_bias = bias.float() if bias is not None and self.lowrank is not None else None
        glu = act if act in ("silu", "gelu_tanh") and self.lowrank is None else None
        n = wt.shape[1]
        scales = group = None
        if weights is not None:
            wt, scales, group = quantize(wt, weights)
        self.kernel = PreparedLaunch(wt, thresholds, None if glu else self.widths, act=glu,
                                     bias=self.bias if self.lowrank is None else None,
                                     locks=new_locks(dev, n // 16 + 3), config=config, scales=scales, group=group)
        self._in_graph_config = {**(config or {}), **IN_GRAPH}
        nbytes = wt.numel() * wt.element_size()
        self.sparse_at = tuple(weights is not None or sparsity is None or use_sparse(sparsity, b, nbytes)
                               for b in range(1, MAX_BATCH + 1))
        self.out_features = self.widths[0] if act is not None else sum(self.widths)
        self.key = next(_KEYS)
        _BY_KEY[self.key] = self

    def runs_sparse(self, batch: int) -> bool:
        """The dispatch rule at batch size ``batch`` (``sparse_at[batch - 1]``; False beyond MAX_BATCH)."""
        return 1 <= batch <= MAX_BATCH and self.sparse_at[batch - 1]

    @property
    def fuses_norm(self) -> bool:
        """Can the block's residual add + RMSNorm run inside this launch? (Fixed thresholds, biases alone.)"""
        return self.keeps is None and self.lowrank is None

    def __call__(self, x: Tensor, norm=None, residual=None, residual_out=None) -> Tensor:
        if torch.compiler.is_compiling():  # torch.compile: one opaque custom op
            return launch_op(x, self.key)
        t = topk_thresholds(x, self.keeps) if self.keeps is not None else None
        y = self.kernel(x, t, norm=norm, residual=residual, residual_out=residual_out)
        return y if self.lowrank is None else self._compensated(x, y, t)

    def in_graph(self, x: Tensor) -> Tensor:
        """The output on x as ``acttail::launch`` computes it inside a compiled graph: the same kernel with the
        same tensors and counters, launched without programmatic dependent launch, through the one-shot entry
        points (host time at capture only): a prepared launch keeps scratch buffers from its first call, which
        inside inductor's CUDA-graph warm-up would stay alive in the graphs' memory pool, and inductor refuses
        a pool holding allocations that are no output."""
        k = self.kernel
        t = topk_thresholds(x, self.keeps) if self.keeps is not None else k.thresholds
        q = dict(config=self._in_graph_config, bias=k.bias, locks=k.locks, scales=k.scales, group=k.group)
        if k.glu:
            return sparse_glu(x, k.wt, t, k.act, **q)
        y = sparse_linear(x, k.wt, t, self.widths, **q)
        return y if self.lowrank is None else self._compensated(x, y, t)

    def _compensated(self, x: Tensor, y: Tensor, t: Tensor | None) -> Tensor:
        """y plus the Linear's own bias and each projection's learned bias and low-rank term U (V x_dropped),
        in fp32, then act(gate) * up for a gate/up pair; rounded once to x's dtype."""
        t = self.kernel.thresholds if t is None else t
        y = y.float() if self.own_bias is None else y.float() + self.own_bias
        outs, col = [], 0
        for p, (width, lowrank) in enumerate(zip(self.widths, self.lowrank)):
            bias = None if self.bias is None else self.bias[col:col + width]
            outs.append(y[:, col:col + width] + compensation_term(x, t[p], bias, lowrank))
            col += width
        if self.act is not None:
            return (ACTIVATIONS[self.act](outs[0]) * outs[1]).to(x.dtype)
        return torch.cat(outs, dim=-1).to(x.dtype)


def run(key: int, x: Tensor) -> Tensor:
    """The output of launch ``key`` (``Launch.key``) on x [B, in]: inside torch.compile the custom op, which
    dynamo guards by the key alone; eagerly the launch itself."""
    if torch.compiler.is_compiling():
        return launch_op(x, key)
    return _launch(key)(x)


@torch.library.custom_op("acttail::launch", mutates_args=())
def launch_op(x: Tensor, key: int) -> Tensor:
    """``Launch`` ``key``'s output on x (the launch's split-K counters end as they began: no mutation to declare)."""
    return _launch(key).in_graph(x)


@launch_op.register_fake
def _(x, key):
    return x.new_empty(x.shape[0], _launch(key).out_features)


def _launch(key: int) -> Launch:
    launch = _BY_KEY.get(key)
    if launch is None:
        raise ActTailError(f"launch {key} is gone: its plan was removed (a graph compiled with it cannot run)")
    return launch


def launch_for(layer: int, kinds: tuple[str, ...], wt: Tensor, widths, sets: dict, planned: dict | None,
               bias: Tensor | None = None, act: str | None = None, config: dict | None = None,
               weights: str | None = None) -> Launch | None:
    """The ``Launch`` of a plan's settings ``sets`` {(layer, kind): ProjectionSparsity} for one group, or None
    when none of its projections is sparsified (and ``weights`` is None). ``planned`` {(layer, kind): sparsity}
    drives the dispatch rule (their mean weighted by ``widths``); None: always sparse (benchmarks timing the
    kernel itself). Score weights are refused: the kernel ranks inputs by |x|. ``config``: kernel launch
    settings over ``kernels.pick_config``'s (benchmarks comparing launch rules). ``weights``: a quantized
    format (see ``Launch``; the caller checks it)."""
    found = [sets.get((layer, k)) for k in kinds]
    if not any(found) and weights is None:
        return None
    if any(s is not None and s.score is not None for s in found):
        raise ActTailError("the kernel backend ranks inputs by |x|: a plan with score weights runs on the reference "
                           "backend (--backend reference)")
    return Launch(layer, kinds, wt, widths, found, planned_sparsity(layer, kinds, widths, planned), bias, act, config,
                  weights)


def planned_sparsity(layer: int, kinds, widths, planned: dict | None) -> float | None:
    """The group's planned sparsity, its projections' weighted by their widths (None: no plan to go by)."""
    if planned is None:
        return None
    return sum(planned.get((layer, k), 0.0) * w for k, w in zip(kinds, widths)) / sum(widths)


def ever_sparse(sparsity: float | None, nbytes: int) -> bool:
    """Does the dispatch rule run a group of this planned sparsity and weight size sparse at any batch size?"""
    return sparsity is None or any(use_sparse(sparsity, b, nbytes) for b in range(1, MAX_BATCH + 1))


def _on(dev, lowrank):
    return tuple(t.to(dev, torch.float32) for t in lowrank)


def _epilogue_bias(own, learned, widths, dev, in_kernel: bool) -> Tensor | None:
    """The fp32 vector the kernel adds in its epilogue: the Linear's own bias plus the learned biases (zeros
    where a projection has none); None when there is neither, or when a low-rank term needs them added
    beside the kernel (``Launch._compensated`` reads the learned part from it then)."""
    if own is None and not any(b is not None for b in learned):
        return None
    parts = [b.to(dev, torch.float32) if b is not None else torch.zeros(w, device=dev) for b, w in zip(learned, widths)]
    total = torch.cat(parts)
    if in_kernel and own is not None:
        total = total + own.to(dev, torch.float32)
    return total.contiguous()
