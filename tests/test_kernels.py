"""Sparse decode kernels against their torch references, under the Triton interpreter (CPU, small shapes)."""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from acttail.kernels import (
    sparse_glu, sparse_glu_ref, sparse_linear, sparse_linear_ref, sparse_swiglu, sparse_swiglu_ref, topk_thresholds,
    topk_thresholds_ref)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DTYPES = [torch.float16, torch.bfloat16]


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def make(B, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to(dtype).to(DEVICE)
    wt = (torch.randn(K, N, generator=g) / K ** 0.5).to(dtype).to(DEVICE)
    return x, wt


def thr(*values):
    return torch.tensor(values, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 2, 5, 8])
def test_sparse_linear_matches_reference(dtype, B):
    # K and N are not multiples of the interpreter's blocks (KC=32, BN=32); several K chunks are summed
    x, wt = make(B, 100, 70, dtype, seed=B)
    t = thr(0.8)
    y = sparse_linear(x, wt, t)
    ref = sparse_linear_ref(x, wt, t)
    assert y.shape == (B, 70) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    # the threshold matters: a dense product differs by far more than the tolerance
    assert rel_err((x.float() @ wt.float()).to(dtype), ref) > 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_kept_is_the_dense_product(dtype):
    x, wt = make(3, 77, 45, dtype, seed=1)
    y = sparse_linear(x, wt, thr(-1.0))
    assert rel_err(y, (x.float() @ wt.float()).to(dtype)) < TOL[dtype]


@pytest.mark.parametrize("B", [1, 4])
def test_no_rows_kept_writes_zeros(B):
    x, wt = make(B, 64, 40, torch.float16, seed=2)
    y = sparse_linear(x, wt, thr(float("inf")))
    assert torch.equal(y, torch.zeros_like(y))


def test_single_chunk_and_tail_chunk():
    # K below one chunk (no split-K reduction) and K one past a chunk boundary (a chunk of one row)
    for K in (20, 33):
        x, wt = make(2, K, 40, torch.bfloat16, seed=K)
        t = thr(0.5)
        assert rel_err(sparse_linear(x, wt, t), sparse_linear_ref(x, wt, t)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_uses_each_projections_threshold(dtype):
    # GQA-like widths, not multiples of the block width; per-projection and per-token thresholds
    B, splits = 3, (48, 16, 16)
    x, wt = make(B, 96, sum(splits), dtype, seed=3)
    for t in (thr(0.2, 1.0, 1.6), torch.rand(3, B, device=DEVICE) * 1.5):
        y = sparse_linear(x, wt, t, splits=splits)
        ref = sparse_linear_ref(x, wt, t, splits=splits)
        assert rel_err(y, ref) < TOL[dtype]
    # each slice equals its own single-projection launch
    q = sparse_linear(x, wt[:, :48].contiguous(), t[0:1])
    assert rel_err(y[:, :48], q) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 6])
def test_swiglu_matches_reference(dtype, B):
    x, wt = make(B, 80, 2 * 40, dtype, seed=4 + B)
    t = thr(0.4, 1.1)
    h = sparse_swiglu(x, wt, t)
    assert h.shape == (B, 40)
    assert rel_err(h, sparse_swiglu_ref(x, wt, t)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 3])
def test_geglu_matches_reference(dtype, B):
    # Gemma's gelu-tanh epilogue; gate pre-activations reach both tails of tanh (|g| up to ~5)
    x, wt = make(B, 80, 2 * 40, dtype, seed=11 + B)
    wt = wt * 2
    t = thr(0.3, 0.7)
    h = sparse_glu(x, wt, t, act="gelu_tanh")
    ref = sparse_glu_ref(x, wt, t, act="gelu_tanh")
    assert h.shape == (B, 40) and rel_err(h, ref) < TOL[dtype]
    assert rel_err(ref, sparse_glu_ref(x, wt, t, act="silu")) > 0.03  # the two epilogues differ
    with pytest.raises(ValueError, match="gate activation"):
        sparse_glu(x, wt, t, act="relu")


