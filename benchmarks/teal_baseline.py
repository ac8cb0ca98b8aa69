"""A TEAL-style sparse GEMV, the baseline our kernel has to beat (timed in the same run).

After TEAL's split-K kernel: a 2-D grid over (output blocks, input blocks); each program loads its slice of
x, masks the weight rows whose activation is below the threshold, and adds its partial sums into an fp16
output with atomics, so the output must be zeroed by a separate pass first. fp16 only (no bf16 atomics in
this form) and batch 1 only. Reimplemented here from its description; TEAL autotunes over a few block
shapes (CONFIGS below are among them), so the benchmark times each and keeps the fastest per case.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _teal_kernel(y_ptr, x_ptr, w_ptr, thr, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    keep = tl.abs(x) > thr
    w = tl.load(w_ptr + rk[:, None] * N + rn[None, :], mask=keep[:, None] & (rn[None, :] < N), other=0.0)
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[:, None], axis=0)
    tl.atomic_add(y_ptr + rn, acc.to(tl.float16), mask=rn < N, sem="relaxed")


CONFIGS = [(64, 128, 2), (16, 256, 4), (8, 128, 2)]  # (BLOCK_K, BLOCK_N, num_warps)


def teal_gemv(x: torch.Tensor, wt: torch.Tensor, threshold: float, block_k: int = 64, block_n: int = 128,
              num_warps: int = 2):
    """y [1, N] = sparsify(x) @ wt for x [1, K] fp16 and wt [K, N] fp16 (zeroing pass + atomic kernel)."""
    K, N = wt.shape
    y = torch.zeros(1, N, dtype=torch.float16, device=x.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _teal_kernel[grid](y, x, wt, threshold, K, N, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps)
    return y
