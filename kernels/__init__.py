"""Triton kernels for sparse decoding.

- ``sparse_linear``: y = sparsify(x) @ Wt for 1..3 projections sharing x (q/k/v), each with its threshold.
- ``sparse_glu``: act(sparsify(x) @ Wg) * (sparsify(x) @ Wu), gate and up with their own thresholds, act silu
  (``sparse_swiglu``) or gelu_tanh (GeGLU).
- ``topk_thresholds``: per-token thresholds for an exact keep count, on the device.
- ``new_locks``: a caller's own split-K ticket counters (``locks=``), for decoders sharing a GPU.
Each has a plain torch reference beside it (``*_ref``).
"""

from .sparse_gemv import (
    GLU_ACTS, MAX_BATCH, new_locks, sparse_glu, sparse_glu_ref, sparse_linear, sparse_linear_ref, sparse_swiglu,
    sparse_swiglu_ref, sparsify_ref, use_sparse)
from .topk import topk_thresholds, topk_thresholds_ref

__all__ = ["GLU_ACTS", "MAX_BATCH", "new_locks", "sparse_glu", "sparse_glu_ref", "sparse_linear", "sparse_linear_ref",
           "sparse_swiglu", "sparse_swiglu_ref", "sparsify_ref", "topk_thresholds", "topk_thresholds_ref", "use_sparse"]