def test_swiglu_single_chunk():
    # one K chunk: gate and up programs still meet at their shared ticket for the SwiGLU epilogue
    x, wt = make(2, 20, 2 * 36, torch.float16, seed=9)
    t = thr(0.2, 0.9)
    assert rel_err(sparse_swiglu(x, wt, t), sparse_swiglu_ref(x, wt, t)) < TOL[torch.float16]


@pytest.mark.parametrize("B", [1, 3])
def test_bias_epilogue_matches_reference(B):
    """Learned output biases added in the epilogue: one chunk (no reduction), split-K, fused q/k/v and the
    GLU (the up half of the bias HALF columns to the right), each against the fp32 reference."""
    dtype = torch.float16
    g = torch.Generator().manual_seed(5)
    for K in (20, 100):
        x, wt = make(B, K, 70, dtype, seed=K + B)
        bias = torch.randn(70, generator=g).to(DEVICE)
        t = thr(0.6)
        ref = sparse_linear_ref(x, wt, t, bias=bias)
        assert rel_err(sparse_linear(x, wt, t, bias=bias), ref) < TOL[dtype]
        assert rel_err(sparse_linear_ref(x, wt, t), ref) > 0.1  # the bias matters at this size
        t3, splits = thr(0.2, 1.0, 1.6), (40, 16, 14)
        y = sparse_linear(x, wt, t3, splits=splits, bias=bias)
        assert rel_err(y, sparse_linear_ref(x, wt, t3, splits=splits, bias=bias)) < TOL[dtype]
        wgu = make(B, K, 2 * 36, dtype, seed=21)[1]
        b2, t2 = torch.randn(72, generator=g).to(DEVICE), thr(0.4, 1.1)
        h = sparse_glu(x, wgu, t2, bias=b2)
        assert rel_err(h, sparse_glu_ref(x, wgu, t2, bias=b2)) < TOL[dtype]
        assert rel_err(sparse_glu_ref(x, wgu, t2), sparse_glu_ref(x, wgu, t2, bias=b2)) > 0.1
    with pytest.raises(ValueError, match="bias"):
        sparse_linear(x, wt, t, bias=bias[:10])
    with pytest.raises(ValueError, match="bias"):
        sparse_linear(x, wt, t, bias=bias.half())


def test_callers_own_ticket_counters():
    """locks=: a caller's own counters are the ones the split-K launch uses (a dirty buffer breaks the
    reduction, a clean one matches the reference and is left zero); a wrong buffer is a clear error."""
    from acttail.kernels import new_locks

    x, wt = make(1, 100, 70, torch.float16, seed=3)  # several K chunks: the tickets decide who reduces
    t = thr(0.5)
    ref = sparse_linear_ref(x, wt, t)
    own = new_locks(DEVICE)
    assert rel_err(sparse_linear(x, wt, t, locks=own), ref) < TOL[torch.float16]
    assert int(own.abs().sum()) == 0
    # counters far from zero: no program draws the last ticket, so none reduces; each column block's counter
    # has gone up by the number of its K chunks (deterministic, on the GPU as under the interpreter)
    dirty = new_locks(DEVICE) + 1000
    sparse_linear(x, wt, t, locks=dirty, config=dict(BN=32, KC=32, BK=16, num_warps=1, num_stages=1))
    assert dirty[:3].tolist() == [1004] * 3 and int((dirty[3:] != 1000).sum()) == 0  # 3 blocks, 4 chunks
    with pytest.raises(ValueError, match="locks"):  # 3 column blocks of 32 need 3 counters
        sparse_linear(x, wt, t, locks=own[:1], config=dict(BN=32, KC=32, BK=16, num_warps=1, num_stages=1))
    with pytest.raises(ValueError, match="locks"):
        sparse_linear(x, wt, t, locks=own.long())


