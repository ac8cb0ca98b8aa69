"""Sparse GEMV for decoding: y = sparsify(x) @ Wt, reading only the weight rows that survive the threshold.

Weights are stored input-major, ``wt = W.T`` contiguous with shape [in, out], so dropping input channel k
drops one contiguous row of ``wt``. Each program owns a block of output columns and a chunk of input rows:

1. it loads its chunk of x for every token (B <= 8), applies the thresholds (|x| <= t -> 0) and takes the
   union of the kept rows over tokens;
2. it compacts the kept row indices with a cumulative sum into a private scratch buffer, so the weight
   stream below skips single rows, not blocks of rows (with random sparsity a block is rarely all zero);
   one token whose chunk keeps over two thirds of its rows skips this and streams every row tile with the
   rows under the threshold masked off (a masked row moves no bytes; 3-5% faster at 30% on an H100);
3. it streams only the gathered rows, accumulating in fp32 (FMA for one token, ``tl.dot`` for several);
   one token sums each tile of gathered rows inside the threads into an accumulator of RB rows;
4. the chunks of one column block are summed deterministically: each program writes its partial sums, and
   the last program to finish (a ticket counter, reset by that program) adds them in chunk order and writes
   the output. One launch, no atomics on the output, no zeroing pass, no host synchronisation, fixed grid:
   it can be captured in a CUDA graph.

Several projections that share an input (q/k/v, or gate/up) run in one launch with their own thresholds:
their weights are concatenated along the output dimension. ``sparse_glu`` also fuses act(gate) * up, with
act silu (SwiGLU: ``sparse_swiglu``) or gelu with the tanh approximation (GeGLU, Gemma): gate block j and up
block j share one ticket, and the last of their programs writes act(g) * u.

For one token the block's residual add and RMSNorm can run in front (``norm=``): each program reads the
whole row of x + r (L2) for the 1/rms, normalises its chunk before step 1 and keeps the sparsified values
beside the compacted indices (the stream reads them there instead of gathering x); the programs of column
block 0 write x + r, the next residual stream. One launch instead of two in the decode step.

This file holds the device code and its torch references; ``launch.py`` launches it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BATCH = 8
GLU_ACTS = ("silu", "gelu_tanh")  # the gate activations of sparse_glu (the kernel's ACT: their index)


# ----------------------------------------------------------------------------------------------------------
# Torch references (the ground truth for the kernels)


def sparsify_ref(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x [B, K] with |x| <= threshold set to zero; threshold broadcasts as [B] or scalar (fp32 compare)."""
    t = torch.as_tensor(threshold, dtype=torch.float32, device=x.device).reshape(-1, 1)
    xf = x.float()
    return torch.where(xf.abs() > t, xf, torch.zeros_like(xf))


def dequantize_ref(wt, scales=None, group: int | None = None) -> torch.Tensor:
    """fp32 weights [K, N] of wt: a float dtype (no scales); int8 with per-column fp32 ``scales`` [N]; or, with
    ``group``, int4 packed two to a byte along the columns ([K, N / 2] uint8, column 2c in the low nibble of
    byte c) with fp16 ``scales`` [ceil(K / group), N], w = (q - 8) * scale, or [ceil(K / group), N, 2] of
    (scale, min) pairs, w = q * scale + min."""
    if scales is None:
        return wt.float()
    if group is None:
        return wt.float() * scales.float()
    packed = wt.to(torch.int32)
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(wt.shape[0], -1)
    per_row = _per_row(scales.float(), group, wt.shape[0])
    if scales.dim() == 3:  # (scale, min) pairs: GGUF Q4_1's grid
        return q.float() * per_row[..., 0] + per_row[..., 1]
    return (q - 8).float() * per_row


