"""Where does the sparse GEMV's fixed cost go? Variants of the kernel timed side by side in one run.

- read-only bandwidth (a streaming-sum kernel) next to the copy bandwidth: the honest floor for a GEMV,
  which reads W and writes almost nothing;
- the committed kernel with and without programmatic dependent launch (``pdl``), no split-K (one program
  per column block walks all of K), and a kept-row index list built once per input by a small kernel
  (``idx``; what a producer kernel such as RMSNorm could emit), with and without its own launch.
  (The first run, reports/gpu/probe/, also timed a no-compaction ``masked`` mode from commit c4b15e0:
  slower than compaction everywhere but at 0%, so it was removed.)
- ``--ncu``: a few plain launches of each, for ``ncu`` to report kernel durations without launch gaps.

    python -m benchmarks.gpu_probe --out OUT
    ncu --clock-control none --metrics gpu__time_duration.sum -k regex:'_kernel|gemv|gemm' \
        python -m benchmarks.gpu_probe --ncu
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from acttail.kernels import sparse_linear, sparse_linear_ref
from acttail.kernels.sparse_gemv import _finish, _locks, pdl_args, pick_config
from benchmarks.gpu_kernels import copy_bandwidth, rel_err, threshold_for, time_graph

ROTATE = 512e6


@triton.jit
def _read_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        o = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(a_ptr + o, mask=o < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def read_bandwidth():
    """Bytes read per second by a streaming sum over 2 GB of fp16 (median of 20)."""
    a = torch.randn(int(1e9), dtype=torch.float16, device="cuda")
    BLOCK, ITERS = 4096, 16
    grid = triton.cdiv(a.numel(), BLOCK * ITERS)
    out = torch.empty(grid, dtype=torch.float32, device="cuda")
    run = lambda: _read_kernel[(grid,)](a, out, a.numel(), BLOCK=BLOCK, ITERS=ITERS, num_warps=8)  # noqa
    for _ in range(3):
        run()
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    err = abs(out.sum().item() - a.float().sum().item()) / a.float().abs().sum().item()
    del a
    return 2e9 / statistics.median(ts), err


@triton.jit
def _compact_kernel(x_ptr, t_ptr, idx_ptr, nnz_ptr, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program: the kept-row indices of x (|x| > t) in order, and their count."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    rk = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
    keep = (tl.abs(x) > tl.load(t_ptr)).to(tl.int32)
    pos = tl.cumsum(keep, axis=0)
    tl.store(idx_ptr + pos - 1, rk, mask=keep > 0)
    tl.store(nnz_ptr, tl.sum(keep, axis=0))
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gemv_idx_kernel(x_ptr, w_ptr, stride_wk, idx_ptr, nnz_ptr, y_ptr, part_ptr, lock_ptr, N,
                     SPLIT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    """y = x[idx] @ wt[idx, :]: program (n, k) takes the k-th of SPLIT equal slices of the index list."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    nnz = tl.load(nnz_ptr)
    per = tl.cdiv(tl.cdiv(nnz, SPLIT), BK) * BK
    lo = pid_k * per
    hi = tl.minimum(lo + per, nnz)
    acc2 = tl.zeros([BK, BN], dtype=tl.float32)
    rj = lo + tl.arange(0, BK)
    jm = rj < hi
    kk = tl.load(idx_ptr + rj, mask=jm, other=0)
    w = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :], mask=jm[:, None] & cmask[None, :], other=0.0)
    xv = tl.load(x_ptr + kk, mask=jm, other=0.0)
    for j in range(lo + BK, hi + BK, BK):
        rj = j + tl.arange(0, BK)
        jm = rj < hi
        kk = tl.load(idx_ptr + rj, mask=jm, other=0)
        w_next = tl.load(w_ptr + kk[:, None] * stride_wk + cols[None, :], mask=jm[:, None] & cmask[None, :],
                         other=0.0)
        xv_next = tl.load(x_ptr + kk, mask=jm, other=0.0)
        acc2 += w.to(tl.float32) * xv.to(tl.float32)[:, None]
        w, xv = w_next, xv_next
    acc = tl.sum(acc2, axis=0)[None, :]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rb = tl.arange(0, 1)
    _finish(acc, y_ptr, 0, part_ptr, N, lock_ptr, pid_n, pid_k, rb, rb < 1, cols, cmask, cols, part_ptr,
            SPLIT, SPLIT, False, 0, 1, BN, 0, False)


def compact(x, t, pdl=False):
    K = x.shape[1]
    idx = torch.empty(K, dtype=torch.int32, device=x.device)
    nnz = torch.empty(1, dtype=torch.int32, device=x.device)
    block = triton.next_power_of_2(K)
    _compact_kernel[(1,)](x, t, idx, nnz, K, BLOCK=block, num_warps=16 if block > 4096 else 8,
                          **pdl_args(x.device, pdl))
    return idx, nnz