def test_topk_thresholds_keep_exact_counts():
    B, K = 5, 150
    g = torch.Generator().manual_seed(5)
    # distinct magnitudes (no ties), random signs and order
    mags = torch.stack([torch.randperm(K, generator=g) for _ in range(B)]).float() / 16 + 0.01
    signs = torch.randint(0, 2, (B, K), generator=g) * 2 - 1
    x = (mags * signs).to(torch.float16).to(DEVICE)
    keeps = [0, 37, 150]
    t = topk_thresholds(x, keeps)
    assert torch.equal(t, topk_thresholds_ref(x, keeps))
    counts = (x.float().abs()[None] > t[:, :, None]).sum(-1)
    assert counts.tolist() == [[k] * B for k in keeps]


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_thresholds_feed_sparse_linear(dtype):
    x, wt = make(4, 64, 48, dtype, seed=6)
    t = topk_thresholds(x, [16, 40])  # per-token thresholds for a fused pair of projections
    y = sparse_linear(x, wt, t, splits=(24, 24))
    assert rel_err(y, sparse_linear_ref(x, wt, t, splits=(24, 24))) < TOL[dtype]


def test_bad_inputs_raise():
    x, wt = make(9, 32, 32, torch.float16)
    with pytest.raises(ValueError, match="batch"):
        sparse_linear(x, wt, thr(0.1))
    with pytest.raises(ValueError, match="dtype"):
        sparse_linear(x[:2].float(), wt.float(), thr(0.1))
    with pytest.raises(ValueError, match="thresholds"):
        sparse_linear(x[:2], wt, thr(0.1, 0.2), splits=(16, 8, 8))



# Launch shapes the GPU picks (pick_config): chunks that are any multiple of BK, not a power of two.
# RB > 1: the one-token accumulator of RB rows (tiles loaded as [RB, BK / RB, BN]).
CONFIGS = [dict(BN=32, KC=48, BK=16, num_warps=1, num_stages=1),
           dict(BN=16, KC=80, BK=16, num_warps=1, num_stages=1),
           dict(BN=32, KC=48, BK=16, num_warps=1, num_stages=1, RB=4),
           dict(BN=16, KC=32, BK=16, num_warps=1, num_stages=1, RB=8)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["kc48", "bn16-kc80", "kc48-rb4", "kc32-rb8"])
@pytest.mark.parametrize("B", [1, 3])
def test_launch_configs_match_reference(cfg, B):
    dtype = torch.float16
    x, wt = make(B, 100, 70, dtype, seed=11 + B)  # 100 rows: chunks of 48, 48 and 4 (80 and 20)
    for t in (thr(0.8), thr(-1.0)):
        y = sparse_linear(x, wt, t, config=cfg)
        assert rel_err(y, sparse_linear_ref(x, wt, t)) < TOL[dtype]
    assert torch.equal(sparse_linear(x, wt, thr(float("inf")), config=cfg), torch.zeros(B, 70, dtype=dtype, device=DEVICE))
    splits = (40, 16, 14)
    t3 = thr(0.2, 1.0, 1.6)
    y = sparse_linear(x, wt, t3, splits=splits, config=cfg)
    assert rel_err(y, sparse_linear_ref(x, wt, t3, splits=splits)) < TOL[dtype]
    wgu = make(B, 100, 2 * 36, dtype, seed=21)[1]
    t2 = thr(0.4, 1.1)
    assert rel_err(sparse_swiglu(x, wgu, t2, config=cfg), sparse_swiglu_ref(x, wgu, t2)) < TOL[dtype]


def test_chunk_must_be_a_multiple_of_the_tile():
    x, wt = make(1, 64, 32, torch.float16)
    with pytest.raises(ValueError, match="multiple"):
        sparse_linear(x, wt, thr(0.1), config=dict(BN=32, KC=40, BK=16, num_warps=1, num_stages=1))
    with pytest.raises(ValueError, match="divide"):
        sparse_linear(x, wt, thr(0.1), config=dict(BN=32, KC=32, BK=16, num_warps=1, num_stages=1, RB=3))


