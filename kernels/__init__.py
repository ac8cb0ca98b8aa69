"""Triton kernels for sparse decoding, installed as ``acttail.kernels``.

- ``sparse_linear``: y = sparsify(x) @ Wt for 1..3 projections sharing x (q/k/v), each with its threshold.
- ``sparse_swiglu``: silu(sparsify(x) @ Wg) * (sparsify(x) @ Wu), gate and up with their own thresholds.
- ``topk_thresholds``: per-token thresholds for an exact keep count, on the device.
Each has a plain torch reference beside it (``*_ref``).
"""

import os


def _interpreter_compat():
    """Triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.4 refuses; loops with
    run-time bounds (``range(0, nnz, BK)``) then fail under TRITON_INTERPRET=1. Convert through .item()."""
    try:
        import triton.runtime.interpreter as interp
    except Exception:  # pragma: no cover - triton missing or reorganised
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_acttail_compat", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._acttail_compat = True
    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_compat()

from .sparse_gemv import (  # noqa: E402
    MAX_BATCH, sparse_linear, sparse_linear_ref, sparse_swiglu, sparse_swiglu_ref, sparsify_ref, use_sparse)
from .topk import topk_thresholds, topk_thresholds_ref  # noqa: E402

__all__ = ["MAX_BATCH", "sparse_linear", "sparse_linear_ref", "sparse_swiglu", "sparse_swiglu_ref",
           "sparsify_ref", "topk_thresholds", "topk_thresholds_ref", "use_sparse"]