def gemv_idx(x, wt, idx, nnz, pdl=False, split=None, BN=128, BK=64):
    K, N = wt.shape
    nb = triton.cdiv(N, BN)
    split = split or max(1, (3 * torch.cuda.get_device_properties(0).multi_processor_count) // nb)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split * N, dtype=torch.float32, device=x.device)
    _gemv_idx_kernel[(nb, split)](x, wt, wt.stride(0), idx, nnz, y, part, _locks(x.device, nb), N,
                                  SPLIT=split, BK=BK, BN=BN, num_warps=4, num_stages=1,
                                  **pdl_args(x.device, pdl))
    return y


def variants(K, N):
    """name -> (kind, config / pdl flag) for sparse_linear or the probe's own idx kernels.

    Earlier runs of this script (reports/gpu/probe/README.md) also timed knobs since removed: a
    no-compaction masked mode, 8 warps, 256-column blocks, the tensor-core path for one token, the
    hand-written prefetch loop and kept-row lists built by add_rmsnorm; their code is in the commits
    named there."""
    return {
        "current": ("cfg", None),
        "no pdl": ("cfg", dict(pdl=False)),
        "num_stages 1": ("cfg", dict(num_stages=1)),
        "idx only pdl": ("idx", True),
        "compact+idx pdl": ("cidx", True),
    }


def bench(K, N, sparsities, bw):
    rows = []
    n = max(2, int(ROTATE // (K * N * 2)) + 1)
    wt = [torch.randn(K, N, device="cuda", dtype=torch.float16) / K ** 0.5 for _ in range(n)]
    w = [c.t().contiguous() for c in wt]
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    t_dense, _ = time_graph(lambda i: F.linear(x, w[i]), n)
    rows.append(dict(K=K, N=N, s=None, variant="dense F.linear", us=t_dense))
    print(f"{K}x{N} dense {t_dense:.1f} us (floor {K * N * 2 / bw * 1e6:.1f})", flush=True)
    for s in sparsities:
        t = torch.tensor([threshold_for(x, s)], device="cuda")
        ref = sparse_linear_ref(x, wt[0], t)
        for name, (kind, arg) in variants(K, N).items():
            if kind == "cfg":
                fn = lambda i, c=arg: sparse_linear(x, wt[i], t, config=c)  # noqa: E731
            elif kind == "idx":
                idx, nnz = compact(x, t)
                fn = lambda i, p=arg, a=idx, b=nnz: gemv_idx(x, wt[i], a, b, pdl=p)  # noqa: E731
            else:
                fn = lambda i, p=arg: gemv_idx(x, wt[i], *compact(x, t, pdl=p), pdl=p)  # noqa: E731
            try:
                err = rel_err(fn(0), ref)
                det = torch.equal(fn(0), fn(0))
                us, spread = time_graph(fn, n)
            except Exception as e:  # a variant that does not compile or capture is reported, not fatal
                print(f"{K}x{N} s={s} {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append(dict(K=K, N=N, s=s, variant=name, error=str(e)[:500]))
                continue
            floor = (1 - s) * K * N * 2 / bw * 1e6
            rows.append(dict(K=K, N=N, s=s, variant=name, us=us, spread=spread, speedup=t_dense / us,
                             rel_err=err, deterministic=det, floor_us=floor))
            print(f"{K}x{N} s={s:.0%} {name:18s} {us:6.1f} us +-{spread / 2:.1f} {t_dense / us:5.2f}x "
                  f"x_floor {us / floor if floor else float('nan'):.2f} err {err:.1e} det {det}", flush=True)
    return rows


def ncu_launches():
    """A few plain launches per variant (4096x11008, 50% and 90%) for ncu to time."""
    K, N = 4096, 11008
    wt = torch.randn(K, N, device="cuda", dtype=torch.float16) / 64
    w = wt.t().contiguous()
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    for _ in range(2):
        F.linear(x, w)
    for s in (0.5, 0.9):
        t = torch.tensor([threshold_for(x, s)], device="cuda")
        for _ in range(2):
            sparse_linear(x, wt, t, config=dict(pdl=False))
        idx, nnz = compact(x, t)
        for _ in range(2):
            gemv_idx(x, wt, idx, nnz)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ncu", action="store_true")
    args = ap.parse_args()
    if args.ncu:
        ncu_launches()
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                torch=torch.__version__, triton=triton.__version__)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    rbw, rerr = read_bandwidth()
    print(f"{meta['device']}: copy {bw / 1e12:.2f} TB/s, read-only {rbw / 1e12:.2f} TB/s (sum err {rerr:.1e})")
    rows = []
    for K, N in [(4096, 11008), (11008, 4096), (4096, 4096)]:
        rows += bench(K, N, [0.0, 0.5, 0.8, 0.9], bw)
        (out / "probe.json").write_text(json.dumps(dict(meta=meta, copy_bw=bw, read_bw=rbw, rows=rows), indent=1))
    print("config heuristic 4096x11008:", pick_config(1, 4096, lambda bn: triton.cdiv(11008, bn),
                                                          torch.device("cuda")))


if __name__ == "__main__":
    main()
