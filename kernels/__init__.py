"""Triton kernels for sparse decoding (this folder installs as ``acttail.kernels``).

- ``sparse_linear``: y = sparsify(x) @ Wt for 1..3 projections sharing x (q/k/v), each with its threshold.
- ``sparse_glu``: act(sparsify(x) @ Wg) * (sparsify(x) @ Wu), gate and up with their own thresholds, act silu
  (``sparse_swiglu``) or gelu_tanh (GeGLU).
- ``PreparedLaunch``: either of those for one weight with its launch fixed once (low host time per call).
- ``topk_thresholds``: per-token thresholds for an exact keep count, on the device.
- ``quantize`` (``quantize_int8`` / ``quantize_int4`` / ``quantize_q4_1``): weights for the kernels' quantized
  reads (``scales=``, ``group=``): int8 per output channel, int4 in groups of input rows (symmetric, or GGUF
  Q4_1's grid with a minimum per group).
- ``new_locks``: a caller's own split-K ticket counters (``locks=``), for decoders sharing a GPU.
- ``use_sparse``: the dispatch rule (sparse kernel or dense cuBLAS) from the planned sparsity.
- ``pick_config`` and ``chunk_rows``: the launch rule (tile sizes, rows per program), for benchmarks that time
  other launch configurations beside it.
- ``decode_ops``: residual add + RMSNorm, RoPE + KV-cache write, decode attention.
Each has a plain torch reference beside it (``*_ref``). ``acttail.kernels.ops`` registers them as PyTorch
custom operators (``torch.ops.acttail.*``) for torch.compile.
"""

from .launch import (PreparedLaunch, chunk_rows, new_locks, pick_config, sparse_glu, sparse_linear, sparse_swiglu,
                     use_sparse)
from .sparse_gemv import (GLU_ACTS, INT4_GROUP, MAX_BATCH, dequantize_ref, quantize, quantize_int4, quantize_int8,
                          quantize_q4_1, sparse_glu_ref, sparse_linear_ref, sparse_swiglu_ref, sparsify_ref)
from .topk import topk_thresholds, topk_thresholds_ref

__all__ = ["GLU_ACTS", "INT4_GROUP", "MAX_BATCH", "PreparedLaunch", "chunk_rows", "dequantize_ref",
           "new_locks", "pick_config", "quantize", "quantize_int4", "quantize_int8", "quantize_q4_1", "sparse_glu",
           "sparse_glu_ref", "sparse_linear", "sparse_linear_ref", "sparse_swiglu", "sparse_swiglu_ref", "sparsify_ref",
           "topk_thresholds", "topk_thresholds_ref", "use_sparse"]
