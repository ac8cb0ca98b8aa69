"""Per-token thresholds that keep exactly ``keep`` activations, computed on the device.

``topk`` mode needs a threshold per token such that |x| > t holds for exactly ``keep`` entries. A binary
search over the bit patterns of |x| (non-negative floats sort like their int32 bits) finds the smallest t
with count(|x| > t) <= keep: 32 steps of a compare and a sum over a row held in registers, one program per
(token, projection). No host round trip, fixed shapes: it can be captured in a CUDA graph. With ties at
the boundary fewer than ``keep`` entries pass (never more).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl_args


def topk_thresholds_ref(x: torch.Tensor, keeps) -> torch.Tensor:
    """[P, B] fp32: for each keep count, the (keep+1)-th largest |x| per token (-1 when keep >= K)."""
    a = x.float().abs()
    K = a.shape[1]
    out = []
    for keep in keeps:
        if keep >= K:
            out.append(torch.full((a.shape[0],), -1.0, device=x.device))
        else:
            out.append(a.sort(dim=1, descending=True).values[:, keep])
    return torch.stack(out)


@triton.jit
def _topk_threshold_kernel(x_ptr, stride_xb, t_ptr, stride_tp, K, KEEP0, KEEP1, KEEP2,
                           BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    p = tl.program_id(1)
    keep = tl.where(p == 0, KEEP0, tl.where(p == 1, KEEP1, KEEP2))
    rk = tl.arange(0, BLOCK)
    m = rk < K
    a = tl.abs(tl.load(x_ptr + b * stride_xb + rk, mask=m, other=0.0).to(tl.float32))
    bits = tl.where(m, a.to(tl.int32, bitcast=True), -1)  # padding is never above any candidate
    lo = tl.full([], -1, tl.int32)  # count(bits > lo) > keep unless keep >= K
    hi = tl.full([], 0x7F800000, tl.int32)  # +inf: count(bits > hi) == 0 <= keep
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        c = tl.sum((bits > mid).to(tl.int32), axis=0)
        ok = c <= keep
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid)
    t = tl.where(hi < 0, -1.0, hi.to(tl.float32, bitcast=True))
    tl.store(t_ptr + p * stride_tp + b, t)


def topk_thresholds(x: torch.Tensor, keeps, out: torch.Tensor | None = None) -> torch.Tensor:
    """[P, B] fp32 thresholds keeping exactly keeps[p] entries of each token's |x| (P <= 3 keep counts).

    Feed the result to ``sparse_linear`` / ``sparse_swiglu`` as per-token thresholds."""
    keeps = [int(k) for k in keeps]
    if not 1 <= len(keeps) <= 3 or min(keeps) < 0:
        raise ValueError(f"need 1..3 non-negative keep counts, got {keeps}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be [B, K] with contiguous rows")
    B, K = x.shape
    if out is None:
        out = torch.empty(len(keeps), B, dtype=torch.float32, device=x.device)
    padded = keeps + [0] * (3 - len(keeps))
    block = triton.next_power_of_2(K)
    warps = 1 if x.device.type != "cuda" else max(4, min(32, block // 512))
    _topk_threshold_kernel[(B, len(keeps))](x, x.stride(0), out, out.stride(0), K, *padded, BLOCK=block,
                                            num_warps=warps, **pdl_args(x.device))
    return out
