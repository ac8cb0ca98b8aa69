"""Small fused kernels of a decode step: residual add + RMSNorm, RoPE + KV-cache write, and attention.

Each replaces a handful of tiny torch launches per layer; in a CUDA-graph-replayed decode step the launch
count, not the bytes, is what these cost. Decode attention takes RoPE and the cache write in front
(``rope_attention``: one launch) and splits the visible positions over several programs per key/value head,
merged deterministically by the last of them (flash-decoding), so a long context is read by the whole GPU.
Plain torch references sit beside them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import _locks, _sm_count, pdl_args
from .sparse_gemv import tanh


def add_rmsnorm_ref(x, r, w, eps):
    """(x + r, rmsnorm(x + r) * w) in the reference model's rounding (normalise in fp32, cast, scale)."""
    if r is not None:
        x = (x.float() + r.float()).to(x.dtype)
    x32 = x.float()
    h = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
    return x, h


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, D, eps, HAS_R: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    if PDL:  # wait for the producer of x and r, then let the next kernel start its launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < D
    x = tl.load(x_ptr + row * D + c, mask=m, other=0.0)
    if HAS_R:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * D + c, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(x_ptr + row * D + c, x, mask=m)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / D + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    # normalise, round to x's dtype, scale: the product of two 16-bit floats is exact in fp32, so one
    # rounding here equals the 16-bit multiply (and the interpreter has no bf16 arithmetic)
    h = ((x32 * inv).to(x.dtype).to(tl.float32) * w).to(x.dtype)
    tl.store(h_ptr + row * D + c, h, mask=m)


