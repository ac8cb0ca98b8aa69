"""Single-projection table against TEAL's own kernel, with the distribution of launch times (issue 12).

For each shape and sparsity (fp16, batch 1), in one process on the same inputs:
- correctness of every kernel against the fp32 torch reference (fresh random weights, never zeros);
- medians: CUDA-graph replays of 2 x R calls rotating through R weight copies (> 512 MB, so L2 never serves
  a repeat), as benchmarks/gpu_kernels.py times them: dense cuBLAS, our kernel in several launch
  configurations, and TEAL's own kernel (its file, its autotuner over its 16 configurations, keyed by shape
  and sparsity bin: each sparsity gets its own tuned configuration; its output zeroing pre-hook included);
- the distribution: the same graph with a timing event between every two calls (so each call is timed on
  the GPU alone; no PDL overlap across an event), replayed until >= 1500 calls, median / p90 / p99 / max,
  quiet and with a concurrent load (a copy loop of 256 MB buffers on a second stream);
- a timeline of our kernel (%globaltimer per program: start, after the PDL wait, after compaction, after
  streaming, after the split-K ticket) for a few cells, quiet and under load.

    python -m benchmarks.gpu_tail --teal .teal --out OUT [--quick]

TEAL's code is read from --teal (a git-ignored copy of FasterDecoding/TEAL's kernels/); it is timed, never
copied into this repository. Its file imports a torch.compile wrapper we do not need (compile_wrapper, which
needs msgspec); a stub stands in for that module.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from acttail.kernels import sparse_linear, sparse_linear_ref, sparse_swiglu, sparse_swiglu_ref
from acttail.kernels.sparse_gemv import _compact, _finish, _stream_rows, pick_config
from benchmarks.gpu_kernels import copy_bandwidth, rel_err, threshold_for, time_graph, warm_up

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]
SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
ROTATE_BYTES = 512e6
MIN_SAMPLES = 1500
T_START = time.time()


def log(*a):
    print(f"[{time.time() - T_START:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------------------------------
# TEAL's own kernel


def load_teal(root: Path):
    sys.modules.setdefault("compile_wrapper", types.SimpleNamespace(BaseKernel=object))
    spec = importlib.util.spec_from_file_location("teal_sparse_gemv", root / "kernels" / "sparse_gemv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tuner = mod.splitk_sparse_gemv_kernel
    # shorter autotuning runs than Triton's default (25 + 100 ms a configuration); the choice stays TEAL's
    tuner._do_bench = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
    return mod


def teal_bin(s):
    return int(round(s * 100))


def teal_call(mod, x, wt, tval, s):
    """TEAL's splitk_sparse_gemv on our input-major weights: its 'column-major' weight [N, K] is wt.T."""
    return mod.splitk_sparse_gemv(x.view(1, 1, -1), wt.t(), tval, teal_bin(s)).view(1, -1)


def teal_precompile(mod, sparsities):
    """Compile TEAL's 16 configurations for every sparsity bin in parallel threads (the autotuner would
    compile them one by one); same arguments and options as its autotuner passes, so it hits this cache."""
    K = N = 4096
    x = torch.randn(K, device="cuda", dtype=torch.float16)
    w = torch.randn(K, N, device="cuda", dtype=torch.float16)
    jit = mod.splitk_sparse_gemv_kernel.fn

    def one(job):
        cfg, s = job
        y = torch.zeros(N, device="cuda", dtype=torch.float16)
        grid = (triton.cdiv(N, cfg.kwargs["BLOCK_N"]), triton.cdiv(K, cfg.kwargs["BLOCK_M"]))
        jit.run(y, w.t(), x, 0.5, N, K, N // 16, K // 16, 1, teal_bin(s), grid=grid, warmup=False,
                **cfg.all_kwargs())

    jobs = [(c, s) for s in sparsities for c in mod.configs]
    with ThreadPoolExecutor(12) as ex:
        list(ex.map(one, jobs))
    torch.cuda.synchronize()


