"""The small decode kernels (residual add + RMSNorm, RoPE + KV-cache write, decode attention, silu * up)
against their torch references, under the Triton interpreter."""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the kernels run on a GPU or under TRITON_INTERPRET=1", allow_module_level=True)

from acttail.kernels.decode_ops import (
    add_rmsnorm, add_rmsnorm_ref, decode_attention, decode_attention_ref, rope_attention, rope_cache_write,
    rope_cache_write_ref)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_decode_ops_match_references():
    torch.manual_seed(2)
    x = torch.randn(3, 50).half()
    r = torch.randn(3, 50).half()
    w = torch.randn(50).half()
    xr, hr = add_rmsnorm_ref(x.clone(), r, w, 1e-5)
    x2 = x.clone()
    h = add_rmsnorm(x2, r, w, 1e-5)
    assert torch.equal(x2, xr) and rel_err(h, hr) < 2e-3
    x3 = x.clone()  # no residual (Gemma's norms of what attention and the MLP add): x is left as it is
    assert rel_err(add_rmsnorm(x3, None, w, 1e-5), add_rmsnorm_ref(x, None, w, 1e-5)[1]) < 2e-3
    assert torch.equal(x3, x)
    xb, rb, wb = x.bfloat16(), r.bfloat16(), w.bfloat16()  # bf16 (the interpreter rounds it toward zero)
    assert rel_err(add_rmsnorm(xb.clone(), rb, wb, 1e-5), add_rmsnorm_ref(xb.clone(), rb, wb, 1e-5)[1]) < 1e-2
    H, KV, D, T = 4, 2, 16, 8
    qkv = torch.randn(1, (H + 2 * KV) * D).half()
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    pos = torch.tensor([5])
    kc, vc = torch.zeros(KV, T, D).half(), torch.zeros(KV, T, D).half()
    kr, vr = kc.clone(), vc.clone()
    q = rope_cache_write(qkv, cos, sin, pos, kc, vc, H, KV, D)
    qr = rope_cache_write_ref(qkv, cos, sin, pos, kr, vr, H, KV, D)
    assert rel_err(q, qr) < 2e-3 and rel_err(kc, kr) < 2e-3 and torch.equal(vc, vr)
    assert kc[:, :5].abs().sum() == 0  # nothing written outside pos
    bias = torch.randn((H + 2 * KV) * D).half()  # Qwen2's q/k/v bias
    q = rope_cache_write(qkv, cos, sin, pos, kc, vc, H, KV, D, bias=bias)
    qr = rope_cache_write_ref(qkv, cos, sin, pos, kr, vr, H, KV, D, bias=bias)
    assert rel_err(q, qr) < 2e-3 and rel_err(kc, kr) < 2e-3 and torch.equal(vc, vr)
    assert rel_err(qr, rope_cache_write_ref(qkv, cos, sin, pos, kr.clone(), vr.clone(), H, KV, D)) > 0.1


