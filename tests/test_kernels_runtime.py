"""The GPU decode path (acttail.runtime.cuda) against the CPU reference model, under the Triton interpreter.

Same random weights and thresholds in both; the reference runs in fp32, the kernel path in fp16."""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("this test runs the kernels on the CPU under TRITON_INTERPRET=1", allow_module_level=True)
model_mod = pytest.importorskip("acttail.runtime.model")
sparsify_mod = pytest.importorskip("acttail.runtime.sparsify")

from acttail.kernels.decode_ops import (
    add_rmsnorm, add_rmsnorm_ref, decode_attention, decode_attention_ref, rope_attention, rope_cache_write,
    rope_cache_write_ref)
from acttail.layout import GROUP_OF, GROUPS
from acttail.runtime.cuda import CudaDecoder

CONFIG = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 96, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 16, "tie_word_embeddings": False}
# Each architecture with its options on; a sliding window of 4 < the 6 decoded tokens and the 5-token prompt.
ARCHS = {
    "LlamaForCausalLM": {}, "Qwen2ForCausalLM": {},
    "GemmaForCausalLM": {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"},
    "Gemma2ForCausalLM": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 4,
                          "attn_logit_softcapping": 4.0, "final_logit_softcapping": 3.0},
    "Gemma3ForCausalLM": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 4,
                          "layer_types": ["sliding_attention", "full_attention"], "rope_local_base_freq": 100.0,
                          "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "Phi3ForCausalLM": {"sliding_window": 4, "original_max_position_embeddings": 16,
                        "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(8)],
                                         "long_factor": [8.0] * 8, "factor": 4.0}},
}


def tiny_model(seed=0, architecture="LlamaForCausalLM", **overrides):
    args = model_mod.ModelArgs.from_config({**CONFIG, **ARCHS[architecture], **overrides}, architecture)
    torch.manual_seed(seed)
    model = model_mod.Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            p.copy_(p.half().float())  # both sides hold the same fp16-representable weights
    return model.eval().requires_grad_(False)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def thresholds(n_layer):
    kinds = ("q", "k", "v", "o", "gate", "up", "down")
    return {(i, k): 0.3 + 0.1 * j + 0.05 * i for i in range(n_layer) for j, k in enumerate(kinds)}


def decode_both(model, dec, tokens, sparsifier, sync=False, th=None):
    """Logits of each token decoded one at a time by the reference and by the decoder.

    ``sync``: after each step the decoder's KV cache is set to the reference's, so each step starts from the
    same state. ``th``: thresholds; then also, per token, whether an input crossed its threshold on one side
    and not on the other (a flip: see ``first_flip``)."""
    model.sparsifier = sparsifier
    model.setup_caches(1, CONFIG["max_position_embeddings"])
    ref, ours, flips = [], [], []
    seen_ref, seen_dec = {}, {}
    sparsifier.observer = lambda i, kinds, x: seen_ref.__setitem__((i, GROUP_OF[kinds[0]]), x.reshape(-1).clone())
    record = lambda i, group, x: seen_dec.__setitem__((i, group), x.reshape(-1).float().clone())  # noqa: E731
    for t, tok in enumerate(tokens):
        ref.append(model(torch.tensor([[tok]]), input_pos=torch.tensor([t]))[0, -1])
        dec.tok[0], dec.pos[0] = tok, t
        ours.append(dec.forward_token(dec.tok, dec.pos, record)[0])
        flips.append(th is not None and first_flip(seen_ref, seen_dec, th))
        for i, block in enumerate(model.layers) if sync else ():
            dec.k_cache[i, :, : t + 1] = block.attention.kv_cache.k[0, :, : t + 1]
            dec.v_cache[i, :, : t + 1] = block.attention.kv_cache.v[0, :, : t + 1]
    model.clear_caches()
    sparsifier.observer = None
    return torch.stack(ref), torch.stack(ours), flips


def first_flip(seen_ref, seen_dec, th) -> bool:
    """Did an input cross its threshold in one run and not in the other? The first such group, in the order
    of computation, must be a rounding flip: its input equal to fp16 precision and every crossing entry
    within 1% of its threshold (what follows it in that token may differ for that reason alone)."""
    for key in sorted(seen_ref, key=lambda k: (k[0], list(GROUPS).index(k[1]))):
        x, y = seen_ref[key], seen_dec[key]
        for kind in GROUPS[key[1]]:
            t = th[(key[0], kind)]
            crossed = (x.abs() > t) != (y.abs() > t)
            if crossed.any():
                assert rel_err(y, x) < 5e-3, f"{key}: inputs differ by {rel_err(y, x):.3g}"
                assert ((x[crossed].abs() - t).abs() < 0.01 * t).all(), f"{key} {kind}: {x[crossed]} vs {t}"
                return True
    return False


