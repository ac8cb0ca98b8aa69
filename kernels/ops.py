"""The sparse kernels as PyTorch custom operators (``torch.library.custom_op``): ``torch.ops.acttail.*``.

torch.compile (and so transformers' compiled static-cache decode) sees each as one opaque op with a fake
implementation for its output shape: dynamo never traces the Triton source, the graph does not break at a
projection, and inductor's CUDA graphs capture the launch as it is. CPU tensors run the torch reference
beside each kernel; CUDA tensors the Triton kernel.

- ``acttail::sparse_linear(x, wt, thresholds, splits, bias, locks) -> y``
- ``acttail::sparse_glu(x, wt, thresholds, act, bias, locks) -> act(gate) * up``
- ``acttail::topk_thresholds(x, keeps) -> [P, B] thresholds``

The split-K ticket counters ``locks`` are written during a launch and left zero again by its last program,
as every launch finds them: no caller can observe a change, so the ops declare no mutation (a declared one
would make inductor skip CUDA graphs or copy the counters around every call).

Inside a compiled graph the kernels launch without programmatic dependent launch (PDL): the kernels around
them there are inductor's and cuBLAS's, not ours.

Eager callers that launch the same weights many times use ``PreparedLaunch`` (launch.py) directly: calling
through the op adds the dispatcher's host time to every call. A plan applied to a model compiles to
``acttail::launch(x, key)`` instead (``acttail.runtime.launch``): that op holds its tensors itself, so the
compiled graph, and dynamo's guards, see none of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import launch

IN_GRAPH = {"pdl": False}  # launch settings inside a compiled graph: no programmatic dependent launch (see above)
from .sparse_gemv import sparse_glu_ref, sparse_linear_ref
from .topk import topk_thresholds as _topk_kernel, topk_thresholds_ref


@torch.library.custom_op("acttail::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, wt: Tensor, thresholds: Tensor, splits: Sequence[int], bias: Optional[Tensor],
                  locks: Tensor) -> Tensor:
    """y [B, N] = sparsify(x) @ wt (+ bias) for the projections of widths ``splits`` (``launch.sparse_linear``)."""
    if x.device.type == "cuda":
        return launch.sparse_linear(x, wt, thresholds, splits, bias=bias, locks=locks, config=IN_GRAPH)
    return sparse_linear_ref(x, wt, thresholds, splits, bias)


@sparse_linear.register_fake
def _(x, wt, thresholds, splits, bias, locks):
    return x.new_empty(x.shape[0], wt.shape[1])


@torch.library.custom_op("acttail::sparse_glu", mutates_args=())
def sparse_glu(x: Tensor, wt: Tensor, thresholds: Tensor, act: str, bias: Optional[Tensor], locks: Tensor) -> Tensor:
    """act(sparsify(x, t0) @ Wg + bg) * (sparsify(x, t1) @ Wu + bu) [B, N / 2] (``launch.sparse_glu``)."""
    if x.device.type == "cuda":
        return launch.sparse_glu(x, wt, thresholds, act, bias=bias, locks=locks, config=IN_GRAPH)
    return sparse_glu_ref(x, wt, thresholds, act, bias)


@sparse_glu.register_fake
def _(x, wt, thresholds, act, bias, locks):
    return x.new_empty(x.shape[0], wt.shape[1] // 2)


@torch.library.custom_op("acttail::topk_thresholds", mutates_args=())
def topk_thresholds(x: Tensor, keeps: Sequence[int]) -> Tensor:
    """[P, B] fp32 per-token thresholds that keep exactly keeps[p] entries of each row of x (``topk.py``)."""
    if x.device.type == "cuda":
        return _topk_kernel(x, keeps)
    return topk_thresholds_ref(x, keeps)


@topk_thresholds.register_fake
def _(x, keeps):
    return x.new_empty(len(keeps), x.shape[0], dtype=torch.float32)