@pytest.mark.parametrize("H,KV,D,T,p", [(4, 2, 16, 40, 0), (4, 2, 16, 40, 33), (2, 2, 8, 8, 7), (8, 2, 16, 64, 20),
                                             (9, 3, 16, 24, 10)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_matches_reference(H, KV, D, T, p, splits):
    # splits: the visible positions spread over programs per head, merged by the last (some spans empty)
    torch.manual_seed(p)
    q = torch.randn(H, D).half()
    kc, vc = torch.randn(KV, T, D).half(), torch.randn(KV, T, D).half()
    pos = torch.tensor([p])
    o = decode_attention(q, kc, vc, pos, block_t=16, splits=splits)
    ref = decode_attention_ref(q, kc, vc, pos)
    assert o.shape == (1, H * D) and rel_err(o, ref) < 3e-3
    kc[:, p + 1:] = float("nan")  # positions past pos are never read
    vc[:, p + 1:] = float("nan")
    assert torch.equal(decode_attention(q, kc, vc, pos, block_t=16, splits=splits), o)


@pytest.mark.parametrize("H,KV,D,T,p,window,softcap,bias,splits", [(4, 2, 16, 40, 33, None, None, False, 1),
                                                                      (4, 2, 16, 80, 70, 40, None, False, 4),
                                                                      (9, 3, 16, 24, 10, 4, 3.0, True, 2),
                                                                      (2, 2, 8, 8, 0, None, None, True, 8)])
def test_rope_attention_is_rope_cache_write_then_attention(H, KV, D, T, p, window, softcap, bias, splits):
    # RoPE, the cache write and attention in one launch: the caches and the output of the two-launch path
    torch.manual_seed(p + H)
    qkv = torch.randn(1, (H + 2 * KV) * D).half()
    b = torch.randn((H + 2 * KV) * D).half() if bias else None
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    pos = torch.tensor([p])
    kc, vc = torch.randn(KV, T, D).half(), torch.randn(KV, T, D).half()
    kr, vr = kc.clone(), vc.clone()
    o = rope_attention(qkv, cos, sin, pos, kc, vc, H, KV, D, bias=b, block_t=16, scale=0.3, softcap=softcap,
                       window=window, splits=splits)
    q = rope_cache_write_ref(qkv, cos, sin, pos, kr, vr, H, KV, D, bias=b)
    ref = decode_attention_ref(q, kr, vr, pos, scale=0.3, softcap=softcap, window=window)
    assert rel_err(kc, kr) < 2e-3 and torch.equal(vc, vr)  # the new key and value land at pos, nothing else
    assert o.shape == (1, H * D) and rel_err(o, ref) < 3e-3
    stale = vc.clone()
    stale[:, p] = 0.0  # the position's own value is read back: attending without it differs
    assert rel_err(decode_attention_ref(q, kr, stale, pos, scale=0.3, softcap=softcap, window=window), ref) > 1e-2


def test_attention_splits_fill_the_sms_once():
    from acttail.kernels.decode_ops import attention_splits
    assert attention_splits(1, 4096, torch.device("cpu")) == 4  # the interpreter counts 4 SMs
    assert attention_splits(2, 4096, torch.device("cpu")) == 2 and attention_splits(8, 4096, torch.device("cpu")) == 1
    assert attention_splits(1, 40, torch.device("cpu"), block_t=32) == 2  # at most one per 32 positions
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(torch.randn(4, 16).half(), torch.randn(2, 8, 16).half(), torch.randn(2, 8, 16).half(),
                         torch.tensor([3]), splits=3)


def test_decode_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="power-of-two"):
        decode_attention(torch.randn(6, 12).half(), torch.randn(2, 8, 12).half(), torch.randn(2, 8, 12).half(),
                         torch.tensor([1]))
    with pytest.raises(ValueError, match="dividing"):
        decode_attention(torch.randn(5, 16).half(), torch.randn(2, 8, 16).half(), torch.randn(2, 8, 16).half(),
                         torch.tensor([1]))


@pytest.mark.parametrize("window,softcap,p", [(8, None, 30), (8, 2.0, 5), (5, None, 33), (None, 2.0, 20),
                                              (40, 3.0, 39)])
def test_decode_attention_scale_softcap_window(window, softcap, p):
    H, KV, D, T = 4, 2, 16, 40
    torch.manual_seed(p)
    q = (3 * torch.randn(H, D)).half()  # large scores, so the soft-cap bites
    kc, vc = torch.randn(KV, T, D).half(), torch.randn(KV, T, D).half()
    pos = torch.tensor([p])
    opts = dict(scale=0.2, softcap=softcap, window=window)
    o = decode_attention(q, kc, vc, pos, block_t=16, **opts)
    ref = decode_attention_ref(q, kc, vc, pos, **opts)
    assert rel_err(o, ref) < 3e-3
    if window is not None and p + 1 > window or softcap:  # the options change the result
        assert rel_err(ref, decode_attention_ref(q, kc, vc, pos, scale=0.2)) > 0.02
    kc[:, p + 1:] = float("nan")
    vc[:, p + 1:] = float("nan")
    if window is not None:  # positions before the window are never read either
        kc[:, : max(0, p + 1 - window)] = float("nan")
        vc[:, : max(0, p + 1 - window)] = float("nan")
    assert torch.equal(decode_attention(q, kc, vc, pos, block_t=16, **opts), o)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    from acttail.kernels.decode_ops import silu_mul, silu_mul_ref
    g = torch.Generator().manual_seed(7)
    gu = (torch.randn(3, 2 * 150, generator=g) * 3).to(dtype)  # 150: not a multiple of the block (64)
    h = silu_mul(gu, 150)
    assert h.shape == (3, 150) and h.dtype == dtype
    if dtype == torch.float16:  # the same roundings as torch
        assert torch.equal(h, silu_mul_ref(gu, 150))
    else:  # the interpreter's fp32 -> bf16 conversion is not round-to-nearest: within a bf16 step
        assert rel_err(h, silu_mul_ref(gu, 150)) < 1.2e-2