def add_rmsnorm(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
    """In place x += r (when given); returns rmsnorm(x) * w. x, r [rows, D] contiguous, w [D]."""
    h = torch.empty_like(x)
    D = x.shape[-1]
    block = triton.next_power_of_2(D)
    warps = 1 if x.device.type != "cuda" else max(1, min(8, block // 512))
    _add_rmsnorm_kernel[(x.shape[0],)](x, r if r is not None else x, w, h, D, eps, HAS_R=r is not None,
                                       BLOCK=block, num_warps=warps, **pdl_args(x.device))
    return h


def silu_mul_ref(gu, inter):
    """silu(gate) * up for gu = [gate | up] [rows, 2 * inter], in torch's rounding (F.silu(g) * u)."""
    g, u = gu.split(inter, dim=-1)
    return torch.nn.functional.silu(g) * u


@triton.jit
def _silu_mul_kernel(gu_ptr, h_ptr, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(gu_ptr + row * 2 * I + c, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * 2 * I + I + c, mask=m, other=0.0)
    g32 = g.to(tl.float32)
    s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)  # F.silu rounds to the input dtype, then the 16-bit product
    tl.store(h_ptr + row * I + c, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_mul(gu: torch.Tensor, inter: int) -> torch.Tensor:
    """One launch for the dense gate/up epilogue: silu(gu[:, :inter]) * gu[:, inter:] (gu contiguous)."""
    rows = gu.shape[0]
    h = torch.empty(rows, inter, dtype=gu.dtype, device=gu.device)
    block = 1024 if gu.device.type == "cuda" else 64
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gu, h, inter, BLOCK=block,
                                                        num_warps=4 if gu.device.type == "cuda" else 1,
                                                        **pdl_args(gu.device))
    return h


def rope_cache_write_ref(qkv, cos, sin, pos, k_cache, v_cache, n_head, n_kv, head_dim, bias=None):
    """q rotated [n_head, D]; k rotated and v written into the caches [n_kv, T, D] at position pos[0].

    bias: the q/k/v bias (Qwen2), added in fp32 before the rotation."""
    if bias is not None:
        qkv = (qkv.float() + bias.float()).to(qkv.dtype)
    q, k, v = qkv.view(-1, head_dim).split([n_head, n_kv, n_kv])
    c, s = cos[pos].float(), sin[pos].float()

    def rot(t):
        t32 = t.float()
        t1, t2 = t32.chunk(2, dim=-1)
        return (t32 * c + torch.cat([-t2, t1], dim=-1) * s).to(t.dtype)

    k_cache[:, pos[0]] = rot(k)
    v_cache[:, pos[0]] = v
    return rot(q)


@triton.jit
def _rope_rows(qkv_ptr, b_ptr, rows, rmask, c, s, rd, D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Heads ``rows`` of qkv [*, D] (+ the bias, rounded as the biased projection's output), rotated in fp32
    (rotate-half RoPE with this position's cos c and sin s) and rounded: rope_cache_write's rounding."""
    partner = (rd + D // 2) % D
    sign = tl.where(rd < D // 2, -1.0, 1.0)
    m = rmask[:, None]
    a = tl.load(qkv_ptr + rows[:, None] * D + rd[None, :], mask=m, other=0.0)
    b = tl.load(qkv_ptr + rows[:, None] * D + partner[None, :], mask=m, other=0.0)
    if HAS_BIAS:
        a = (a.to(tl.float32) + tl.load(b_ptr + rows[:, None] * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
             ).to(a.dtype)
        b = (b.to(tl.float32) + tl.load(b_ptr + rows[:, None] * D + partner[None, :], mask=m, other=0.0).to(
            tl.float32)).to(b.dtype)
    return (a.to(tl.float32) * c[None, :] + sign[None, :] * b.to(tl.float32) * s[None, :]).to(a.dtype)


@triton.jit
def _write_kv(qkv_ptr, b_ptr, k_ptr, v_ptr, NH, kv, n_kv, pos, T, cos, sin, rd, D: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """Key head kv of the qkv row rotated and value head kv (each + its bias, rounded), written to the
    caches [n_kv, T, D] at position pos."""
    one = tl.arange(0, 1)
    k_new = _rope_rows(qkv_ptr, b_ptr, NH + kv + one, one < 1, cos, sin, rd, D, HAS_BIAS)
    v_rows = NH + n_kv + kv + one
    v_new = tl.load(qkv_ptr + v_rows[:, None] * D + rd[None, :])
    if HAS_BIAS:
        v_new = (v_new.to(tl.float32) + tl.load(b_ptr + v_rows[:, None] * D + rd[None, :]).to(tl.float32)
                 ).to(v_new.dtype)
    at = (kv.to(tl.int64) * T + pos) * D + one[:, None] * 0 + rd[None, :]
    tl.store(k_ptr + at, k_new)
    tl.store(v_ptr + at, v_new)


@triton.jit
def _rope_cache_kernel(qkv_ptr, b_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, T,
                       NH: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    h = tl.program_id(0)  # 0..NH-1: a query head; NH..: a key/value head
    rd = tl.arange(0, D)
    pos = tl.load(pos_ptr)
    cos = tl.load(cos_ptr + pos * D + rd)
    sin = tl.load(sin_ptr + pos * D + rd)
    if h < NH:
        one = tl.arange(0, 1)
        q = _rope_rows(qkv_ptr, b_ptr, h + one, one < 1, cos, sin, rd, D, HAS_BIAS)
        tl.store(q_ptr + (h + one)[:, None] * D + rd[None, :], q)
    else:
        _write_kv(qkv_ptr, b_ptr, k_ptr, v_ptr, NH, h - NH, tl.num_programs(0) - NH, pos, T, cos, sin, rd, D,
                  HAS_BIAS)


def rope_cache_write(qkv, cos, sin, pos, k_cache, v_cache, n_head, n_kv, head_dim, bias=None):
    """One token: returns q rotated [n_head, D]; writes rotated k and v to the caches [n_kv, T, D] at pos.

    qkv [1, (n_head + 2 n_kv) D]; cos/sin fp32 [max_T, D]; pos int64 [1] on the device (graph-safe);
    bias [(n_head + 2 n_kv) D]: the q/k/v bias (Qwen2), added first."""
    q = torch.empty(n_head, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(n_head + n_kv,)](qkv, bias if bias is not None else qkv, cos, sin, pos, q, k_cache,
                                         v_cache, k_cache.shape[1], NH=n_head, D=head_dim,
                                         HAS_BIAS=bias is not None, num_warps=1, **pdl_args(qkv.device))
    return q


def decode_attention_ref(q, k_cache, v_cache, pos, scale=None, softcap=None, window=None):
    """Attention of one token: q [n_head, D] over the cache [n_kv, T, D] at positions 0..pos[0] (the last
    ``window`` of them for a sliding layer); scores times scale (default D**-0.5), soft-capped to
    softcap * tanh(s / softcap) when given; returns [1, n_head*D]."""
    n_head, D = q.shape
    n = int(pos[0]) + 1
    lo = max(0, n - window) if window else 0
    k = k_cache[:, lo:n].float().repeat_interleave(n_head // k_cache.shape[0], dim=0)
    v = v_cache[:, lo:n].float().repeat_interleave(n_head // k_cache.shape[0], dim=0)
    s = (k @ q.float()[:, :, None])[..., 0] * (D ** -0.5 if scale is None else scale)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s, dim=-1)
    return (p[:, None, :] @ v)[:, 0].reshape(1, -1).to(q.dtype)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, T, scale, softcap, window,
                             b_ptr, cos_ptr, sin_ptr, NH, part_ptr, lock_ptr,
                             G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                             SOFTCAP: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr,
                             SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Grid (key/value heads, SPLITS). Program (kv, j): the G query heads of kv (padded to BLOCK_G) against
    the j-th of SPLITS equal spans of the visible positions (0..pos, or the last ``window`` of them when
    window > 0), online softmax in fp32; SOFTCAP: scores -> softcap * tanh(scores / softcap). With SPLITS > 1
    each program stores its partial (max, sum, weighted values) and the last of a head's programs (ticket)
    merges them in span order: deterministic flash-decoding, so a long context is read by many programs at
    once. ROPE: q_ptr is the projection's qkv row [(NH + 2 n_kv) D]; each program rotates its query heads,
    and the one whose span holds pos rotates the key head and writes the key and value there first."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    kv = tl.program_id(0)
    sp = tl.program_id(1)
    rg = tl.arange(0, BLOCK_G)
    gm = rg < G
    rd = tl.arange(0, D)
    pos = tl.load(pos_ptr).to(tl.int32)
    n = pos + 1
    lo = tl.where(window > 0, tl.maximum(n - window, 0), 0)  # first visible position
    first = (lo // BLOCK_T) * BLOCK_T
    span = tl.cdiv(tl.cdiv(n - first, SPLITS), BLOCK_T) * BLOCK_T
    start = first + sp * span
    end = tl.minimum(n, start + span)
    base = kv.to(tl.int64) * T * D
    if ROPE:
        cos = tl.load(cos_ptr + pos * D + rd)
        sin = tl.load(sin_ptr + pos * D + rd)
        q = _rope_rows(q_ptr, b_ptr, kv * G + rg, gm, cos, sin, rd, D, HAS_BIAS)
        if (pos >= start) & (pos < end):  # this span reads position pos: write its key and value first
            _write_kv(q_ptr, b_ptr, k_ptr, v_ptr, NH, kv, tl.num_programs(0), pos, T, cos, sin, rd, D, HAS_BIAS)
        tl.debug_barrier()  # the loop below reads this position back (from L2: .cg loads)
    else:
        q = tl.load(q_ptr + (kv * G + rg[:, None]) * D + rd[None, :], mask=gm[:, None], other=0.0)
    q = q.to(tl.float32) * scale  # [BLOCK_G, D]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):  # every block holds a visible position
        rt = t0 + tl.arange(0, BLOCK_T)
        tm = (rt < end) & (rt >= lo)
        k = tl.load(k_ptr + base + rt[:, None] * D + rd[None, :], mask=tm[:, None], other=0.0,
                    cache_modifier=".cg").to(tl.float32)
        v = tl.load(v_ptr + base + rt[:, None] * D + rd[None, :], mask=tm[:, None], other=0.0,
                    cache_modifier=".cg").to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BLOCK_T]
        if SOFTCAP:
            s = softcap * tanh(s / softcap)
        s = tl.where(tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = o_ptr + (kv * G + rg[:, None]) * D + rd[None, :]
    if SPLITS == 1:
        tl.store(out, (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        _merge_spans(m, l, acc, part_ptr, lock_ptr, kv, sp, rg, gm, rd, out, SPLITS, BLOCK_G, D)


@triton.jit
def _merge_spans(m, l, acc, part_ptr, lock_ptr, kv, sp, rg, gm, rd, out, SPLITS: tl.constexpr,
                 BLOCK_G: tl.constexpr, D: tl.constexpr):
    """Store this span's (max, sum, values) [BLOCK_G (D)] at part; the last of the head's SPLITS programs
    merges them in span order (an empty span has max -inf and weighs nothing) and writes the output."""
    row = (kv * SPLITS + sp) * BLOCK_G + rg  # this program's rows of part: max, sum, then values
    n_rows = tl.num_programs(0) * SPLITS * BLOCK_G
    tl.store(part_ptr + row, m)
    tl.store(part_ptr + n_rows + row, l)
    tl.store(part_ptr + 2 * n_rows + row[:, None] * D + rd[None, :], acc)
    tl.debug_barrier()  # every thread's partials are stored before the ticket is taken
    if tl.atomic_add(lock_ptr + kv, 1) == SPLITS - 1:  # acq_rel: the other spans' partials are visible
        rows = (kv * SPLITS + tl.arange(0, SPLITS))[:, None] * BLOCK_G + rg[None, :]  # [SPLITS, BLOCK_G]
        ms = tl.load(part_ptr + rows, cache_modifier=".cg")
        ls = tl.load(part_ptr + n_rows + rows, cache_modifier=".cg")
        accs = tl.load(part_ptr + 2 * n_rows + rows[:, :, None] * D + rd[None, None, :], cache_modifier=".cg")
        mx = tl.max(ms, axis=0)
        w = tl.exp(ms - mx[None, :])  # [SPLITS, BLOCK_G]
        total = tl.sum(ls * w, axis=0)
        o = tl.sum(accs * w[:, :, None], axis=0) / total[:, None]
        tl.store(out, o.to(out.dtype.element_ty), mask=gm[:, None])
        tl.store(lock_ptr + kv, 0)  # ready for the next launch (and the next graph replay)


def _group_size(n_head, n_kv, D):
    """Query heads per key/value head (G), after checking the shapes the kernel takes."""
    if n_head % n_kv or D & (D - 1):
        raise ValueError(f"need a power-of-two head dim and n_kv dividing n_head, got D={D}, "
                         f"{n_head} heads / {n_kv}")
    return n_head // n_kv


def decode_attention(q, k_cache, v_cache, pos, block_t: int = 32, scale: float | None = None,
                     softcap: float | None = None, window: int | None = None, splits: int | None = None,
                     locks: torch.Tensor | None = None):
    """One token's attention over the static cache, positions 0..pos[0] (device tensor: graph-safe).

    q [n_head, D] (rotated), k_cache / v_cache [n_kv, T, D]; returns [1, n_head * D]. Scores are scaled by
    ``scale`` (default D**-0.5) and soft-capped by ``softcap`` (Gemma 2); a sliding layer sees only the last
    ``window`` positions (its own included), and only those are read. Replaces
    ``scaled_dot_product_attention`` with a mask over the whole cache: one launch, only the filled part of
    the cache is read. The visible positions are split over ``splits`` programs per key/value head (a power
    of two; default: enough to fill the GPU's SMs, at most one per ``block_t`` positions of the cache),
    merged deterministically by the last of them (``locks``: the caller's ticket counters, ``new_locks``)."""
    n_head, D = q.shape
    return _attend(q, None, None, None, k_cache, v_cache, pos, n_head, D, block_t, scale, softcap, window, splits,
                   locks)


def rope_attention(qkv, cos, sin, pos, k_cache, v_cache, n_head, n_kv, head_dim, bias=None, block_t: int = 32,
                   scale: float | None = None, softcap: float | None = None, window: int | None = None,
                   splits: int | None = None, locks: torch.Tensor | None = None):
    """``rope_cache_write`` and ``decode_attention`` in one launch: qkv [1, (n_head + 2 n_kv) D] (+ bias, the
    Qwen2 q/k/v bias); each program rotates its query heads at position pos[0], the one whose span holds pos
    also the key head, and writes the key and value into the caches [n_kv, T, D] there before it attends.
    Returns [1, n_head * D]."""
    if n_kv != k_cache.shape[0] or head_dim != k_cache.shape[2]:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not hold {n_kv} heads of {head_dim}")
    return _attend(qkv, bias, cos, sin, k_cache, v_cache, pos, n_head, head_dim, block_t, scale, softcap, window,
                   splits, locks)


def attention_splits(n_kv: int, T: int, device, block_t: int = 32) -> int:
    """Programs per key/value head: a power of two filling the SMs once, at most one per block_t positions."""
    want = max(1, _sm_count(device) // n_kv)
    cap = max(1, triton.cdiv(T, block_t))
    return min(1 << (want.bit_length() - 1), triton.next_power_of_2(cap))


def _attend(q, bias, cos, sin, k_cache, v_cache, pos, n_head, D, block_t, scale, softcap, window, splits, locks):
    """Launch of the attention kernel; cos is None: q [n_head, D] already rotated, else q is the qkv row."""
    n_kv, T = k_cache.shape[0], k_cache.shape[1]
    G = _group_size(n_head, n_kv, D)
    splits = attention_splits(n_kv, T, q.device, block_t) if splits is None else int(splits)
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"attention splits must be a power of two, got {splits}")
    block_g = triton.next_power_of_2(G)
    part = torch.empty(n_kv * splits * block_g * (D + 2) if splits > 1 else 1, dtype=torch.float32,
                       device=q.device)
    if locks is None:
        locks = _locks(q.device, n_kv)
    elif locks.dtype != torch.int32 or locks.device != q.device or locks.numel() < n_kv:
        raise ValueError(f"locks must be an int32 tensor of at least {n_kv} zeros on q's device")
    rope = cos is not None
    o = torch.empty(1, n_head * D, dtype=q.dtype, device=q.device)
    _decode_attention_kernel[(n_kv, splits)](
        q, k_cache, v_cache, pos, o, T, D ** -0.5 if scale is None else scale, float(softcap or 1.0),
        int(window or 0), q if bias is None else bias, cos if rope else q, sin if rope else q, n_head, part, locks,
        G=G, BLOCK_G=block_g, D=D, BLOCK_T=block_t, SOFTCAP=bool(softcap), ROPE=rope, HAS_BIAS=bias is not None,
        SPLITS=splits, num_warps=4 if q.device.type == "cuda" else 1, **pdl_args(q.device))
    return o