def load_baseline(path: Path):
    """An earlier commit's sparse_gemv.py as its own module (its kernels and launch rule), to time beside ours."""
    spec = importlib.util.spec_from_file_location("baseline_sparse_gemv", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    commit = path.parent / "COMMIT"
    mod.COMMIT = commit.read_text().strip() if commit.exists() else "?"
    return mod


# ----------------------------------------------------------------------------------------------------------
# Our kernel's launch variants


def old_kc(K, n_blocks, sms):
    """The launch rule before issue 12: power-of-two chunks from 256 up to 3 programs per SM."""
    KC = 256
    while KC < 2048 and n_blocks * triton.cdiv(K, KC) > 3 * sms:
        KC *= 2
    return KC


def variants(K, N, sms, splits=None):
    """Launch configurations timed side by side (one token)."""
    from acttail.kernels.sparse_gemv import chunk_rows
    splits = splits or (N,)
    n_blocks_of = lambda bn: sum(triton.cdiv(w, bn) for w in splits)  # noqa: E731
    base = pick_config(1, K, n_blocks_of, torch.device("cuda"))
    nb = n_blocks_of(128)
    rb8 = lambda per_sm, regs: dict(base, KC=chunk_rows(K, nb, per_sm, sms), RB=8, maxnreg=regs)  # noqa: E731
    return {
        # the launch rule committed before issue 12: power-of-two chunks, registers left to ptxas
        "v0": dict(base, KC=old_kc(K, nb, sms), RB=1, maxnreg=None),
        # chunks filling 3 programs per SM, [64, 128] accumulator, 168 registers (the idle-GPU optimum; in
        # reports/gpu/issue12/run3 this column is named "current")
        "rb1 3/SM": dict(base, KC=chunk_rows(K, nb, 3, sms), RB=1, maxnreg=168),
        # accumulator of 8 rows (96-120 registers): 3 programs per SM (the default, pick_config), or 4 or 5
        "rb8 3/SM": rb8(3, 128),
        "rb8 4/SM": rb8(4, 128),
        "rb8 5/SM": rb8(5, 96),
        # how a chunk is read (DENSE): rb8 3/SM is pick_config's default, in place when over two thirds of the
        # chunk's rows are kept, else compacted; "compact" always compacts (the kernel before), "in place"
        # never does
        "compact 3/SM": rb8(3, 128) | {"DENSE": 0},
        "in place 3/SM": rb8(3, 128) | {"DENSE": 2},
        "in place kc1024": dict(base, KC=1024, BK=64, RB=8, maxnreg=128, DENSE=2),
    }


DIST_VARIANTS = ["rb1 3/SM", "rb8 3/SM", "rb8 4/SM", "rb8 5/SM"]


# ----------------------------------------------------------------------------------------------------------
# Launch-time distribution


class Load:
    """A concurrent load: 256 MB device copies on a second stream, 8 to a graph replay (about 1.4 ms)."""

    def __init__(self):
        self.a = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        self.b = torch.empty_like(self.a)
        self.s = torch.cuda.Stream()
        with torch.cuda.stream(self.s):
            self.b.copy_(self.a)
        self.s.synchronize()
        self.g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g, stream=self.s):
            for _ in range(8):
                self.b.copy_(self.a)

    def push(self):
        with torch.cuda.stream(self.s):
            self.g.replay()

    def drain(self):
        self.s.synchronize()


EVENTS_IN_GRAPH = [True]