def test_row_groups_on_odd_sizes():
    # nnz not a multiple of the tile, several tiles per chunk, bf16 and every projection mode
    for dtype in DTYPES:
        x, wt = make(1, 200, 2 * 44, dtype, seed=31)
        cfg = dict(BN=32, KC=96, BK=16, num_warps=1, num_stages=1, RB=4)
        t = thr(0.3)
        assert rel_err(sparse_linear(x, wt, t, config=cfg), sparse_linear_ref(x, wt, t)) < TOL[dtype]
        t2 = thr(0.2, 0.9)
        assert rel_err(sparse_swiglu(x, wt, t2, config=cfg), sparse_swiglu_ref(x, wt, t2)) < TOL[dtype]
        t3 = thr(0.1, 0.5, 1.0)
        y = sparse_linear(x, wt, t3, splits=(40, 30, 18), config=cfg)
        assert rel_err(y, sparse_linear_ref(x, wt, t3, splits=(40, 30, 18))) < TOL[dtype]


def test_dispatch_rule():
    from acttail.kernels import use_sparse
    assert use_sparse(0.5, 1) and not use_sparse(0.1, 1)
    assert use_sparse(0.7, 2) and not use_sparse(0.5, 2)  # 51% vs 75% of rows read
    assert use_sparse(0.8, 4) and not use_sparse(0.7, 4)  # 59% vs 76%
    assert use_sparse(0.95, 8) and not use_sparse(0.9, 8)  # 34% vs 57%: 8 tokens pay only below 45%
    assert not use_sparse(0.5, 1, nbytes=2_000_000)  # 1 MB skipped cannot pay for the fixed cost
    # unless one token skips 65% or more (small models: the launch also takes over the block's RMSNorm)
    assert use_sparse(0.7, 1, nbytes=2_000_000) and not use_sparse(0.6, 1, nbytes=2_000_000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rmsnorm_matches_reference(dtype, B=1):
    # the block's residual add + RMSNorm in front of the projection: one launch instead of two. The
    # reference normalises with the add_rmsnorm kernel (the interpreter rounds bf16 its own way, and a
    # normalised input one bf16 step off would flip a row across its threshold)
    from acttail.kernels.decode_ops import add_rmsnorm, add_rmsnorm_ref
    g = torch.Generator().manual_seed(41 + B)
    x, wt = make(B, 100, 70, dtype, seed=41 + B)
    r = torch.randn(B, 100, generator=g).to(dtype).to(DEVICE)
    nw = (1 + 0.3 * torch.randn(100, generator=g)).to(dtype).to(DEVICE)
    x_in, r_in = x.clone(), r.clone()
    xr = add_rmsnorm_ref(x.clone(), r, nw, 1e-5)[0]
    h = add_rmsnorm(x.clone(), r, nw, 1e-5)
    if dtype == torch.float16:
        assert torch.equal(h, add_rmsnorm_ref(x.clone(), r, nw, 1e-5)[1])
    splits, t3 = (40, 16, 14), thr(0.2, 1.0, 1.6)
    ref = sparse_linear_ref(h, wt, t3, splits=splits)
    for cfg in (None, dict(BN=32, KC=48, BK=16, num_warps=1, num_stages=1, RB=4, NB=32)):  # NB=32: 4 tiles
        xo = torch.empty_like(x)
        y = sparse_linear(x, wt, t3, splits=splits, norm=(nw, 1e-5), residual=r, residual_out=xo, config=cfg)
        assert torch.equal(xo, xr)  # the residual stream, written once per chunk
        assert rel_err(y, ref) < TOL[dtype]
    assert torch.equal(x, x_in) and torch.equal(r, r_in)  # the inputs are left as they were
    assert rel_err(sparse_linear_ref(xr, wt, t3, splits=splits), ref) > 0.05  # the norm matters
    # GLU with the norm and no residual (the first block), and the projection's learned bias
    wgu = make(B, 100, 2 * 36, dtype, seed=51)[1]
    h0 = add_rmsnorm(x.clone(), None, nw, 1e-5)
    bias = torch.randn(72, generator=g).to(DEVICE)
    y = sparse_glu(x, wgu, thr(0.4, 1.1), norm=(nw, 1e-5), bias=bias)
    assert rel_err(y, sparse_glu_ref(h0, wgu, thr(0.4, 1.1), bias=bias)) < TOL[dtype]


def test_fused_rmsnorm_rejects_bad_arguments():
    x, wt = make(1, 64, 32, torch.float16)
    nw = torch.ones(64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="residual_out"):
        sparse_linear(x, wt, thr(0.1), norm=(nw, 1e-5), residual=x.clone())
    with pytest.raises(ValueError, match="alias"):
        sparse_linear(x, wt, thr(0.1), norm=(nw, 1e-5), residual=x.clone(), residual_out=x)
    with pytest.raises(ValueError, match="weight"):
        sparse_linear(x, wt, thr(0.1), norm=(nw[:32], 1e-5))
    with pytest.raises(ValueError, match="RMSNorm"):
        sparse_linear(x, wt, thr(0.1), residual=x.clone(), residual_out=torch.empty_like(x))
    with pytest.raises(ValueError, match="one-token"):
        sparse_linear(make(2, 64, 32, torch.float16)[0], wt, thr(0.1), norm=(nw, 1e-5))


@pytest.mark.parametrize("dense", [0, 1, 2], ids=["compact", "by-kept-fraction", "in-place"])
def test_chunks_read_in_place_or_compacted_match_reference(dense):
    # one token: a chunk is compacted (DENSE 0), read in place with the rows under the threshold masked off
    # (2), or either by its kept fraction (1, the default: in place above two thirds kept); also with the fused norm
    from acttail.kernels.decode_ops import add_rmsnorm
    for dtype in DTYPES:
        x, wt = make(1, 200, 2 * 44, dtype, seed=61)
        cfg = dict(BN=32, KC=96, BK=16, num_warps=1, num_stages=1, RB=4, DENSE=dense)  # 3 chunks, tiles of 16
        for t in (thr(0.3), thr(1.5), thr(-1.0), thr(float("inf"))):
            y, ref = sparse_linear(x, wt, t, config=cfg), sparse_linear_ref(x, wt, t)
            assert (rel_err(y, ref) < TOL[dtype]) if ref.any() else not y.any()
        t3 = thr(0.1, 0.5, 1.0)
        y = sparse_linear(x, wt, t3, splits=(40, 30, 18), config=cfg)
        assert rel_err(y, sparse_linear_ref(x, wt, t3, splits=(40, 30, 18))) < TOL[dtype]
        t2 = thr(0.2, 0.9)
        assert rel_err(sparse_swiglu(x, wt, t2, config=cfg), sparse_swiglu_ref(x, wt, t2)) < TOL[dtype]
        b = torch.randn(88, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        assert rel_err(sparse_linear(x, wt, thr(0.3), config=cfg, bias=b),
                       sparse_linear_ref(x, wt, thr(0.3), bias=b)) < TOL[dtype]
        r = make(1, 200, 1, dtype, seed=62)[0]
        nw = (1 + 0.3 * torch.randn(200, generator=torch.Generator().manual_seed(3))).to(dtype).to(DEVICE)
        xr, xo = x.clone(), torch.empty_like(x)
        h = add_rmsnorm(xr, r, nw, 1e-5)  # xr += r in the kernels' rounding
        for t in (thr(0.3), thr(1.5)):
            y = sparse_linear(x, wt, t, config=cfg, norm=(nw, 1e-5), residual=r, residual_out=xo)
            assert rel_err(y, sparse_linear_ref(h, wt, t)) < TOL[dtype] and torch.equal(xo, xr)
    with pytest.raises(ValueError, match="DENSE"):
        sparse_linear(x, wt, thr(0.1), config=dict(cfg, DENSE=3))


@pytest.mark.parametrize("glu", [False, True])
def test_prepared_launch_equals_the_one_shot_launch(glu):
    """PreparedLaunch (the launch fixed once; on a GPU later calls launch the compiled kernel directly) gives
    the one-shot call's output, batch 1 and 3, with per-token thresholds, and with the fused norm."""
    from acttail.kernels import PreparedLaunch, sparse_glu, sparse_linear, topk_thresholds

    g = torch.Generator().manual_seed(11)
    K, N = 64, 96
    wt = (torch.randn(K, N, generator=g) / 8).half()
    t = torch.tensor([0.6, 0.4] if glu else [0.6, 0.4, 0.5])
    splits = None if glu else (32, 32, 32)
    bias = torch.randn(N, generator=g)
    prep = PreparedLaunch(wt, t, splits, act="silu" if glu else None, bias=bias)
    one = (lambda *a, **k: sparse_glu(*a, bias=bias, **k)) if glu else (lambda *a, **k: sparse_linear(*a, splits, bias=bias, **k))
    for B in (1, 3, 1):
        x = torch.randn(B, K, generator=g).half()
        assert torch.equal(prep(x), one(x, wt, t))
        per_token = topk_thresholds(x, [20, 30] if glu else [20, 30, 40])
        assert torch.equal(prep(x, per_token), one(x, wt, per_token))
    x, r = torch.randn(1, K, generator=g).half(), torch.randn(1, K, generator=g).half()
    nw = (torch.rand(K, generator=g) + 0.5).half()
    o1, o2 = torch.empty_like(x), torch.empty_like(x)
    assert torch.equal(prep(x, norm=(nw, 1e-5), residual=r, residual_out=o1),
                       one(x, wt, t, norm=(nw, 1e-5), residual=r, residual_out=o2)) and torch.equal(o1, o2)
    assert not prep.prepared(1)  # the interpreter has no compiled kernel to call directly


# ---- int8 weights, per output channel (W8A16) ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [None] + CONFIGS, ids=["default", "kc48", "bn16-kc80", "kc48-rb4", "kc32-rb8"])
@pytest.mark.parametrize("B", [1, 3])
def test_int8_weights_match_the_dequantized_reference(dtype, cfg, B):
    """int8 rows read and converted in registers, each column scaled once: the reference on the dequantized
    weights, in every stream (compacted and in place for one token, the several-token dot), q/k/v splits, the
    GLU pair and the bias epilogue; and the quantized product stays near the fp16 one (per-channel int8)."""
    from acttail.kernels import quantize_int8

    x, wt = make(B, 100, 70, dtype, seed=31 + B)
    q, scales = quantize_int8(wt)
    q, scales = q.to(DEVICE), scales.to(DEVICE)
    for t in (thr(0.8), thr(-1.0)):  # compacted rows; every row kept (one token: read in place)
        y = sparse_linear(x, q, t, config=cfg, scales=scales)
        assert y.dtype == dtype and rel_err(y, sparse_linear_ref(x, q, t, scales=scales)) < TOL[dtype]
        assert rel_err(y, sparse_linear_ref(x, wt, t)) < 0.03  # int8 per channel: close to the fp16 weights
    splits, t3 = (40, 16, 14), thr(0.2, 1.0, 1.6)
    bias = torch.randn(70, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    y = sparse_linear(x, q, t3, splits=splits, config=cfg, bias=bias, scales=scales)
    assert rel_err(y, sparse_linear_ref(x, q, t3, splits=splits, bias=bias, scales=scales)) < TOL[dtype]
    qgu, sgu = quantize_int8(make(B, 100, 2 * 36, dtype, seed=41)[1])
    qgu, sgu, t2 = qgu.to(DEVICE), sgu.to(DEVICE), thr(0.4, 1.1)
    y = sparse_glu(x, qgu, t2, "silu", config=cfg, scales=sgu)
    assert rel_err(y, sparse_glu_ref(x, qgu, t2, "silu", scales=sgu)) < TOL[dtype]


def test_int8_weights_through_a_prepared_launch_and_refused_without_scales():
    from acttail.kernels import PreparedLaunch, quantize_int8

    x, wt = make(1, 100, 70, torch.float16, seed=7)
    q, scales = quantize_int8(wt)
    t = thr(0.5)
    launch = PreparedLaunch(q, t, scales=scales)
    for _ in range(2):  # the second call takes the prepared path on a GPU
        assert rel_err(launch(x), sparse_linear_ref(x, q, t, scales=scales)) < TOL[torch.float16]
    with pytest.raises(ValueError, match="need their scales"):
        sparse_linear(x, q, t)
    with pytest.raises(ValueError, match="scales go with int8"):
        sparse_linear(x, wt, t, scales=scales)
    with pytest.raises(ValueError, match="scales go with int8"):
        sparse_linear(x, q, t, scales=scales[:10])


# ---- int4 weights, groups of input rows (W4A16) --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [None] + CONFIGS, ids=["default", "kc48", "bn16-kc80", "kc48-rb4", "kc32-rb8"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("group", [16, 32])
def test_int4_weights_match_the_dequantized_reference(dtype, cfg, B, group):
    """int4 packed two to a byte along the columns, groups of input rows (100 rows: the last group partial),
    unpacked and scaled in registers: the reference on the dequantized weights in every stream, q/k/v splits,
    the GLU pair and the bias epilogue; and close to the fp16 weights (int4 per group of 16-32 rows)."""
    from acttail.kernels import dequantize_ref, quantize_int4

    x, wt = make(B, 100, 70, dtype, seed=51 + B)
    q, scales = quantize_int4(wt, group)
    assert q.dtype == torch.uint8 and q.shape == (100, 35) and scales.shape == (-(-100 // group), 70)
    assert rel_err(dequantize_ref(q, scales, group), wt) < 0.12  # the format itself: 4 bits
    q, scales = q.to(DEVICE), scales.to(DEVICE)
    for t in (thr(0.8), thr(-1.0)):
        y = sparse_linear(x, q, t, config=cfg, scales=scales, group=group)
        assert y.shape == (B, 70) and rel_err(y, sparse_linear_ref(x, q, t, scales=scales, group=group)) < TOL[dtype]
    splits, t3 = (40, 16, 14), thr(0.2, 1.0, 1.6)
    bias = torch.randn(70, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    y = sparse_linear(x, q, t3, splits=splits, config=cfg, bias=bias, scales=scales, group=group)
    assert rel_err(y, sparse_linear_ref(x, q, t3, splits=splits, bias=bias, scales=scales, group=group)) < TOL[dtype]
    qgu, sgu = quantize_int4(make(B, 100, 2 * 36, dtype, seed=61)[1], group)
    qgu, sgu, t2 = qgu.to(DEVICE), sgu.to(DEVICE), thr(0.4, 1.1)
    y = sparse_glu(x, qgu, t2, "gelu_tanh", config=cfg, scales=sgu, group=group)
    assert y.shape == (B, 36)
    assert rel_err(y, sparse_glu_ref(x, qgu, t2, "gelu_tanh", scales=sgu, group=group)) < TOL[dtype]


@pytest.mark.parametrize("cfg", [None] + CONFIGS, ids=["default", "kc48", "bn16-kc80", "kc48-rb4", "kc32-rb8"])
@pytest.mark.parametrize("B", [1, 3])
def test_q4_1_weights_match_the_dequantized_reference(cfg, B):
    """GGUF Q4_1's grid (q * scale + min, a (scale, min) pair per 32 input rows and column): every stream, q/k/v
    splits with a bias, the GLU pair; quantize_q4_1 of weights already on that grid gives them back exactly."""
    from acttail.kernels import dequantize_ref, quantize_q4_1

    x, wt = make(B, 100, 70, torch.float16, seed=71 + B)
    q, pairs = quantize_q4_1(wt)
    assert q.shape == (100, 35) and pairs.shape == (4, 70, 2)
    w = dequantize_ref(q, pairs, 32)
    assert rel_err(w, wt) < 0.12
    q2, pairs2 = quantize_q4_1(w)
    assert torch.equal(q2, q) and torch.allclose(pairs2, pairs, rtol=1e-5, atol=1e-7)  # the grid is kept
    q, pairs = q.to(DEVICE), pairs.to(DEVICE)
    for t in (thr(0.8), thr(-1.0)):
        y = sparse_linear(x, q, t, config=cfg, scales=pairs, group=32)
        assert rel_err(y, sparse_linear_ref(x, q, t, scales=pairs, group=32)) < TOL[torch.float16]
    splits, t3 = (40, 16, 14), thr(0.2, 1.0, 1.6)
    bias = torch.randn(70, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    y = sparse_linear(x, q, t3, splits=splits, config=cfg, bias=bias, scales=pairs, group=32)
    assert rel_err(y, sparse_linear_ref(x, q, t3, splits=splits, bias=bias, scales=pairs, group=32)) < TOL[torch.float16]
    qgu, pgu = (a.to(DEVICE) for a in quantize_q4_1(make(B, 100, 2 * 36, torch.float16, seed=62)[1]))
    y = sparse_glu(x, qgu, thr(0.4, 1.1), "silu", config=cfg, scales=pgu, group=32)
    assert rel_err(y, sparse_glu_ref(x, qgu, thr(0.4, 1.1), "silu", scales=pgu, group=32)) < TOL[torch.float16]


def test_int4_weights_through_a_prepared_launch_and_bad_scales_refused():
    from acttail.kernels import PreparedLaunch, quantize_int4

    x, wt = make(1, 100, 70, torch.float16, seed=8)
    q, scales = quantize_int4(wt, 32)
    t = thr(0.5)
    launch = PreparedLaunch(q, t, scales=scales, group=32)
    assert launch.out_features == 70
    for _ in range(2):
        assert rel_err(launch(x), sparse_linear_ref(x, q, t, scales=scales, group=32)) < TOL[torch.float16]
    with pytest.raises(ValueError, match="need their scales"):
        sparse_linear(x, q, t)
    with pytest.raises(ValueError, match=r"int4 \(packed uint8\) weights"):
        sparse_linear(x, q, t, scales=scales, group=16)  # scales of groups of 32 rows
    with pytest.raises(ValueError, match="contiguous float16"):
        sparse_linear(x, q, t, scales=scales.float(), group=32)  # stored as fp16, as AWQ/GPTQ store them
    with pytest.raises(ValueError, match="positive"):
        sparse_linear(x, q, t, scales=scales, group=0)
    with pytest.raises(ValueError, match="even"):
        quantize_int4(wt[:, :69])


def test_q4_1_gives_back_smollm2s_own_gguf_weights(smollm2):
    """SmolLM2's GGUF stores every projection as Q4_1: re-quantizing the weights convert-gguf dequantized gives
    the file's grid back, so decode over q4_1 reads the checkpoint's own 4-bit values (no second rounding)."""
    import acttail
    from acttail.kernels import dequantize_ref, quantize_int4, quantize_q4_1

    block = acttail.load(smollm2).layers[3]
    for linear in (block.attention.wqkv, block.feed_forward.w2):
        wt = linear.weight.detach().t()
        q, pairs = quantize_q4_1(wt)
        assert pairs.dtype == torch.float16  # GGUF's own bytes: 4 bits + 2 fp16 per 32 weights
        assert torch.equal(dequantize_ref(q, pairs, 32), wt.float())
        q4, s4 = quantize_int4(wt, 128)
        assert rel_err(dequantize_ref(q4, s4, 128), wt) > 0.05  # another grid re-rounds: the check can fail
