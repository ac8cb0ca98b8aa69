"""Launching the sparse GEMV (``sparse_gemv.py``'s kernel): configs, programmatic dependent launch, ticket
counters, the dispatch rule, and the entry points ``sparse_linear`` / ``sparse_glu`` / ``PreparedLaunch``.

The grid is one wave of about 3 programs per SM (``pick_config``), each program small enough in registers
that a fourth would fit: a grid that needs every slot of every SM runs part of itself as a second wave
whenever another kernel holds a slot, which was the cause of its fragile timings (reports/gpu/issue12).
Each launch adds a fixed few microseconds (prologue and reduction), so ``use_sparse`` sends low sparsity to
dense cuBLAS. On Hopper the launch uses programmatic dependent launch: the kernel waits (``gdc_wait``)
before reading anything.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

from .sparse_gemv import GLU_ACTS, MAX_BATCH, _sparse_gemv_kernel, thresholds_2d


_LOCKS: dict = {}
_SM_COUNT: dict = {}
_PDL: dict = {}
try:
    _HAS_GDC = hasattr(tl.extra.cuda, "gdc_wait")
except AttributeError:  # a Triton without the CUDA extras
    _HAS_GDC = False


def pdl_enabled(device: torch.device) -> bool:
    """Launch with programmatic dependent launch? On Hopper and later (sm_90+), unless ACTTAIL_PDL=0.

    A PDL launch may start while the previous kernel in the stream is still running; every kernel here
    waits (``gdc_wait``) before it reads anything, so the overlap only hides launch latency and the
    previous kernel's tail (0.1-0.9 us a launch on an H100: reports/gpu/probe). Needs a Triton with
    ``gdc_wait`` (3.3 and later)."""
    if device.type != "cuda" or os.environ.get("ACTTAIL_PDL", "1") == "0" or not _HAS_GDC:
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _PDL:
        _PDL[key] = torch.cuda.get_device_capability(key)[0] >= 9
    return _PDL[key]


def pdl_args(device: torch.device, pdl: bool | None = None) -> dict:
    """Launch arguments of a kernel with a ``PDL`` constexpr: PDL=True plus ``launch_pdl=True`` when on
    (``pdl_enabled`` unless pdl says otherwise), else PDL=False and no launch_pdl (older Tritons lack it)."""
    pdl = pdl_enabled(device) if pdl is None else bool(pdl)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def new_locks(device, n: int = 4096) -> torch.Tensor:
    """Ticket counters for one caller of the kernels (``locks=``): zeros, one per column block of the widest
    launch, left zero again by each launch. A decoder that may run beside another one on the same GPU (other
    streams) passes its own: launches sharing counters at the same time would corrupt each other's."""
    return torch.zeros(max(n, 4096), dtype=torch.int32, device=device)


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed ticket counters shared by the callers that pass none, kept per device; each launch leaves them
    zero again.

    Call the kernels once outside graph capture first (warm-up), so this buffer is not graph-owned."""
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        buf = new_locks(device, n)
        _LOCKS[key] = buf
    return buf


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


# One-token launch: programs per SM the grid is sized for, row groups of the accumulator (RB > 1:
# _stream_rows_grouped) and the register cap. RB=8 at 3 per SM (about 120 registers a thread, so 4 programs
# would fit) leaves SM slots free: when another kernel holds a slot on every SM the grid still runs in one
# wave (H200, reports/gpu/issue12: 21-30% faster than the [64, 128] accumulator under such a load, as fast as
# TEAL's kernel or faster; 0-6% slower when the GPU is otherwise idle). dict(per_sm=3, RB=1, maxnreg=168) is
# the idle-GPU optimum: one wave of 3 programs of 168 registers, which needs every slot of every SM.
ONE_TOKEN = dict(per_sm=3, RB=8, maxnreg=128)


def chunk_rows(K: int, n_blocks: int, per_sm: int, sms: int, BK: int = 64) -> int:
    """KC for a grid of about per_sm programs per SM: the largest K split that fits, chunks any multiple of
    BK (at least 256 rows, at most 2048)."""
    split = max(1, (per_sm * sms) // n_blocks)
    return min(2048, max(256, triton.cdiv(triton.cdiv(K, split), BK) * BK))


def pick_config(B: int, K: int, n_blocks_of, device: torch.device) -> dict:
    """Block sizes and K-split: one wave of programs, each streaming a chunk of KC input rows.

    n_blocks_of(BN) gives the number of column blocks for a column-block width BN. Several tokens: 3
    programs per SM. One token: ONE_TOKEN. Power-of-two chunks (the rule before issue 12) left the
    14336-wide shapes at 224 programs (1.7 per SM), 8% slower at 50% on an H200 (reports/gpu/issue12).
    maxnreg caps the registers so the planned programs fit on an SM: left to itself ptxas gave the SwiGLU
    launch 204 a thread (2 programs per SM, so its grid of 3 per SM ran in 1.3 waves; 28% slower at 50%)."""
    if device.type != "cuda":  # the interpreter: small blocks keep CPU tests fast and exercise every path
        return dict(BN=32, KC=32, BK=16, num_warps=1, num_stages=1, RB=4 if ONE_TOKEN["RB"] > 1 else 1)
    BN, BK = 128, 64
    sms = _sm_count(device)
    if B > 1:
        return dict(BN=BN, KC=chunk_rows(K, n_blocks_of(BN), 3, sms, BK), BK=BK, num_warps=4, num_stages=3)
    one = ONE_TOKEN
    return dict(BN=BN, KC=chunk_rows(K, n_blocks_of(BN), one["per_sm"], sms, BK), BK=BK, num_warps=4,
                num_stages=1, RB=one["RB"], maxnreg=one["maxnreg"])


# ---- arguments of one launch ----------------------------------------------------------------------------


def columns(wt, group=None) -> int:
    """The output width N of input-major weights wt: its columns, twice them for int4 (``group``) packed two
    to a byte."""
    return wt.shape[1] * 2 if group else wt.shape[1]


def _check(x, wt, splits, glu, act, bias, scales=None, group=None):
    """One clear ValueError for inputs the kernel cannot take; the projections' output widths."""
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"need x [B, K] and wt [K, N], got {tuple(x.shape)} and {tuple(wt.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must have dtype float16 or bfloat16, got {x.dtype}")
    if scales is None and wt.dtype != x.dtype:
        raise ValueError(f"x and wt must share dtype float16 or bfloat16, got {x.dtype} and {wt.dtype}"
                         + (" (quantized weights need their scales)" if wt.dtype in (torch.int8, torch.uint8) else ""))
    N = columns(wt, group)
    if scales is not None:
        _check_scales(x, wt, scales, group, N)
    B = x.shape[0]
    if not 1 <= B <= MAX_BATCH:
        raise ValueError(f"batch must be 1..{MAX_BATCH}, got {B}")
    if x.stride(1) != 1 or wt.stride(1) != 1:
        raise ValueError("x and wt need contiguous rows (stride 1 along the last dimension)")
    if act not in GLU_ACTS:
        raise ValueError(f"unknown gate activation {act!r} (choose from {', '.join(GLU_ACTS)})")
    if glu:
        if N % 2:
            raise ValueError("gate/up weight needs an even number of columns [gate | up]")
        return (N // 2, N // 2)
    if len(splits) > 3 or sum(splits) != N:
        raise ValueError(f"splits {splits} must be 1..3 widths summing to {N}")
    if bias is not None and (bias.dtype != torch.float32 or bias.device != x.device or tuple(bias.shape) != (N,)
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous float32 [{N}] tensor on the activations' device")
    return tuple(splits)


def _config(B, K, widths, device, config):
    """The launch config (pick_config's, updated by ``config``), checked."""
    n_blocks_of = lambda bn: sum(triton.cdiv(w, bn) for w in widths)  # noqa: E731
    cfg = dict(pick_config(B, K, n_blocks_of, device))
    cfg.update(config or {})
    if cfg["KC"] % cfg["BK"]:
        raise ValueError(f"chunk KC={cfg['KC']} must be a multiple of BK={cfg['BK']}")
    if cfg.get("DENSE", 1) not in (0, 1, 2):
        raise ValueError("DENSE must be 0 (always compact), 1 (by the kept fraction) or 2 (always in place)")
    if cfg["BK"] % int(cfg.get("RB", 1)):
        raise ValueError(f"row groups RB={cfg['RB']} must divide BK={cfg['BK']}")
    return cfg, n_blocks_of(cfg["BN"])


def _check_scales(x, wt, scales, group, N) -> None:
    """int8 weights with per-column fp32 scales [N], or (group) packed int4 with per-group fp16 scales
    [ceil(K/group), N] or (scale, min) pairs [ceil(K/group), N, 2]."""
    K = wt.shape[0]
    if group is not None and (not isinstance(group, int) or group < 1):
        raise ValueError(f"group must be a positive number of input rows, got {group!r}")
    pairs = (2,) if group and scales.dim() == 3 else ()
    want = ((torch.uint8, (-(-K // group), N) + pairs, "int4 (packed uint8)", torch.float16) if group
            else (torch.int8, (N,), "int8", torch.float32))
    if (wt.dtype != want[0] or scales.dtype != want[3] or scales.device != x.device
            or tuple(scales.shape) != want[1] or not scales.is_contiguous()):
        dtype = str(want[3]).removeprefix("torch.")
        raise ValueError(f"scales go with {want[2]} weights: a contiguous {dtype} {list(want[1])} tensor on the "
                         f"activations' device, got {scales.dtype} {tuple(scales.shape)} for {wt.dtype} weights")


def _arguments(x, wt, t, splits, glu, config=None, act="silu", bias=None, locks=None, norm=None, residual=None,
               residual_out=None, scales=None, group=None):
    """(grid, every kernel parameter by name, launch options) of one launch; allocates y and the scratch."""
    B, K = x.shape
    splits = _check(x, wt, splits, glu, act, bias, scales, group)
    N = columns(wt, group)
    t = thresholds_2d(t, len(splits), B, x.device)
    nw, eps = _check_norm(x, norm, residual, residual_out)
    widths = list(splits) + [0] * (3 - len(splits))
    cuts = [sum(widths[:i + 1]) for i in range(3)]
    cfg, n_blocks = _config(B, K, widths, x.device, config)
    BN, KC = cfg["BN"], cfg["KC"]
    split, block_b = triton.cdiv(K, KC), 1 if B == 1 else 16
    if locks is None:
        locks = _locks(x.device, n_blocks)
    elif locks.dtype != torch.int32 or locks.device != x.device or locks.numel() < n_blocks:
        raise ValueError(f"locks must be an int32 tensor of at least {n_blocks} zeros on the activations' device")
    part = torch.empty(split * block_b * N if (split > 1 or glu) else 1, dtype=torch.float32, device=x.device)
    y = torch.empty(B, N // 2 if glu else N, dtype=x.dtype, device=x.device)
    pdl = pdl_args(x.device, cfg.get("pdl"))
    params = dict(
        **_io(x, y, t, residual, nw, residual_out), w_ptr=wt, stride_wk=wt.stride(0), part_ptr=part,
        idx_ptr=torch.empty(split * n_blocks * KC, dtype=torch.int32, device=x.device),
        val_ptr=torch.empty(split * n_blocks * KC if nw is not None else 1, dtype=x.dtype, device=x.device),
        lock_ptr=locks, bias_ptr=bias if bias is not None else part,
        scale_ptr=scales if scales is not None else part, eps=eps, B=B, K=K, N=N, N1=cuts[0],
        N2=cuts[1], NB1=triton.cdiv(widths[0], BN), NB2=triton.cdiv(widths[0], BN) + triton.cdiv(widths[1], BN),
        SPLIT=split, GLU=glu, ACT=GLU_ACTS.index(act), BLOCK_B=block_b, KC=KC, KCP=triton.next_power_of_2(KC),
        BK=cfg["BK"], BN=BN, DOT_F32=x.device.type != "cuda", RB=int(cfg.get("RB", 1)) if B == 1 else 1,
        PDL=pdl["PDL"], HAS_BIAS=bias is not None, NORM=nw is not None, HAS_R=residual is not None,
        NB=cfg.get("NB") or min(triton.next_power_of_2(K), 8192 // block_b), DENSE=int(cfg.get("DENSE", 1)),
        HAS_SCALE=scales is not None and not group, GROUP=group or 0,
        ASYM=int(bool(group) and scales is not None and scales.dim() == 3))
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_reg_args(cfg),
                   **({"launch_pdl": True} if pdl.get("launch_pdl") else {}))
    return (n_blocks, split, 1), params, options


def _io(x, y, t, residual, nw, residual_out) -> dict:
    """The kernel parameters that change from call to call: activations, output, thresholds, the fused norm's
    tensors (x stands in for those a launch does not use)."""
    return dict(x_ptr=x, stride_xb=x.stride(0), t_ptr=t, stride_tp=t.stride(0), stride_tb=t.stride(1), y_ptr=y,
                stride_yb=y.stride(0), r_ptr=residual if residual is not None else x, nw_ptr=nw if nw is not None else x,
                xo_ptr=residual_out if residual_out is not None else x)


def _launch(x, wt, t, splits, glu, **options):
    """Validate, configure and launch once (sparse_linear / sparse_glu); returns y."""
    grid, params, opts = _arguments(x, wt, t, splits, glu, **options)
    _sparse_gemv_kernel[grid](**params, **opts)
    return params["y_ptr"]


class PreparedLaunch:
    """``sparse_linear`` / ``sparse_glu`` of one weight with everything that depends only on shapes fixed
    once: config, grid, scratch buffers, constexprs, thresholds and bias on the device. A call allocates the
    output and launches the compiled kernel directly, so Triton's argument binding and cache lookup run once
    per batch size (and fused-norm variant) instead of at every call: eager callers pay a few microseconds
    of host time, not tens. Under the Triton interpreter (CPU) every call is a plain launch.

    The scratch buffers and counters are this object's: do not run one PreparedLaunch on two streams at once."""

    def __init__(self, wt, thresholds, splits=None, act: str | None = None, bias=None, locks=None, config=None,
                 scales=None, group=None):
        self.wt, self.thresholds, self.bias, self.config = wt, thresholds, bias, config
        self.scales, self.group = scales, group
        self.glu, self.act = act is not None, act or "silu"
        n = columns(wt, group)
        self.splits = None if self.glu else tuple(splits) if splits is not None else (n,)
        self.out_features = n // 2 if self.glu else n
        self.locks = locks if locks is not None else new_locks(wt.device, n // 16 + 3)
        self._ready: dict = {}  # (B, per-token thresholds, norm, residual) -> (runner, values, slot of each name)

    def prepared(self, batch: int) -> bool:
        """Has a call of this batch size (fixed thresholds, no fused norm) prepared the direct launch?"""
        return (batch, False, False, False) in self._ready

    def __call__(self, x, thresholds=None, norm=None, residual=None, residual_out=None):
        """y [B, N] (act(gate) * up, [B, N/2], for a GLU launch) of x [B, K]; ``thresholds`` per token
        ([P, B], e.g. ``topk_thresholds``) replace the fixed ones; norm, residual and residual_out as in
        ``sparse_linear``."""
        key = (x.shape[0], thresholds is not None, norm is not None, residual is not None)
        ready = self._ready.get(key)
        if ready is not None and x.is_contiguous() and _aligned(x, thresholds, residual, residual_out):
            runner, values, slot = ready
            y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            for name, v in (("x_ptr", x), ("y_ptr", y), ("r_ptr", x if residual is None else residual),
                            ("xo_ptr", x if residual_out is None else residual_out),
                            ("nw_ptr", x if norm is None else norm[0])):
                values[slot[name]] = v
            if thresholds is not None:
                values[slot["t_ptr"]] = thresholds
            runner(*values)
            return y
        t = self.thresholds if thresholds is None else thresholds
        grid, params, opts = _arguments(x, self.wt, t, self.splits, self.glu, config=self.config, act=self.act,
                                        bias=self.bias, locks=self.locks, norm=norm, residual=residual,
                                        residual_out=residual_out, scales=self.scales, group=self.group)
        compiled = _sparse_gemv_kernel[grid](**params, **opts)
        per_token_ok = thresholds is None or (thresholds.is_contiguous() and thresholds.dim() == 2)
        if isinstance(compiled, CompiledKernel) and per_token_ok and _aligned(x, thresholds, residual, residual_out):
            names = _sparse_gemv_kernel.arg_names
            self._ready[key] = (compiled[grid], [params[n] for n in names], {n: i for i, n in enumerate(names)})
        return params["y_ptr"]


def _aligned(*tensors) -> bool:
    """Every given tensor starts on a 16-byte boundary (what the compiled kernel was specialised for)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _check_norm(x, norm, residual, residual_out):
    """(norm weight, eps) of a fused residual add + RMSNorm, validated against x; (None, 0.0) without one."""
    if norm is None:
        if residual is not None or residual_out is not None:
            raise ValueError("a residual is added only in front of a fused RMSNorm (norm=(weight, eps))")
        return None, 0.0
    nw, eps = norm
    if x.shape[0] != 1:
        raise ValueError(f"the fused RMSNorm is for one-token decoding, got {x.shape[0]} tokens")
    if not x.is_contiguous() or tuple(nw.shape) != (x.shape[1],) or nw.device != x.device or not nw.is_contiguous():
        raise ValueError(f"a fused RMSNorm needs x contiguous and a contiguous [{x.shape[1]}] weight on its device")
    if (residual is None) != (residual_out is None):
        raise ValueError("residual and residual_out go together: x + residual is written to residual_out")
    for name, r in (("residual", residual), ("residual_out", residual_out)):
        if r is not None and (r.shape != x.shape or r.dtype != x.dtype or r.device != x.device
                              or not r.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous tensor of x's shape, dtype and device")
    if residual_out is not None and residual_out.data_ptr() in (x.data_ptr(), residual.data_ptr()):
        raise ValueError("residual_out must not alias x or residual (other programs still read them)")
    return nw, float(eps)


def _reg_args(cfg):
    """maxnreg only when set (the interpreter and older launch paths take no such option)."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}


def use_sparse(sparsity: float, batch: int = 1, nbytes: int | None = None) -> bool:
    """Dispatch rule: run the sparse kernel, or dense cuBLAS (``x @ wt``) on the same weights?

    Decided before the run from the planned sparsity and the weight size, never from the data.
    - The expected fraction of weight rows read, 1 - s**B for independent token masks, must be small
      enough: up to 0.8 for one token (FMA path); for several (tensor-core path) up to 0.6 for 2-4 tokens
      and 0.45 for 5-8. On an H200 (reports/gpu/issue12) the several-token kernel broke even with cuBLAS
      at a kept fraction of about 0.74 (2 tokens), 0.67 (4) and 0.56 (8): 8 tokens at 90% (0.57 kept) ran
      at 0.96-0.98x dense under the old single cut-off of 0.6.
    - The bytes skipped, (s**B) * nbytes, must be worth the kernel's extra fixed cost over cuBLAS (a few
      microseconds: compaction prologue, split-K ticket): at least 8 MB, about 2.7 us at 3 TB/s; or one
      token at 65% or more, whatever the size: in the decode step a sparse qkv or gate/up launch also takes
      over the block's residual add and RMSNorm (SmolLM2-135M shape, H200, every group sparse: 0.97x dense
      at 50%, 1.06x at 70%, 1.17x at 90%; its qkv and gate/up groups alone: 1.04x and 1.09x;
      reports/gpu/README.md)."""
    skipped = sparsity ** batch
    if 1.0 - skipped > (0.8 if batch == 1 else 0.6 if batch <= 4 else 0.45):
        return False
    return nbytes is None or skipped * nbytes >= 8e6 or (batch == 1 and sparsity >= 0.65)



def sparse_linear(x, wt, thresholds, splits=None, config=None, bias=None, locks=None, norm=None, residual=None,
                  residual_out=None, scales=None, group=None):
    """y [B, N] = sparsify(x) @ wt (+ bias) for 1..3 projections concatenated in wt's columns.

    x [B, K] fp16/bf16 (B <= 8); wt [K, N] input-major, same dtype; thresholds a float32 device tensor of
    shape [P] (one per projection) or [P, B] (per token, e.g. from ``topk_thresholds``); a row of x is kept
    where |x| > threshold. splits: the output widths of the P projections (q/k/v: (Nq, Nk, Nv)). bias: fp32
    [N] (learned output biases), added in fp32 in the epilogue before the one rounding. locks: the caller's
    ticket counters (``new_locks``); default: one buffer per device.

    norm=(weight [K], eps), one token: the block's RMSNorm fused in front, the input being rmsnorm(x +
    residual) * weight (``add_rmsnorm``'s rounding); x + residual is written to residual_out (a tensor like
    x, neither x nor residual), the residual stream of the next block. One launch instead of two.

    scales: wt holds int8 weights (``quantize_int8``: symmetric, per output channel) with these fp32 [N]
    scales; the kept rows are read as int8, half the bytes of fp16, and converted in registers. With ``group``,
    wt holds int4 weights packed two to a byte along the columns ([K, N / 2] uint8, ``quantize_int4``) with
    fp16 scales [ceil(K / group), N], or fp16 (scale, min) pairs [ceil(K / group), N, 2] (``quantize_q4_1``,
    GGUF Q4_1's bytes): 0.52 (int4, group 128) or 0.625 (Q4_1) bytes a weight against fp16's 2, dequantized in
    registers.

    Every call binds and checks its arguments (tens of microseconds of host time); a caller that launches
    the same weights many times eagerly holds a ``PreparedLaunch`` instead."""
    splits = tuple(splits) if splits is not None else (columns(wt, group),)
    return _launch(x, wt, thresholds, splits, glu=False, config=config, bias=bias, locks=locks, norm=norm,
                   residual=residual, residual_out=residual_out, scales=scales, group=group)


def sparse_glu(x, wt_gate_up, thresholds, act="silu", config=None, bias=None, locks=None, norm=None, residual=None,
               residual_out=None, scales=None, group=None):
    """h [B, I] = act(sparsify(x, t0) @ Wg + bg) * (sparsify(x, t1) @ Wu + bu), wt_gate_up = [Wg.T | Wu.T]
    [K, 2I]; act silu (SwiGLU) or gelu_tanh (GeGLU); bias [bg | bu] fp32 [2I] or None; norm, residual and
    residual_out: the fused RMSNorm in front, as in ``sparse_linear``; scales, group: quantized weights, as there."""
    return _launch(x, wt_gate_up, thresholds, None, glu=True, config=config, act=act, bias=bias, locks=locks,
                   norm=norm, residual=residual, residual_out=residual_out, scales=scales, group=group)


def sparse_swiglu(x, wt_gate_up, thresholds, config=None):
    """h [B, I] = silu(sparsify(x, t0) @ Wg) * (sparsify(x, t1) @ Wu), wt_gate_up = [Wg.T | Wu.T] [K, 2I]."""
    return sparse_glu(x, wt_gate_up, thresholds, "silu", config)