@triton.jit
def _hog_kernel(src_ptr, out_ptr, n_per, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """One program per SM streaming its own slice ITERS times: it holds one program slot on every SM (and
    some bandwidth) for as long as it runs."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * n_per
    for _ in range(ITERS):
        for off in range(0, n_per, BLOCK):
            acc += tl.load(src_ptr + base + off + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


class SlotLoad:
    """A concurrent load that holds SM slots: one small program per SM on a second stream, re-launched when
    the previous one has finished (about 2 ms each). Our one-token grid needs all 3 slots of every SM."""

    def __init__(self, sms, target_ms=2.0):
        self.sms, self.n_per = sms, 1 << 20
        self.src = torch.randn(sms * self.n_per, device="cuda", dtype=torch.float16)
        self.out = torch.empty(sms, device="cuda")
        self.s = torch.cuda.Stream()
        self.iters = 1
        ms = self._time()
        self.iters = max(1, int(target_ms / ms))
        self.ms = self._time()
        self.ev = None

    def _launch(self):
        _hog_kernel[(self.sms,)](self.src, self.out, self.n_per, ITERS=self.iters, BLOCK=2048, num_warps=4)

    def _time(self):
        with torch.cuda.stream(self.s):
            self._launch()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            self._launch()
            b.record()
        b.synchronize()
        return a.elapsed_time(b)

    def push(self):
        if self.ev is None or self.ev.query():
            with torch.cuda.stream(self.s):
                self._launch()
                self.ev = torch.cuda.Event()
                self.ev.record()

    def drain(self):
        self.s.synchronize()
        self.ev = None


def per_launch(call, n_copies, load=None, min_samples=MIN_SAMPLES):
    """Microseconds of each call: a graph of 2 x n_copies calls with a timing event between every two
    (eager launches behind a GPU sleep, if this torch cannot time events recorded in a graph)."""
    if EVENTS_IN_GRAPH[0]:
        try:
            return _per_launch_graph(call, n_copies, load, min_samples)
        except Exception as e:  # noqa: BLE001
            log("events in a graph failed, timing eager launches instead:", repr(e)[:300])
            EVENTS_IN_GRAPH[0] = False
            torch.cuda.synchronize()
    n = 2 * n_copies
    out = []
    while len(out) < min_samples:
        if load is not None:
            load.push()
        torch.cuda._sleep(10_000_000)  # a few ms: the host queues every call before the GPU reaches them
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        ev[0].record()
        for i in range(n):
            call(i % n_copies)
            ev[i + 1].record()
        ev[-1].synchronize()
        out += [ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(n)]
    if load is not None:
        load.drain()
    return out


def _per_launch_graph(call, n_copies, load, min_samples):
    n = 2 * n_copies
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_copies):
            call(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(n + 1)]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ev[0].record()
        for i in range(n):
            call(i % n_copies)
            ev[i + 1].record()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(math.ceil(min_samples / n)):
        if load is not None:
            load.push()
        g.replay()
        ev[-1].synchronize()
        out += [ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(n)]
    if load is not None:
        load.drain()
    del g
    return out


def stats(samples):
    a = sorted(samples)
    q = lambda p: a[min(len(a) - 1, int(p * len(a)))]  # noqa: E731
    med = statistics.median(a)
    return dict(n=len(a), median=med, p90=q(0.90), p99=q(0.99), max=a[-1], p99_over_median=q(0.99) / med)


# ----------------------------------------------------------------------------------------------------------
# Timeline of our kernel (single projection, one token)


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _traced_kernel(x_ptr, w_ptr, stride_wk, t_ptr, y_ptr, part_ptr, idx_ptr, val_ptr, lock_ptr, tr_ptr, K, N,
                   SPLIT: tl.constexpr, KC: tl.constexpr, KCP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                   PDL: tl.constexpr):
    """_sparse_gemv_kernel for one token and one projection, with timestamps per program."""
    t0 = _now()
    if PDL:
        tl.extra.cuda.gdc_wait()
    t1 = _now()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k0 = pid_k * KC
    kend = tl.minimum(K, k0 + KC)
    rb = tl.arange(0, 1)
    bmask = rb < 1
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    scratch = (pid_k * tl.num_programs(0) + pid_n).to(tl.int64) * KC
    rows, _ = _compact(x_ptr, K, t_ptr, 0, idx_ptr + scratch, val_ptr + scratch, 1, k0, kend, x_ptr, x_ptr, x_ptr,
                       tl.zeros([1], dtype=tl.float32), pid_n, 1, KC, KCP, False, False, 0)  # always compacted
    t2 = _now()
    acc = _stream_rows(x_ptr, K, val_ptr, w_ptr, stride_wk, t_ptr, 0, idx_ptr + scratch, rows, 1, cols, cmask, 1, KC,
                       BK, BN, False, False)
    t3 = _now()  # the loop consumed its last rows: they have arrived
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    _finish(acc, y_ptr, N, part_ptr, N, lock_ptr, pid_n, pid_k, rb, bmask, cols, cmask, cols, part_ptr, SPLIT,
            SPLIT, False, 0, 1, BN, 0, False)
    t4 = _now()
    base = tr_ptr + (pid_k * tl.num_programs(0) + pid_n) * 8
    tl.store(base, _smid().to(tl.int64))
    tl.store(base + 1, t0)
    tl.store(base + 2, t1)
    tl.store(base + 3, t2)
    tl.store(base + 4, t3)
    tl.store(base + 5, t4)


def traced_launch(x, wt, t, cfg, trace):
    K, N = wt.shape
    BN, KC, BK = cfg["BN"], cfg["KC"], cfg["BK"]
    nb, split = triton.cdiv(N, BN), triton.cdiv(K, KC)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split * N, dtype=torch.float32, device=x.device)
    idx = torch.empty(split * nb * KC, dtype=torch.int32, device=x.device)
    vals = torch.empty(1, dtype=x.dtype, device=x.device)  # only a fused RMSNorm keeps values
    from acttail.kernels.sparse_gemv import _locks, pdl_args
    locks = _locks(x.device, nb)
    pdl = pdl_args(x.device, cfg.get("pdl"))
    _traced_kernel[(nb, split)](x, wt, wt.stride(0), t, y, part, idx, vals, locks, trace, K, N, SPLIT=split, KC=KC,
                                KCP=triton.next_power_of_2(KC), BK=BK, BN=BN, num_warps=4, num_stages=1,
                                maxnreg=168, **pdl)
    return y


def timeline(x, wt_copies, t, cfg, load=None, replays=4, raw=None):
    """Per-launch summaries of program timestamps (microseconds from the launch's first program start)."""
    K, N = wt_copies[0].shape
    nb, split = triton.cdiv(N, cfg["BN"]), triton.cdiv(K, cfg["KC"])
    R = len(wt_copies)
    n = 2 * R
    traces = torch.zeros(n, nb * split, 8, dtype=torch.int64, device="cuda")
    y = traced_launch(x, wt_copies[0], t, cfg, traces[0])
    err = rel_err(y, sparse_linear_ref(x, wt_copies[0], t))
    for i in range(R):
        traced_launch(x, wt_copies[i], t, cfg, traces[i])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            traced_launch(x, wt_copies[i % R], t, cfg, traces[i])
    out = []
    for _ in range(replays):
        if load is not None:
            load.push()
        g.replay()
        torch.cuda.synchronize()
        tr = traces.cpu()
        if raw is not None and len(raw) < 2:  # per program: sm, resident, waited, compacted, streamed, finished
            t0 = int(tr[0][:, 2].min())
            raw.append([[int(v[0])] + [round((int(u) - t0) / 1e3, 3) for u in v[1:6]] for v in tr[0].tolist()])
        for i in range(n):
            a = tr[i].double()
            t0 = a[:, 2].min()  # the first program past its PDL wait: the launch's effective start
            us = (a[:, 1:6] - t0) / 1e3  # resident, waited, compacted, streamed, finished
            start, waited, comp, stream, fin = us.unbind(1)
            last = int(fin.argmax())
            out.append(dict(
                span=float(fin.max()), resident_spread=float(start.max() - start.min()),
                start_spread=float(waited.max()),
                late_starts=int((waited > 2.0).sum()),
                compact_med=float((comp - waited).median()), compact_max=float((comp - waited).max()),
                stream_med=float((stream - comp).median()), stream_max=float((stream - comp).max()),
                stream_end_spread=float(stream.max() - stream.min()),
                finish_med=float((fin - stream).median()), finish_max=float((fin - stream).max()),
                last_program=dict(resident=float(start[last]), waited=float(waited[last]), compacted=float(comp[last]),
                                  streamed=float(stream[last]), finished=float(fin[last]), sm=int(a[last, 0])),
                programs_per_sm_max=int(torch.bincount(tr[i][:, 0].long()).max())))
    if load is not None:
        load.drain()
    del g
    return err, out


def summarize_timeline(rows):
    keys = ["span", "start_spread", "late_starts", "compact_med", "stream_med", "stream_max", "stream_end_spread",
            "finish_med", "finish_max"]
    spans = [r["span"] for r in rows]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    worst = max(rows, key=lambda r: r["span"])
    return dict(launches=len(rows), median=med, worst=worst, span_p90=sorted(spans)[int(0.9 * len(spans))])


# ----------------------------------------------------------------------------------------------------------


def make_copies(K, N, dtype=torch.float16):
    n = max(2, math.ceil(ROTATE_BYTES / (K * N * 2)))
    wt = [torch.randn(K, N, device="cuda", dtype=dtype) / K ** 0.5 for _ in range(n)]
    w = [c.t().contiguous() for c in wt]
    return w, wt


def precompile_ours(jobs):
    """Compile our kernel's launch variants in parallel threads (ptxas runs as a subprocess)."""
    with ThreadPoolExecutor(12) as ex:
        list(ex.map(lambda f: f(), jobs))
    torch.cuda.synchronize()


FUSED = [("qkv 7B 4096->3x4096", 4096, (4096, 4096, 4096), False),
         ("qkv GQA 4096->4096+1024+1024", 4096, (4096, 1024, 1024), False),
         ("gate/up+SwiGLU 4096->2x11008", 4096, (11008, 11008), True)]


def bench_fused(sms, sparsities=(0.5, 0.7, 0.9)):
    """The fused launches of a decode step: old launch rule vs the new ones, against dense cuBLAS."""
    rows = []
    for name, K, splits, glu in FUSED:
        N = sum(splits)
        w, wt = make_copies(K, N)
        R = len(wt)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        if glu:
            dense = lambda i: (lambda gu: F.silu(gu[:, :splits[0]]) * gu[:, splits[0]:])(F.linear(x, w[i]))  # noqa
        else:
            dense = lambda i: F.linear(x, w[i])  # noqa: E731
        t_dense, _ = time_graph(dense, R)
        V = variants(K, N, sms, (splits[0],) * 2 if glu else splits)
        for s in sparsities:
            tv = threshold_for(x, s)
            P = 2 if glu else 3
            t = torch.full((P,), tv, device="cuda")
            row = dict(launch=name, sparsity=s, us_dense=t_dense, ours={})
            for vname, cfg in V.items():
                if glu:
                    fn = lambda i, c=cfg: sparse_swiglu(x, wt[i], t, config=c)  # noqa: E731
                    err = rel_err(fn(0), sparse_swiglu_ref(x, wt[0], t))
                else:
                    fn = lambda i, c=cfg: sparse_linear(x, wt[i], t, splits, config=c)  # noqa: E731
                    err = rel_err(fn(0), sparse_linear_ref(x, wt[0], t, splits))
                us, _ = time_graph(fn, R)
                row["ours"][vname] = dict(us=us, rel_err=err, KC=cfg["KC"])
            rows.append(row)
            log("fused", name, f"s={s:.0%} dense {t_dense:.1f} | "
                + " ".join(f"{k} {v['us']:.1f} (err {v['rel_err']:.1e})" for k, v in row["ours"].items()))
        del w, wt
        torch.cuda.empty_cache()
    return rows


def bench_bf16(sms, sparsities=(0.4, 0.5, 0.7, 0.9), names=("rb1 3/SM", "rb8 3/SM", "rb8 4/SM", "rb8 5/SM")):
    """bf16, one token: our kernel against dense cuBLAS."""
    rows = []
    for K, N in SHAPES:
        w, wt = make_copies(K, N, torch.bfloat16)
        R = len(wt)
        V = variants(K, N, sms)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        t_dense, _ = time_graph(lambda i: F.linear(x, w[i]), R)
        for s in sparsities:
            t = torch.tensor([threshold_for(x, s)], device="cuda")
            row = dict(K=K, N=N, sparsity=s, us_dense=t_dense, ours={})
            for name in names:
                cfg = V[name]
                err = rel_err(sparse_linear(x, wt[0], t, config=cfg), sparse_linear_ref(x, wt[0], t))
                us, _ = time_graph(lambda i: sparse_linear(x, wt[i], t, config=cfg), R)
                row["ours"][name] = dict(us=us, rel_err=err)
            rows.append(row)
            log(f"bf16 {K}x{N} s={s:.0%} dense {t_dense:.1f} | "
                + " ".join(f"{k} {v['us']:.1f} ({t_dense / v['us']:.2f}x, err {v['rel_err']:.1e})"
                           for k, v in row["ours"].items()))
        del w, wt
        torch.cuda.empty_cache()
    return rows


def bench_batch(shapes=((4096, 11008), (11008, 4096)), batches=(2, 4, 8), sparsities=(0.5, 0.7, 0.8, 0.9)):
    """Batch 2-8 (one threshold for all tokens, independent random masks): ours, dense cuBLAS, and what
    use_sparse dispatches (ours, or x @ W^T on the same input-major weights)."""
    from acttail.kernels import use_sparse
    rows = []
    for K, N in shapes:
        w, wt = make_copies(K, N)
        R = len(wt)
        for B in batches:
            x = torch.randn(B, K, device="cuda", dtype=torch.float16)
            t_dense, _ = time_graph(lambda i: F.linear(x, w[i]), R)
            t_dense_wt, _ = time_graph(lambda i: x @ wt[i], R)
            for s in sparsities:
                tv = threshold_for(x, s)
                t = torch.tensor([tv], device="cuda")
                err = rel_err(sparse_linear(x, wt[0], t), sparse_linear_ref(x, wt[0], t))
                us, _ = time_graph(lambda i: sparse_linear(x, wt[i], t), R)
                sparse = use_sparse(s, B, K * N * 2)
                disp = us if sparse else t_dense_wt
                rows.append(dict(K=K, N=N, batch=B, sparsity=s, union_keep=float((x.float().abs() > tv).any(0).float().mean()),
                                 us_dense=t_dense, us_dense_wt=t_dense_wt, us_ours=us, rel_err=err,
                                 dispatch_sparse=sparse, us_dispatched=disp, speedup_dispatched=t_dense / disp))
                log(f"batch {K}x{N} B={B} s={s:.0%} keep {rows[-1]['union_keep']:.2f} dense {t_dense:.1f} "
                    f"(Wt {t_dense_wt:.1f}) ours {us:.1f} err {err:.1e} -> {'ours' if sparse else 'dense'} "
                    f"{t_dense / disp:.2f}x")
        del w, wt
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--teal", default=".teal", help="folder holding TEAL's kernels/ (git-ignored copy)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds: later shapes are skipped past this")
    ap.add_argument("--variants", nargs="+", help="our launch variants to time (default: all of variants())")
    ap.add_argument("--dist", nargs="*", help="variants (and 'teal') whose launch-time distributions to measure "
                    "(default: the DIST_VARIANTS and teal)")
    ap.add_argument("--baseline", help="a sparse_gemv.py of an earlier commit (git show REV:kernels/"
                    "sparse_gemv.py > FILE), timed beside ours as the variant 'base' with its own launch rule")
    ap.add_argument("--no-extras", action="store_true", help="skip the fused, batch, bf16 and register sections")
    args = ap.parse_args()
    dist_names = DIST_VARIANTS + ["teal"] if args.dist is None else args.dist
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teal_root = Path(args.teal)
    teal_commit = (teal_root / "TEAL_COMMIT").read_text().strip() if (teal_root / "TEAL_COMMIT").exists() else "?"
    meta = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command="python -m benchmarks.gpu_tail " + " ".join(sys.argv[1:]), torch=torch.__version__,
                triton=triton.__version__, teal_commit=teal_commit)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    bw = copy_bandwidth()
    log(meta, f"copy bw {bw / 1e12:.2f} TB/s, {sms} SMs")
    shapes = SHAPES[:2] if args.quick else SHAPES
    sparsities = [0.4, 0.5, 0.9] if args.quick else SPARSITIES
    base = load_baseline(Path(args.baseline)) if args.baseline else None
    if base is not None:
        meta["baseline"] = f"{args.baseline} ({base.COMMIT})"
    teal = load_teal(teal_root)
    teal_precompile(teal, sparsities)
    log("TEAL compiled")
    load = Load()
    slots = SlotLoad(sms)
    log(f"slot load: {sms} programs, {slots.ms:.2f} ms a launch")
    warm_up(1.0)
    rows, timelines = [], []
    result = dict(meta=meta, copy_bw=bw, sms=sms, rows=rows, timelines=timelines)
    for K, N in shapes:
        if time.time() - T_START > args.budget:
            log("time budget spent: skipping", K, N)
            continue
        w, wt = make_copies(K, N)
        R = len(wt)
        V = {k: v for k, v in variants(K, N, sms).items() if not args.variants or k in args.variants}
        if base is not None:
            V["base"] = {}
        xs = torch.randn(1, K, device="cuda", dtype=torch.float16)
        tt = torch.tensor([0.5], device="cuda")
        sparse_linear(xs, wt[0], tt)
        precompile_ours([lambda c=c, n=n: (base.sparse_linear if n == "base" else sparse_linear)(xs, wt[0], tt, config=c)
                         for n, c in V.items()])
        log(f"{K}x{N}: compiled {len(V)} variants, R={R}")
        t_dense, _ = time_graph(lambda i: F.linear(xs, w[i]), R)
        dense_dist = dict(quiet=stats(per_launch(lambda i: F.linear(xs, w[i]), R)),
                          copy=stats(per_launch(lambda i: F.linear(xs, w[i]), R, load)),
                          slots=stats(per_launch(lambda i: F.linear(xs, w[i]), R, slots)))
        for s in sparsities:
            x = torch.randn(1, K, device="cuda", dtype=torch.float16)
            tval = threshold_for(x, s)
            t = torch.tensor([tval], device="cuda")
            ref = sparse_linear_ref(x, wt[0], t)
            row = dict(K=K, N=N, sparsity=s, keep=float((x.float().abs() > tval).float().mean()),
                       us_dense=t_dense, dense_dist=dense_dist, ours={}, dist={})
            for name, cfg in V.items():
                lin = base.sparse_linear if name == "base" else sparse_linear
                y = lin(x, wt[0], t, config=cfg)
                det = torch.equal(y, lin(x, wt[0], t, config=cfg))
                us, spread = time_graph(lambda i: lin(x, wt[i], t, config=cfg), R)
                row["ours"][name] = dict(us=us, spread=spread, rel_err=rel_err(y, ref), deterministic=det)
            yt = teal_call(teal, x, wt[0], tval, s)  # autotunes for this shape and sparsity bin
            row["teal_rel_err"] = rel_err(yt, ref)
            row["us_teal"], row["teal_spread"] = time_graph(lambda i: teal_call(teal, x, wt[i], tval, s), R)
            row["teal_config"] = str(teal.splitk_sparse_gemv_kernel.best_config)
            if "v0" in V and dist_names:
                fn = lambda i: sparse_linear(x, wt[i], t, config=V["v0"])  # noqa: E731
                row["dist"]["v0"] = dict(quiet=stats(per_launch(fn, R)))
            for name in dist_names:
                if name == "teal":
                    fn = lambda i: teal_call(teal, x, wt[i], tval, s)  # noqa: E731
                else:
                    lin = base.sparse_linear if name == "base" else sparse_linear
                    fn = lambda i, c=V[name], lin=lin: lin(x, wt[i], t, config=c)  # noqa: E731
                row["dist"][name] = dict(quiet=stats(per_launch(fn, R)), copy=stats(per_launch(fn, R, load)),
                                         slots=stats(per_launch(fn, R, slots)))
            rows.append(row)
            o, D = row["ours"], row["dist"]
            log(f"{K}x{N} s={s:.0%} dense {t_dense:.1f} teal {row['us_teal']:.1f} | "
                + " ".join(f"{k} {v['us']:.1f}" for k, v in o.items())
                + " | teal/ours " + " ".join(f"{k} {row['us_teal'] / v['us']:.2f}" for k, v in o.items()) + " | p99/med quiet "
                + " ".join(f"{k} {v['quiet']['p99_over_median']:.2f}" for k, v in D.items())
                + " | copy load med/p99 " + " ".join(f"{k} {D[k]['copy']['median']:.1f}/{D[k]['copy']['p99']:.0f}"
                                                     for k in D if "copy" in D[k])
                + " | slot load med/p99 " + " ".join(f"{k} {D[k]['slots']['median']:.1f}/{D[k]['slots']['p99']:.0f}"
                                                     for k in D if "slots" in D[k]))
            if not args.no_trace and "rb1 3/SM" in V and (K, N, s) in [(4096, 4096, 0.4), (4096, 11008, 0.5), (11008, 4096, 0.5)]:
                try:
                    raw = []
                    err, q = timeline(x, wt, t, V["rb1 3/SM"], raw=raw)
                    _, sl = timeline(x, wt, t, V["rb1 3/SM"], slots)
                    timelines.append(dict(K=K, N=N, sparsity=s, variant="rb1 3/SM", rel_err=err,
                                          quiet=summarize_timeline(q), slots=summarize_timeline(sl), raw_quiet=raw))
                    tq, ts = timelines[-1]["quiet"], timelines[-1]["slots"]
                    log(f"timeline {K}x{N} {s:.0%}: quiet span {tq['median']['span']:.1f} (compact "
                        f"{tq['median']['compact_med']:.2f}, stream {tq['median']['stream_med']:.1f} max "
                        f"{tq['median']['stream_max']:.1f}, end spread {tq['median']['stream_end_spread']:.1f}, finish "
                        f"{tq['median']['finish_med']:.2f}); slot load span {ts['median']['span']:.1f}, late starts "
                        f"{ts['median']['late_starts']}, start spread {ts['median']['start_spread']:.1f}")
                except Exception as e:  # diagnostics only
                    log("timeline failed", repr(e)[:500])
            (out / "tail.json").write_text(json.dumps(result, indent=1))
        del w, wt
        torch.cuda.empty_cache()
    (out / "tail.json").write_text(json.dumps(result, indent=1))
    if args.no_extras:
        log("done")
        return
    result["fused"] = bench_fused(sms)
    (out / "tail.json").write_text(json.dumps(result, indent=1))
    result["batch"] = bench_batch()
    (out / "tail.json").write_text(json.dumps(result, indent=1))
    result["bf16"] = bench_bf16(sms)
    try:
        result["registers"] = compiled_registers()
    except Exception as e:  # noqa: BLE001  (diagnostics only)
        result["registers"] = [dict(error=repr(e)[:300])]
    for r in result["registers"]:
        log("registers", r.get("kernel"), r.get("n_regs"), r.get("n_spills"), r.get("constants", "")[:160])
    (out / "tail.json").write_text(json.dumps(result, indent=1))
    log("done")


def compiled_registers():
    """Registers and spills of every compiled variant of our kernels, read off the loaded binaries."""
    from acttail.kernels.sparse_gemv import _sparse_gemv_kernel
    rows = []
    for fn in (_sparse_gemv_kernel, _traced_kernel):
        for caches in getattr(fn, "device_caches", {}).values():
            for key, k in caches[0].items():
                c = {kk: v for kk, v in getattr(k, "src", None).constants.items()} if hasattr(k, "src") else {}
                rows.append(dict(kernel=fn.__name__, n_regs=getattr(k, "n_regs", None),
                                 n_spills=getattr(k, "n_spills", None), key=str(key)[-300:], constants=str(c)[:300]))
    return rows


if __name__ == "__main__":
    main()
