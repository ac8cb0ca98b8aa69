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
(The per-program timeline of a traced copy of the kernel, which the issue-12 tables quote, was removed with
that copy, which had drifted from the kernel once: `git show 61defb2:benchmarks/gpu_tail.py`.)

    python benchmarks/gpu_tail.py --teal .teal --out OUT [--quick]

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

from acttail.kernels import (chunk_rows, pick_config, sparse_linear, sparse_linear_ref, sparse_swiglu,
                             sparse_swiglu_ref)
from gpu_kernels import copy_bandwidth, rel_err, threshold_for, time_graph, warm_up

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
                command="python benchmarks/gpu_tail.py " + " ".join(sys.argv[1:]), torch=torch.__version__,
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
    rows = []
    result = dict(meta=meta, copy_bw=bw, sms=sms, rows=rows)
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
    (out / "tail.json").write_text(json.dumps(result, indent=1))
    log("done")


if __name__ == "__main__":
    main()