def test_decoder_keeps_its_own_ticket_counters():
    """Each decoder's sparse launches use its own split-K counters (never the per-device shared ones), so
    decoders on different streams of one GPU cannot corrupt each other's reductions; they are left zero."""
    import acttail.kernels.launch as SG

    model = tiny_model()
    a = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
    b = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
    assert a.locks.data_ptr() != b.locks.data_ptr()
    th = thresholds(CONFIG["num_hidden_layers"])
    SG._LOCKS.clear()
    for dec in (a, b):
        dec.set_sparsity(thresholds=th)
        dec.prefill(torch.tensor([5, 17, 42]))
        dec.forward_token(dec.tok, dec.pos)
        assert int(dec.locks.abs().sum()) == 0
    assert not SG._LOCKS  # nothing fell back to the shared counters


@pytest.mark.parametrize("architecture", list(ARCHS))
def test_sparse_decode_agrees_with_cpu_reference(architecture):
    # fp16 vs fp32 rounding can move an activation across its threshold now and then (the fused SwiGLU
    # rounds once, the reference three times); such a flip perturbs that token's logits by a few percent
    # (and, through the KV cache, later ones: each step starts from the reference's cache). So: every token
    # agrees to fp16 precision unless a flip (checked to be one) came first, and none is far off; a broken
    # path fails on every token. The dense run, from its own cache, checks the cache writes.
    model = tiny_model(architecture=architecture)
    assert model.args.qkv_bias == (architecture == "Qwen2ForCausalLM")
    dec = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
    tokens = [5, 17, 42, 8, 77, 30]
    th = thresholds(CONFIG["num_hidden_layers"])
    dec.set_sparsity(thresholds=th)
    ref, ours, flips = decode_both(model, dec, tokens, sparsify_mod.Sparsifier(
        {k: sparsify_mod.ProjectionSparsity(threshold=t) for k, t in th.items()}), sync=True, th=th)
    dense_ref, dense, _ = decode_both(model, CudaDecoder.from_model(model, torch.float16, "cpu", 16), tokens,
                                      sparsify_mod.Sparsifier.dense())
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert all(e < 5e-3 or flip for e, flip in zip(errs, flips)) and max(errs) < 0.3, (errs, flips)
    assert flips.count(False) >= 2, flips  # some tokens are compared at full precision
    assert max(rel_err(a, b) for a, b in zip(dense, dense_ref)) < 5e-3
    assert rel_err(ref, dense_ref) > 0.1  # the thresholds change the logits: the comparison can fail


@pytest.mark.parametrize("architecture", list(ARCHS))
def test_fused_norms_and_rope_match_separate_launches(architecture, monkeypatch):
    """The decode step with each block's residual add + RMSNorm fused into its sparse projections and RoPE +
    the cache write fused into attention gives the logits of the step with separate launches (same fp16
    roundings), with fewer launches: only the final norm (and Gemma 2/3's extra norms) stays apart."""
    import acttail.runtime.cuda as cuda_mod

    model = tiny_model(6, architecture=architecture)
    th = thresholds(CONFIG["num_hidden_layers"])
    g = torch.Generator().manual_seed(6)
    comp = {key: sparsify_mod.ProjectionSparsity(threshold=t, bias=0.1 * torch.randn(
        model.args.out_features(key[1]), generator=g)) for key, t in th.items()}
    calls = {"norm": 0, "rope": 0}
    counted = lambda fn, name: lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k)  # noqa: E731
    monkeypatch.setattr(cuda_mod, "add_rmsnorm", counted(cuda_mod.add_rmsnorm, "norm"))
    monkeypatch.setattr(cuda_mod, "rope_cache_write", counted(cuda_mod.rope_cache_write, "rope"))
    logits, launches = {}, {}
    for fuse in (True, False):
        dec = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
        dec.fuse = fuse
        dec.set_sparsity(thresholds=th, compensation=comp)
        dec.prefill(torch.tensor([5, 17, 42]))
        calls.update(norm=0, rope=0)
        steps = []
        for _ in range(4):
            steps.append(dec.forward_token(dec.tok, dec.pos)[0])
            dec.tok.copy_(steps[-1].argmax(-1, keepdim=True))
            dec.pos.add_(1)
        logits[fuse], launches[fuse] = torch.stack(steps), dict(calls)
    assert rel_err(logits[True], logits[False]) < 1e-3
    n, extra = CONFIG["num_hidden_layers"], 2 * model.args.sandwich_norm + model.args.qk_norm * 2
    assert launches[False] == {"norm": 4 * (2 * n + 1 + extra * n), "rope": 4 * n}
    assert launches[True] == {"norm": 4 * (1 + extra * n), "rope": 0}


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM"])
@pytest.mark.parametrize("lowrank", [True, False], ids=["lowrank", "biases-only"])
def test_compensation_on_the_decode_path_agrees_with_cpu_reference(architecture, lowrank):
    """Learned output biases and low-rank factors (a plan's compensation) on the Triton decode path, against
    the fp32 reference with the same settings; without them the logits differ, so the check can fail.
    Biases alone run in the kernel's epilogue (no separate compensation path)."""
    model = tiny_model(4, architecture=architecture)
    th = thresholds(CONFIG["num_hidden_layers"])
    g = torch.Generator().manual_seed(5)
    sets = {}
    for (i, k), t in th.items():
        n_in, n_out = model.args.in_features(k), model.args.out_features(k)
        low = (torch.randn(n_out, 2, generator=g).half().float(), (0.1 * torch.randn(2, n_in, generator=g)).half().float())
        sets[i, k] = sparsify_mod.ProjectionSparsity(threshold=t, bias=(0.1 * torch.randn(n_out, generator=g)).half().float(),
                                                     lowrank=low if lowrank and k in ("v", "up", "down") else None)
    dec = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
    dec.set_sparsity(thresholds=th, compensation=sets)
    layers = range(CONFIG["num_hidden_layers"])
    with_lowrank = {"qkv", "gate_up", "down"} if lowrank else set()
    assert set(dec.comp) == {(i, grp) for i in layers for grp in GROUPS if grp in with_lowrank}
    assert set(dec.bias) == {(i, grp) for i in layers for grp in GROUPS if grp not in with_lowrank}
    tokens = [5, 17, 42, 8, 77, 30, 11, 60, 3, 95, 23, 49]
    ref, ours, flips = decode_both(model, dec, tokens, sparsify_mod.Sparsifier(sets), sync=True, th=th)
    plain, _, _ = decode_both(model, dec, tokens, sparsify_mod.Sparsifier(
        {k: sparsify_mod.ProjectionSparsity(threshold=t) for k, t in th.items()}), sync=True)
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    # a flip moves an input between the kept part and the low-rank term too: such a token may differ more.
    # The compensated path rounds the kernel's output to fp16 before adding the bias (the reference adds it
    # in fp32): 1e-2 instead of the plain path's 5e-3; biases in the epilogue are added before the rounding.
    tol = 1e-2 if lowrank else 5e-3
    assert all(e < tol or flip for e, flip in zip(errs, flips)) and max(errs) < 1.0, (errs, flips)
    assert flips.count(False) >= 2, flips
    assert rel_err(plain, ref) > 0.05  # the compensation changes the logits