def _symmetric_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """absmax / qmax: the step of a symmetric quantizer; 1 where the values are all zero."""
    scale = absmax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _grouped(wt: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 [ceil(K / group), group, N] of input-major wt [K, N] (N even: int4 packs two columns to a byte); a
    partial last group is padded with copies of the last row, which change no group's min, max or max |w|."""
    K, N = wt.shape
    if N % 2:
        raise ValueError(f"int4 packs two columns to a byte: N must be even, got {N}")
    w = wt.float()
    return torch.cat([w, w[-1:].expand(-(-K // group) * group - K, N)]).reshape(-1, group, N)


def _per_row(per_group: torch.Tensor, group: int, K: int) -> torch.Tensor:
    """A tensor [groups, ...] repeated for each of its group's rows: [K, ...]."""
    return per_group.repeat_interleave(group, dim=0)[:K]


def _pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values q [K, N] (0..15) two to a byte along the columns, column 2c in the low nibble: uint8 [K, N/2]."""
    q = q.to(torch.int32)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


def quantize_int4(wt: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 of input-major weights wt [K, N] (N even) in groups of ``group`` input rows per column:
    (packed uint8 [K, N / 2], scale fp16 [ceil(K / group), N]) with wt ~ (q - 8) * scale, q in 0..15,
    scale = max |w| over the group / 7 rounded to fp16, as AWQ and GPTQ store it (1 where the group is all
    zero)."""
    scale = _symmetric_scale(_grouped(wt, group).abs().amax(dim=1), 7).half()
    q = torch.round(wt.float() / _per_row(scale.float(), group, wt.shape[0])).clamp_(-8, 7) + 8
    return _pack(q), scale.contiguous()


def quantize_q4_1(wt: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_1's grid on input-major weights wt [K, N] (N even), in groups of ``group`` input rows per column:
    (packed uint8 [K, N / 2], (scale, min) fp16 [ceil(K / group), N, 2]) with wt ~ q * scale + min, q in 0..15,
    scale = (max - min) / 15 over the group, both rounded to fp16 as GGUF stores them: 5 bits a weight at group
    32, the file's own bytes. Weights dequantized from a Q4_1 GGUF (in fp32) come back as the file's own q,
    scale and min."""
    g = _grouped(wt, group)
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo)).half().float()
    lo = lo.half().float()
    K = wt.shape[0]
    q = torch.round((wt.float() - _per_row(lo, group, K)) / _per_row(scale, group, K)).clamp_(0, 15)
    return _pack(q), torch.stack([scale, lo], dim=-1).half().contiguous()


def quantize_int8(wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of input-major weights wt [K, N]: (q int8 [K, N], scale fp32 [N]) with
    wt ~ q * scale, scale = max |wt[:, n]| / 127 (1 where a column is all zero)."""
    w = wt.float()
    scale = _symmetric_scale(w.abs().amax(dim=0), 127)
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale.contiguous()


INT4_GROUP = 128  # input rows per int4 scale: AWQ's and GPTQ's usual group (0.125 bit of fp16 scale a weight)
Q4_1_GROUP = 32  # GGUF Q4_1's block


def quantize(wt: torch.Tensor, fmt: str, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(weights, scales, group) of input-major wt [K, N] in ``fmt`` for the kernel's ``scales=`` / ``group=``:
    "int8" per output channel (group None), "int4" in groups of ``group`` input rows, or "q4_1" (GGUF's grid:
    a scale and a minimum per 32 input rows)."""
    if fmt == "int8":
        return (*quantize_int8(wt), None)
    if fmt == "int4":
        return (*quantize_int4(wt, group), group)
    if fmt == "q4_1":
        return (*quantize_q4_1(wt, Q4_1_GROUP), Q4_1_GROUP)
    raise ValueError(f"unknown weight format {fmt!r} (int8, int4 or q4_1)")


def sparse_linear_ref(x, wt, thresholds, splits=None, bias=None, scales=None, group=None):
    """Reference of ``sparse_linear``: fp32 math, output in x's dtype.

    thresholds is [P] or [P, B] (one per projection, optionally per token); splits are the output widths of
    the P projections concatenated in wt (default: one projection of all columns); bias fp32 [N] or None;
    scales (and group): quantized weights, as ``dequantize_ref`` reads them."""
    w = dequantize_ref(wt, scales, group)
    splits = list(splits) if splits is not None else [w.shape[1]]
    t = thresholds_2d(thresholds, len(splits), x.shape[0], x.device)
    outs, col = [], 0
    for p, n in enumerate(splits):
        outs.append(sparsify_ref(x, t[p]) @ w[:, col:col + n])
        col += n
    y = torch.cat(outs, dim=1)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def sparse_glu_ref(x, wt_gate_up, thresholds, act="silu", bias=None, scales=None, group=None):
    """Reference of ``sparse_glu``: act(sparsify(x, t0) @ Wg + bg) * (sparsify(x, t1) @ Wu + bu), fp32 math;
    act is silu or gelu_tanh (gelu with the tanh approximation); bias [bg | bu] fp32 [2I] or None; scales (and
    group): quantized weights, as ``dequantize_ref`` reads them."""
    w = dequantize_ref(wt_gate_up, scales, group)
    inter = w.shape[1] // 2
    t = thresholds_2d(thresholds, 2, x.shape[0], x.device)
    g = sparsify_ref(x, t[0]) @ w[:, :inter]
    u = sparsify_ref(x, t[1]) @ w[:, inter:]
    if bias is not None:
        g, u = g + bias[:inter].float(), u + bias[inter:].float()
    fn = {"silu": torch.nn.functional.silu, "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}
    return (fn[act](g) * u).to(x.dtype)


def sparse_swiglu_ref(x, wt_gate_up, thresholds):
    """Reference of ``sparse_swiglu``: silu(sparsify(x, t0) @ Wg) * (sparsify(x, t1) @ Wu), fp32 math."""
    return sparse_glu_ref(x, wt_gate_up, thresholds, "silu")


def thresholds_2d(t, P: int, B: int, device) -> torch.Tensor:
    """Thresholds as fp32 [P, B] on ``device``: a scalar or [P] (one per projection) broadcasts over the B
    tokens. Host values are copied to the device (not for graph capture); a tensor must already be fp32
    there (a conversion would be a hidden launch)."""
    if not torch.is_tensor(t):
        t = torch.tensor(t, dtype=torch.float32, device=device)
    if t.dtype != torch.float32 or t.device != torch.device(device):
        raise ValueError("threshold tensors must be float32 on the activations' device")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() == 1:
        if t.numel() != P:
            raise ValueError(f"need {P} thresholds, got {t.numel()}")
        return t.reshape(P, 1).expand(P, B)
    if tuple(t.shape) != (P, B):
        raise ValueError(f"thresholds must be [P] or [P, B] with P={P}, B={B}, got {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _residual(x_ptr, r_ptr, offs, m, HAS_R: tl.constexpr):
    """x (+ r, rounded to x's dtype as the reference's residual add) at offs."""
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    if HAS_R:
        x = (x.to(tl.float32) + tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _rms_inv(x_ptr, r_ptr, stride_xb, rb, bmask, K, eps, HAS_R: tl.constexpr, NB: tl.constexpr):
    """1 / rms over all K inputs of each token's x (+ r), fp32 [BLOCK_B]: the RMSNorm fused in front of the
    projection (every program reads the whole row from L2; one tile when NB >= K)."""
    ss = tl.zeros(rb.shape, dtype=tl.float32)
    for k0 in range(0, K, NB):
        rk = k0 + tl.arange(0, NB)
        m = bmask[:, None] & (rk < K)[None, :]
        v = _residual(x_ptr, r_ptr, rb[:, None] * stride_xb + rk[None, :], m, HAS_R).to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _compact(x_ptr, stride_xb, t_ptr, stride_tb, idx_ptr, val_ptr, B, kstart, kend, r_ptr, nw_ptr, xo_ptr,
             inv, store_x, BLOCK_B: tl.constexpr, KC: tl.constexpr, KCP: tl.constexpr, NORM: tl.constexpr,
             HAS_R: tl.constexpr, DENSE: tl.constexpr):
    """Kept rows of x[:, kstart:kend] (union over tokens; kend - kstart <= KC <= KCP, a power of two),
    compacted in order into idx; returns their count and whether the chunk is read in place instead.

    In place (DENSE 2; DENSE 1: when over two thirds of the chunk's rows are kept) nothing is compacted: the
    masked stream reads every row tile and skips the rows under the threshold. NORM: x is first replaced by
    rmsnorm(x (+ r)) * nw (inv: each token's 1 / rms) in the reference's rounding, and the values are kept in
    val [B, KC] (compacted beside their indices, or in place) for the stream to read instead of x; with HAS_R
    the programs of column block store_x == 0 write x + r to xo (the residual stream)."""
    rb = tl.arange(0, BLOCK_B)
    bmask = rb < B
    thr = tl.load(t_ptr + rb * stride_tb, mask=bmask, other=float("inf"))
    rk = kstart + tl.arange(0, KCP)
    kmask = rk < kend
    m2 = bmask[:, None] & kmask[None, :]
    offs = rb[:, None] * stride_xb + rk[None, :]
    xs = _residual(x_ptr, r_ptr, offs, m2, HAS_R)
    if NORM:
        if HAS_R:
            tl.store(xo_ptr + offs, xs, mask=m2 & (tl.zeros_like(rb)[:, None] == store_x))
        nw = tl.load(nw_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
        # normalise, round, scale: as add_rmsnorm (the product of two 16-bit floats is exact in fp32)
        xs = ((xs.to(tl.float32) * inv[:, None]).to(xs.dtype).to(tl.float32) * nw[None, :]).to(xs.dtype)
    keep = (tl.abs(xs.to(tl.float32)) > thr[:, None]) & m2
    row = tl.max(keep.to(tl.int32), axis=0)  # union of the tokens' masks
    kept = tl.sum(row, axis=0)
    if DENSE == 2:
        dense = kept >= 0
    elif DENSE == 1:
        dense = kept * 3 > (kend - kstart) * 2
    else:
        dense = kept < 0
    compact = (row * 0 + dense.to(tl.int32)) == 0  # [KCP]: every entry the program's choice
    pos = tl.cumsum(row, axis=0)
    tl.store(idx_ptr + pos - 1, rk, mask=(row > 0) & compact)
    if NORM:  # the normalised values exist only here: keep them (compacted, or in place)
        tl.store(val_ptr + rb[:, None] * KC + (pos - 1)[None, :], tl.where(keep, xs, 0.0).to(xs.dtype),
                 mask=bmask[:, None] & ((row > 0) & compact)[None, :])
        tl.store(val_ptr + rb[:, None] * KC + (rk - kstart)[None, :], xs, mask=m2 & ~compact[None, :])
    tl.debug_barrier()  # the whole program reads what all its threads wrote
    return kept, dense


@triton.jit
def _stream_rows(x_ptr, stride_xb, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, t_ptr, stride_tb, idx_ptr, nnz, B,
                 cols, col_mask, BLOCK_B: tl.constexpr, KC: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                 DOT_F32: tl.constexpr, VALS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr):
    """fp32 [BLOCK_B, BN]: sum over the nnz rows k listed in idx of sparsify(x[:, k]) * wt[k, cols] (VALS:
    the sparsified values are read from val, compacted beside idx)."""
    rb = tl.arange(0, BLOCK_B)
    bmask = rb < B
    thr = tl.load(t_ptr + rb * stride_tb, mask=bmask, other=float("inf"))
    if BLOCK_B == 1:
        # one token: FMA into a [BK, BN] accumulator (summed once at the end), pipelined by hand: the row
        # indices of block j+1 are loaded while the rows of block j are in flight, so the index load (L2)
        # and the weight-row load (DRAM) overlap. (Leaving it to the compiler's pipeliner, num_stages 3, was
        # as fast on 4096/11008-wide shapes and 4-7% slower on 14336-wide ones: reports/gpu/README.md.)
        kk = _load_idx(idx_ptr, 0, nnz, BK)
        w, xv = _load_rows(x_ptr, stride_xb, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, rb, bmask, thr, kk, 0, nnz,
                           cols, col_mask, KC, BK, VALS, GROUP, ASYM)
        kk = _load_idx(idx_ptr, BK, nnz, BK)
        acc2 = tl.zeros([BK, BN], dtype=tl.float32)
        for j in range(BK, nnz + BK, BK):
            w_next, xv_next = _load_rows(x_ptr, stride_xb, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, rb, bmask, thr,
                                         kk, j, nnz, cols, col_mask, KC, BK, VALS, GROUP, ASYM)
            kk = _load_idx(idx_ptr, j + BK, nnz, BK)
            acc2 += w.to(tl.float32) * tl.sum(xv.to(tl.float32), axis=0)[:, None]
            w, xv = w_next, xv_next
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        # several tokens: tensor-core dot of [BLOCK_B, BK] activations with the [BK, BN] gathered rows
        acc = tl.zeros([BLOCK_B, BN], dtype=tl.float32)
        for j in range(0, nnz, BK):
            kk = _load_idx(idx_ptr, j, nnz, BK)
            w, xv = _load_rows(x_ptr, stride_xb, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, rb, bmask, thr, kk, j,
                               nnz, cols, col_mask, KC, BK, VALS, GROUP, ASYM)
            if DOT_F32:  # the interpreter's dot is wrong for bf16; fp32 operands hold the same values
                acc = tl.dot(xv.to(tl.float32), w.to(tl.float32), acc)
            else:  # int8 rows are converted to the activations' dtype in registers
                acc = tl.dot(xv, w.to(xv.dtype), acc)
    return acc


@triton.jit
def _stream_rows_grouped(x_ptr, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, t_ptr, idx_ptr, nnz, cols, col_mask,
                         RB: tl.constexpr, BKR: tl.constexpr, BN: tl.constexpr, VALS: tl.constexpr,
                         GROUP: tl.constexpr, ASYM: tl.constexpr):
    """One token, fp32 [1, BN], with an accumulator of RB rows instead of BK = RB * BKR: each tile of
    gathered rows is loaded as [RB, BKR, BN] and summed over its BKR axis before it is added. Triton lays
    the tile out with that axis inside each thread (threads over RB and BN, read in the TTGIR for sm_90), so
    the sum is in registers and the accumulator takes 8 registers a thread instead of the 64 of the [BK, BN]
    one in _stream_rows. Pipelined like _stream_rows: tile j+1 and the indices of tile j+2 are requested
    before tile j is summed."""
    thr = tl.load(t_ptr)
    r2 = tl.arange(0, RB)[:, None] * BKR + tl.arange(0, BKR)[None, :]
    BK = RB * BKR
    kk = tl.load(idx_ptr + r2, mask=r2 < nnz, other=0)
    w, xv = _load_rows_grouped(x_ptr, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, thr, kk, r2, 0, nnz, cols, col_mask,
                               VALS, GROUP, ASYM)
    kk = tl.load(idx_ptr + BK + r2, mask=(BK + r2) < nnz, other=0)
    acc = tl.zeros([RB, BN], dtype=tl.float32)
    for j in range(BK, nnz + BK, BK):
        w_next, xv_next = _load_rows_grouped(x_ptr, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, thr, kk, r2, j, nnz,
                                             cols, col_mask, VALS, GROUP, ASYM)
        kk = tl.load(idx_ptr + j + BK + r2, mask=(j + BK + r2) < nnz, other=0)
        acc += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[:, :, None], axis=1)
        w, xv = w_next, xv_next
    return tl.sum(acc, axis=0)[None, :]


@triton.jit
def _load_rows_grouped(x_ptr, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, thr, kk, r2, j, nnz, cols, col_mask,
                       VALS: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr):
    """Gathered rows kk [RB, BKR] as [RB, BKR, BN] and their sparsified activations (zeros past nnz)."""
    jm = (j + r2) < nnz
    w = _weights(w_ptr, stride_wk, s_ptr, stride_sg, kk[:, :, None], cols[None, None, :],
                 jm[:, :, None] & col_mask[None, None, :], GROUP, ASYM)
    if VALS:
        return w, tl.load(val_ptr + j + r2, mask=jm, other=0.0)
    xv = tl.load(x_ptr + kk, mask=jm, other=0.0)
    return w, tl.where(tl.abs(xv.to(tl.float32)) > thr, xv, 0.0)


@triton.jit
def _stream_masked(x_ptr, w_ptr, stride_wk, s_ptr, stride_sg, t_ptr, k0, kend, cols, col_mask, RB: tl.constexpr,
                   BKR: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr):
    """One token, fp32 [1, BN], without compaction: every tile of RB * BKR rows of the chunk [k0, kend), each
    row's load masked off where its activation is under the threshold (a masked row moves no bytes). The
    activations run two tiles ahead of the weights, so each weight load waits on no x load."""
    thr = tl.load(t_ptr)
    r2 = tl.arange(0, RB)[:, None] * BKR + tl.arange(0, BKR)[None, :]
    BK = RB * BKR
    wa, xa = _load_masked(w_ptr, stride_wk, s_ptr, stride_sg, thr,
                          tl.load(x_ptr + k0 + r2, mask=(k0 + r2) < kend, other=0.0), k0 + r2, kend, cols, col_mask,
                          GROUP, ASYM)
    xb = tl.load(x_ptr + k0 + BK + r2, mask=(k0 + BK + r2) < kend, other=0.0)
    acc = tl.zeros([RB, BN], dtype=tl.float32)
    for j in range(k0 + BK, kend + BK, BK):
        wb, xsb = _load_masked(w_ptr, stride_wk, s_ptr, stride_sg, thr, xb, j + r2, kend, cols, col_mask, GROUP,
                               ASYM)
        xb = tl.load(x_ptr + j + BK + r2, mask=(j + BK + r2) < kend, other=0.0)
        acc += tl.sum(wa.to(tl.float32) * xa.to(tl.float32)[:, :, None], axis=1)
        wa, xa = wb, xsb
    return tl.sum(acc, axis=0)[None, :]


@triton.jit
def _load_masked(w_ptr, stride_wk, s_ptr, stride_sg, thr, xv, rows, kend, cols, col_mask, GROUP: tl.constexpr,
                 ASYM: tl.constexpr):
    """Weight rows [RB, BKR, BN] of the chunk (rows < kend) whose activation xv passes the threshold, and
    those activations (zeros elsewhere, in both)."""
    keep = (tl.abs(xv.to(tl.float32)) > thr) & (rows < kend)
    w = _weights(w_ptr, stride_wk, s_ptr, stride_sg, rows[:, :, None], cols[None, None, :],
                 keep[:, :, None] & col_mask[None, None, :], GROUP, ASYM)
    return w, tl.where(keep, xv, 0.0)


@triton.jit
def _weights(w_ptr, stride_wk, s_ptr, stride_sg, rows, cols, mask, GROUP: tl.constexpr, ASYM: tl.constexpr):
    """Weights of wt at (rows, cols) (broadcasting index tensors; 0 where masked): as stored (fp16, bf16, int8),
    or with GROUP > 0 int4 packed two to a byte along the columns (column 2c in the low nibble of byte c),
    returned as fp32 (q - 8) * scale[row // GROUP, col], or with ASYM q * scale + min from the pairs
    (scale, min)[row // GROUP, col] (GGUF Q4_1's grid)."""
    if GROUP == 0:
        return tl.load(w_ptr + rows * stride_wk + cols, mask=mask, other=0.0)
    packed = tl.load(w_ptr + rows * stride_wk + cols // 2, mask=mask, other=0).to(tl.int32)
    q = (packed >> ((cols % 2) * 4)) & 15
    if ASYM:
        pair = s_ptr + (rows // GROUP) * stride_sg + cols * 2
        scale = tl.load(pair, mask=mask, other=0.0).to(tl.float32)
        return q.to(tl.float32) * scale + tl.load(pair + 1, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(s_ptr + (rows // GROUP) * stride_sg + cols, mask=mask, other=0.0).to(tl.float32)
    return (q - 8).to(tl.float32) * scale


@triton.jit
def _load_idx(idx_ptr, j, nnz, BK: tl.constexpr):
    """Compacted row indices idx[j:j+BK] (0 past nnz)."""
    rj = j + tl.arange(0, BK)
    return tl.load(idx_ptr + rj, mask=rj < nnz, other=0)


@triton.jit
def _load_rows(x_ptr, stride_xb, val_ptr, w_ptr, stride_wk, s_ptr, stride_sg, rb, bmask, thr, kk, j, nnz, cols,
               col_mask, KC: tl.constexpr, BK: tl.constexpr, VALS: tl.constexpr, GROUP: tl.constexpr,
               ASYM: tl.constexpr):
    """Gathered weight rows kk and the matching sparsified activations (zeros past nnz): gathered from x and
    thresholded, or (VALS) read from the compacted values."""
    rj = j + tl.arange(0, BK)
    jm = rj < nnz
    w = _weights(w_ptr, stride_wk, s_ptr, stride_sg, kk[:, None], cols[None, :], jm[:, None] & col_mask[None, :], GROUP,
                 ASYM)
    if VALS:
        return w, tl.load(val_ptr + rb[:, None] * KC + rj[None, :], mask=bmask[:, None] & jm[None, :], other=0.0)
    xv = tl.load(x_ptr + rb[:, None] * stride_xb + kk[None, :], mask=bmask[:, None] & jm[None, :], other=0.0)
    return w, tl.where(tl.abs(xv.to(tl.float32)) > thr[:, None], xv, 0.0)


@triton.jit
def tanh(x):
    """tanh from exp, exact at both ends (exp overflow gives 1, underflow -1): Triton has no tanh of its own
    on every backend (the interpreter included)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _glu(g, u, ACT: tl.constexpr):
    """act(g) * u in fp32: ACT 0 silu, 1 gelu with the tanh approximation (GLU_ACTS)."""
    if ACT == 1:
        return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * u
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _finish(acc, y_ptr, stride_yb, part_ptr, NT, lock_ptr, lock_id, pid_k, rb, bmask, cols, cmask, ycols,
            bias_ptr, TICKETS: tl.constexpr, SPLIT: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr,
            BLOCK_B: tl.constexpr, BN: tl.constexpr, HALF, HAS_BIAS: tl.constexpr):
    """Deterministic split-K reduction + epilogue. Each program stores its partial sums [BLOCK_B, BN] at
    part[pid_k, :, cols]; the last of the TICKETS programs sharing lock_id adds them in chunk order, adds
    the fp32 bias (HAS_BIAS: a learned output bias, read once per column) and writes y[:, ycols] (GLU:
    act(gate) * up, the up columns HALF to the right of the gate columns)."""
    m2 = bmask[:, None] & cmask[None, :]
    if TICKETS == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
        tl.store(y_ptr + rb[:, None] * stride_yb + ycols[None, :], acc.to(y_ptr.dtype.element_ty), mask=m2)
    else:
        tl.store(part_ptr + pid_k * BLOCK_B * NT + rb[:, None] * NT + cols[None, :], acc, mask=m2)
        tl.debug_barrier()  # every thread's partials are stored before the ticket is taken
        ticket = tl.atomic_add(lock_ptr + lock_id, 1)  # acq_rel, gpu scope
        if ticket == TICKETS - 1:
            g = tl.zeros([BLOCK_B, BN], dtype=tl.float32)
            u = tl.zeros([BLOCK_B, BN], dtype=tl.float32)
            for s in range(SPLIT):
                ps = part_ptr + s * BLOCK_B * NT + rb[:, None] * NT + ycols[None, :]
                g += tl.load(ps, mask=m2, other=0.0, cache_modifier=".cg")
                if GLU:
                    u += tl.load(ps + HALF, mask=m2, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                g += tl.load(bias_ptr + ycols, mask=cmask, other=0.0)[None, :]
                if GLU:
                    u += tl.load(bias_ptr + ycols + HALF, mask=cmask, other=0.0)[None, :]
            if GLU:
                g = _glu(g, u, ACT)
            tl.store(y_ptr + rb[:, None] * stride_yb + ycols[None, :], g.to(y_ptr.dtype.element_ty), mask=m2)
            tl.store(lock_ptr + lock_id, 0)  # ready for the next launch (and the next graph replay)


@triton.jit
def _sparse_gemv_kernel(x_ptr, stride_xb, w_ptr, stride_wk, t_ptr, stride_tp, stride_tb,
                        y_ptr, stride_yb, part_ptr, idx_ptr, val_ptr, lock_ptr, bias_ptr, r_ptr, nw_ptr, xo_ptr,
                        scale_ptr, eps, B, K, N, N1, N2, NB1, NB2,
                        SPLIT: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, BLOCK_B: tl.constexpr,
                        KC: tl.constexpr, KCP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                        DOT_F32: tl.constexpr, RB: tl.constexpr, PDL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        NORM: tl.constexpr, HAS_R: tl.constexpr, NB: tl.constexpr, DENSE: tl.constexpr,
                        HAS_SCALE: tl.constexpr, GROUP: tl.constexpr, ASYM: tl.constexpr):
    """Grid (column blocks, SPLIT). Up to 3 projections concatenated in wt's columns, split at N1 and N2
    (their first column blocks are NB1 and NB2), projection p using thresholds t[p]. GLU mode: wt = [gate |
    up] (N1 = N/2 columns each, NB1 blocks each); gate block j and up block j share one ticket counter and
    the last of their programs writes act(gate) * up to y[:, block j]. NORM: the input is rmsnorm(x (+ r))
    * nw, the residual add and RMSNorm of the block fused in front (the programs of column block 0 write
    x + r to xo). HAS_SCALE: wt holds int8 weights, column n of W.T scaled by scale[n] (per output channel);
    the rows are converted in registers and each partial sum scaled before the reduction. GROUP > 0: wt holds
    int4 weights packed two to a byte along the columns, scale [K / GROUP, N] fp16 per group of GROUP input
    rows and column (ASYM: [K / GROUP, N, 2], a scale and a minimum; ``_weights``), dequantized in registers
    as they are read."""
    if PDL:  # programmatic dependent launch: nothing before this reads what the previous kernel wrote
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k0 = pid_k * KC
    rb = tl.arange(0, BLOCK_B)
    bmask = rb < B
    proj = (pid_n >= NB1).to(tl.int32) + (pid_n >= NB2).to(tl.int32)
    col0 = tl.where(proj == 0, 0, tl.where(proj == 1, N1, N2))
    blk0 = tl.where(proj == 0, 0, tl.where(proj == 1, NB1, NB2))
    col_end = tl.where(proj == 0, N1, tl.where(proj == 1, N2, N))
    cols = col0 + (pid_n - blk0) * BN + tl.arange(0, BN)
    cmask = cols < col_end
    t_proj = t_ptr + proj * stride_tp
    kend = tl.minimum(K, k0 + KC)
    inv = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM:
        inv = _rms_inv(x_ptr, r_ptr, stride_xb, rb, bmask, K, eps, HAS_R, NB)
    scratch = (pid_k * tl.num_programs(0) + pid_n).to(tl.int64) * KC  # this program's private rows
    rows_ptr = idx_ptr + scratch
    vals_ptr = val_ptr + scratch  # NORM: one token
    rows, dense = _compact(x_ptr, stride_xb, t_proj, stride_tb, rows_ptr, vals_ptr, B, k0, kend, r_ptr, nw_ptr,
                           xo_ptr, inv, pid_n, BLOCK_B, KC, KCP, NORM, HAS_R, DENSE if BLOCK_B == 1 and RB > 1 else 0)
    stride_sg = N * (1 + ASYM)  # a group's row of scales: N of them, or N (scale, min) pairs
    if BLOCK_B == 1 and RB > 1:
        if dense:  # every row tile of the chunk, rows under the threshold masked off
            src = vals_ptr - k0 if NORM else x_ptr
            acc = _stream_masked(src, w_ptr, stride_wk, scale_ptr, stride_sg, t_proj, k0, kend, cols, cmask, RB,
                                 BK // RB, BN, GROUP, ASYM)
        else:
            acc = _stream_rows_grouped(x_ptr, vals_ptr, w_ptr, stride_wk, scale_ptr, stride_sg, t_proj, rows_ptr, rows,
                                       cols, cmask, RB, BK // RB, BN, NORM, GROUP, ASYM)
    else:
        acc = _stream_rows(x_ptr, stride_xb, vals_ptr, w_ptr, stride_wk, scale_ptr, stride_sg, t_proj, stride_tb,
                           rows_ptr, rows, B, cols, cmask, BLOCK_B, KC, BK, BN, DOT_F32, NORM, GROUP, ASYM)
    if HAS_SCALE:  # int8 weights: sum_k x_k q[k, n] * scale[n], the scale applied once per column
        acc = acc * tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    if PDL:  # the next kernel may start its launch while this one reduces
        tl.extra.cuda.gdc_launch_dependents()
    if GLU:
        ycols = (pid_n - blk0) * BN + tl.arange(0, BN)
        _finish(acc, y_ptr, stride_yb, part_ptr, N, lock_ptr, pid_n - blk0, pid_k, rb, bmask, cols, cmask,
                ycols, bias_ptr, 2 * SPLIT, SPLIT, GLU, ACT, BLOCK_B, BN, N1, HAS_BIAS)
    else:
        _finish(acc, y_ptr, stride_yb, part_ptr, N, lock_ptr, pid_n, pid_k, rb, bmask, cols, cmask, cols,
                bias_ptr, SPLIT, SPLIT, GLU, ACT, BLOCK_B, BN, 0, HAS_BIAS)