def test_topk_decode_agrees_with_cpu_reference():
    # top-k mode: per-token thresholds computed on the device keep round((1 - s) * d) entries per projection.
    # A threshold cannot split exact ties (it keeps none of the tied entries at the boundary; torch.topk
    # keeps some), and with GQA the attention output of the first token repeats v across the query heads
    # of a group, so the o projection sees exact ties: use plain multi-head attention here.
    model = tiny_model(3, num_key_value_heads=4)
    dec = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
    kinds = ("q", "k", "v", "o", "gate", "up", "down")
    sp = {(i, k): 0.3 + 0.08 * j for i in range(CONFIG["num_hidden_layers"]) for j, k in enumerate(kinds)}
    keeps = {key: sparsify_mod.keep_count(s, model.args.in_features(key[1])) for key, s in sp.items()}
    dec.set_sparsity(keeps=keeps)
    tokens = [7, 3, 50, 21, 64, 12]
    ref, ours, _ = decode_both(model, dec, tokens, sparsify_mod.Sparsifier(
        {k: sparsify_mod.ProjectionSparsity(keep=n) for k, n in keeps.items()}), sync=True)
    dense_ref, _, _ = decode_both(model, dec, tokens[:1], sparsify_mod.Sparsifier.dense())
    errs = sorted(rel_err(a, b) for a, b in zip(ours, ref))
    assert errs[len(errs) // 2] < 5e-3 and errs[-1] < 0.3, errs
    assert rel_err(ref[:1], dense_ref) > 0.05  # top-k changes the logits


@pytest.mark.parametrize("architecture", list(ARCHS))
def test_prefill_matches_reference_forward(architecture):
    model = tiny_model(1, architecture=architecture)
    dec = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
    prompt = torch.tensor([3, 9, 27, 81 % 96, 11])
    logits = dec.prefill(prompt)
    ref = model(prompt[None])[0, -1:]
    assert rel_err(logits, ref) < 2e-2
    assert int(dec.pos[0]) == 5 and int(dec.tok[0]) == int(ref.argmax())


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


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_decode_attention_kernel_equals_sdpa_in_the_decoder(architecture):
    model = tiny_model(4, architecture)
    outs = {}
    for attention in ("kernel", "sdpa"):
        dec = CudaDecoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16)
        dec.attention = attention
        dec.prefill(torch.tensor([4, 8, 15, 16]))
        with torch.no_grad():
            outs[attention] = torch.stack([dec.forward_token(dec.tok, dec.pos + k)[0] for k in range(3)])
    assert rel_err(outs["kernel"], outs["sdpa"]) < 3e-3


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
