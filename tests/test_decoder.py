"""The kernel decoder (acttail.runtime.decoder: the one block on KernelOps) against the CPU reference model,
under the Triton interpreter: same random weights and settings; the reference runs in fp32, the decoder in
fp16."""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("this test runs the kernels on the CPU under TRITON_INTERPRET=1", allow_module_level=True)

from acttail.layout import GROUP_OF, GROUPS, KINDS
from acttail.runtime.args import ModelArgs
from acttail.runtime.decoder import Decoder, Sampler, _after_eos, greedy
from acttail.runtime.model import Transformer
from acttail.runtime.sparsify import ProjectionSparsity as PS, Sparsifier, keep_count

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
    args = ModelArgs.from_config({**CONFIG, **ARCHS[architecture], **overrides}, architecture)
    torch.manual_seed(seed)
    model = Transformer(args)
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


def decoder(model, **kwargs):
    return Decoder.from_model(model, dtype=torch.float16, device="cpu", max_seq=16, **kwargs)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def thresholds(n_layer):
    return {(i, k): 0.3 + 0.1 * j + 0.05 * i for i in range(n_layer) for j, k in enumerate(KINDS)}


def decode_both(model, dec, tokens, sparsifier, sync=False, th=None):
    """Logits of each token decoded one at a time by the reference and by the decoder (both from position 0).

    ``sync``: after each step the decoder's KV cache is set to the reference's, so each step starts from the
    same state. ``th``: thresholds; then also, per token, whether an input crossed its threshold on one side
    and not on the other (a flip: see ``first_flip``)."""
    model.setup_caches(1, CONFIG["max_position_embeddings"])
    ref, ours, flips = [], [], []
    seen_ref, seen_dec = {}, {}
    sparsifier.observer = lambda i, kinds, x: seen_ref.__setitem__((i, GROUP_OF[kinds[0]]), x.reshape(-1).clone())
    dec.ops.observer = lambda i, kinds, x: seen_dec.__setitem__((i, GROUP_OF[kinds[0]]), x.reshape(-1).float().clone())
    with model.sparsified(sparsifier):
        for t, tok in enumerate(tokens):
            ref.append(model(torch.tensor([[tok]]), input_pos=torch.tensor([t]))[0, -1])
            ours.append(dec.forward_token(torch.tensor([[tok]]), torch.tensor([t]))[0])
            flips.append(th is not None and first_flip(seen_ref, seen_dec, th))
            for a, b in zip(model.layers, dec.model.layers) if sync else ():
                b.attention.kv_cache.k[:, :, : t + 1] = a.attention.kv_cache.k[:, :, : t + 1]
                b.attention.kv_cache.v[:, :, : t + 1] = a.attention.kv_cache.v[:, :, : t + 1]
    model.clear_caches()
    sparsifier.observer = dec.ops.observer = None
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


def settings_of(th):
    return {k: PS(threshold=t) for k, t in th.items()}


def test_each_launch_keeps_its_own_ticket_counters():
    """Every sparse launch and the attention own their split-K counters (never the per-device shared ones),
    so decoders on different streams of one GPU cannot corrupt each other's reductions; they are left zero."""
    import acttail.kernels.launch as L

    model = tiny_model()
    th = thresholds(CONFIG["num_hidden_layers"])
    L._LOCKS.clear()
    decs = [decoder(model), decoder(model)]
    for dec in decs:
        dec.set_settings(settings_of(th))
        dec.prefill(torch.tensor([[5, 17, 42]]))
        dec.forward_token(dec.tokens, dec.pos)
    locks = [launch.kernel.locks for dec in decs for launch in dec.ops.launches.values()] + [d.ops.locks for d in decs]
    assert len({t.data_ptr() for t in locks}) == len(locks) and all(int(t.abs().sum()) == 0 for t in locks)
    assert not L._LOCKS  # nothing fell back to the shared counters


@pytest.mark.parametrize("architecture", list(ARCHS))
def test_sparse_decode_agrees_with_cpu_reference(architecture):
    # fp16 vs fp32 rounding can move an activation across its threshold now and then (the fused SwiGLU
    # rounds once, the reference three times); such a flip perturbs that token's logits by a few percent
    # (and, through the KV cache, later ones: each step starts from the reference's cache). So: every token
    # agrees to fp16 precision unless a flip (checked to be one) came first, and none is far off; a broken
    # path fails on every token. The dense run, from its own cache, checks the cache writes.
    model = tiny_model(architecture=architecture)
    assert model.args.qkv_bias == (architecture == "Qwen2ForCausalLM")
    sparse_decode_agrees(model)


def test_a_rotated_checkpoint_decodes_as_the_reference():
    """A rotated checkpoint's basis change before each layer but the first (acttail.rotation) runs on the decode
    path as in the reference."""
    model = tiny_model(architecture="LlamaForCausalLM", acttail_rotation={"kind": "layer"})
    assert model.layers[0].basis is None and model.layers[1].basis is not None
    sparse_decode_agrees(model)


def sparse_decode_agrees(model):
    dec = decoder(model)
    tokens = [5, 17, 42, 8, 77, 30]
    th = thresholds(CONFIG["num_hidden_layers"])
    dec.set_settings(settings_of(th))
    assert dec.ops.sparse_groups(1) == 4 * CONFIG["num_hidden_layers"]
    ref, ours, flips = decode_both(model, dec, tokens, Sparsifier(settings_of(th)), sync=True, th=th)
    dense_ref, dense, _ = decode_both(model, decoder(model), tokens, Sparsifier.dense())
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert all(e < 5e-3 or flip for e, flip in zip(errs, flips)) and max(errs) < 0.3, (errs, flips)
    assert flips.count(False) >= 2, flips  # some tokens are compared at full precision
    assert max(rel_err(a, b) for a, b in zip(dense, dense_ref)) < 5e-3
    assert rel_err(ref, dense_ref) > 0.1  # the thresholds change the logits: the comparison can fail


@pytest.mark.parametrize("weights", ["int8", "int4", "q4_1"])
def test_quantized_decode_agrees_with_the_reference_on_its_weights(weights):
    """Decode over int8 / int4 weights (every group a kernel launch, the dense ones reading every row) against
    the fp32 reference whose projections hold the same weights dequantized (kernels.dequantize_ref); dense and
    with thresholds (flips as in the test above)."""
    import copy

    from acttail.kernels import INT4_GROUP, dequantize_ref
    from acttail.kernels.sparse_gemv import Q4_1_GROUP

    model = tiny_model()
    dec = decoder(model, weights=weights)
    L = CONFIG["num_hidden_layers"]
    assert len(dec.ops.launches) == 4 * L and dec.ops.sparse_groups(1) == 4 * L  # dense groups too: no fp16 GEMV
    ref = copy.deepcopy(model)
    for (i, group), launch in dec.ops.launches.items():
        k = launch.kernel
        assert k.wt.dtype == (torch.int8 if weights == "int8" else torch.uint8)
        assert k.group == {"int8": None, "int4": INT4_GROUP, "q4_1": Q4_1_GROUP}[weights]
        block = ref.layers[i]
        linear = {"qkv": block.attention.wqkv, "o": block.attention.wo, "gate_up": block.feed_forward.w13,
                  "down": block.feed_forward.w2}[group]
        w = dequantize_ref(k.wt, k.scales, k.group).t()
        assert rel_err(w, linear.weight) < (0.01 if weights == "int8" else 0.2)  # a quantization, not garbage
        linear.weight.copy_(w)
    tokens = [5, 17, 42, 8, 77]
    dense_ref, dense, _ = decode_both(ref, dec, tokens, Sparsifier.dense())
    assert max(rel_err(a, b) for a, b in zip(dense, dense_ref)) < 5e-3
    th = thresholds(L)
    dec.set_settings(settings_of(th))
    assert all(launch.kernel.scales is not None for launch in dec.ops.launches.values())
    sparse_ref, ours, flips = decode_both(ref, dec, tokens, Sparsifier(settings_of(th)), sync=True, th=th)
    errs = [rel_err(a, b) for a, b in zip(ours, sparse_ref)]
    # a checked rounding flip moves a token by up to ~0.3 here (q4_1 with fp16 scales: 0.30000 on one token)
    assert all(e < 5e-3 or flip for e, flip in zip(errs, flips)) and max(errs) < 0.5, (errs, flips)
    assert flips.count(False) >= 2, flips
    assert rel_err(dense_ref, decode_both(model, decoder(model), tokens, Sparsifier.dense())[0]) > 1e-3  # quantized


def test_an_unknown_weight_format_is_one_clear_error():
    from acttail.errors import ActTailError

    with pytest.raises(ActTailError, match="unknown weight format 'int3'"):
        decoder(tiny_model(), weights="int3")


@pytest.mark.parametrize("architecture", list(ARCHS))
def test_fused_norms_and_rope_match_separate_launches(architecture, monkeypatch):
    """The decode step with each block's residual add + RMSNorm fused into its sparse projections and RoPE +
    the cache write fused into attention gives the logits of the step with separate launches (same fp16
    roundings), with fewer launches: only the final norm (and Gemma 2/3's extra norms) stays apart."""
    import acttail.runtime.kernel_ops as K

    model = tiny_model(6, architecture=architecture)
    th = thresholds(CONFIG["num_hidden_layers"])
    g = torch.Generator().manual_seed(6)
    comp = {key: PS(threshold=t, bias=0.1 * torch.randn(model.args.out_features(key[1]), generator=g))
            for key, t in th.items()}
    calls = {"norm": 0, "rope": 0}
    counted = lambda fn, name: lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k)  # noqa: E731
    monkeypatch.setattr(K, "add_rmsnorm", counted(K.add_rmsnorm, "norm"))
    monkeypatch.setattr(K, "rope_cache_write", counted(K.rope_cache_write, "rope"))
    logits, launches = {}, {}
    for fuse in (True, False):
        dec = decoder(model)
        dec.ops.fuse = fuse
        dec.set_settings(comp)
        dec.tokens.copy_(dec.prefill(torch.tensor([[5, 17, 42]])).argmax(-1, keepdim=True))
        calls.update(norm=0, rope=0)
        steps = []
        for _ in range(4):
            steps.append(dec.forward_token(dec.tokens, dec.pos)[0])
            dec.tokens.copy_(steps[-1].argmax(-1).view(1, 1))
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
        sets[i, k] = PS(threshold=t, bias=(0.1 * torch.randn(n_out, generator=g)).half().float(),
                        lowrank=low if lowrank and k in ("v", "up", "down") else None)
    dec = decoder(model)
    dec.set_settings(sets)
    with_lowrank = {"qkv", "gate_up", "down"} if lowrank else set()
    for (i, grp), launch in dec.ops.launches.items():
        assert (launch.lowrank is not None) == (grp in with_lowrank) and launch.fuses_norm == (grp not in with_lowrank)
    assert len(dec.ops.launches) == 4 * CONFIG["num_hidden_layers"]
    tokens = [5, 17, 42, 8, 77, 30, 11, 60, 3, 95, 23, 49]
    ref, ours, flips = decode_both(model, dec, tokens, Sparsifier(sets), sync=True, th=th)
    plain, _, _ = decode_both(model, dec, tokens, Sparsifier(settings_of(th)), sync=True)
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    # a flip moves an input between the kept part and the low-rank term too: such a token may differ more.
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
    dec = decoder(model)
    sp = {(i, k): 0.3 + 0.08 * j for i in range(CONFIG["num_hidden_layers"]) for j, k in enumerate(KINDS)}
    keeps = {key: keep_count(s, model.args.in_features(key[1])) for key, s in sp.items()}
    dec.set_settings({k: PS(keep=n) for k, n in keeps.items()})
    tokens = [7, 3, 50, 21, 64, 12]
    ref, ours, _ = decode_both(model, dec, tokens, Sparsifier({k: PS(keep=n) for k, n in keeps.items()}), sync=True)
    dense_ref, _, _ = decode_both(model, dec, tokens[:1], Sparsifier.dense())
    errs = sorted(rel_err(a, b) for a, b in zip(ours, ref))
    assert errs[len(errs) // 2] < 5e-3 and errs[-1] < 0.3, errs
    assert rel_err(ref[:1], dense_ref) > 0.05  # top-k changes the logits


@pytest.mark.parametrize("architecture", list(ARCHS))
def test_prefill_matches_reference_forward(architecture):
    model = tiny_model(1, architecture=architecture)
    dec = decoder(model)
    prompt = torch.tensor([[3, 9, 27, 81 % 96, 11]])
    logits = dec.prefill(prompt)
    ref = model(prompt)[0, -1:]
    assert rel_err(logits, ref) < 2e-2
    assert int(dec.pos[0]) == 5 and torch.equal(dec.out[0, :5], prompt[0])
    assert dec.prefill_length(5) == 16  # padded: the padding wrote the cache past the prompt
    assert dec.model.layers[0].attention.kv_cache.k[0, :, 5:16].abs().sum() > 0


def test_prefill_padding_changes_nothing_the_prompt_sees(monkeypatch):
    """A prompt padded to its length bucket gives the logits and the decode steps of the unpadded prompt:
    causal attention keeps the padding out of the prompt, and each step writes its own cache position first."""
    import acttail.runtime.decoder as decoder_module

    model = tiny_model(2)
    prompt = torch.tensor([[3, 9, 27, 11, 50]])
    runs = []
    for most in (256, 0):  # padded to 16, then not padded
        monkeypatch.setattr(decoder_module, "PREFILL_GRAPH_MAX", most)
        dec = decoder(model)
        assert dec.prefill_length(5) == (16 if most else 5)
        first = dec.prefill(prompt)
        steps = [dec.forward_token(torch.tensor([[7 + k]]), dec.pos + k)[0] for k in range(3)]
        runs.append(torch.stack([first[0], *steps]))
    assert rel_err(runs[0], runs[1]) < 1e-3


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_decode_attention_kernel_equals_sdpa_in_the_decoder(architecture):
    model = tiny_model(4, architecture)
    outs = {}
    for attention in ("kernel", "sdpa"):
        dec = decoder(model)
        dec.ops.attention_impl = attention
        dec.prefill(torch.tensor([[4, 8, 15, 16]]))
        outs[attention] = torch.stack([dec.forward_token(torch.tensor([[23 + k]]), dec.pos + k)[0] for k in range(3)])
    assert rel_err(outs["kernel"], outs["sdpa"]) < 3e-3


def test_generate_is_greedy_decoding_of_the_reference():
    """Decoder.generate: greedy tokens equal those of the fp32 reference decoded one at a time (a dense
    plan), returned after the prompt as transformers' generate does; EOS stops it and pads what follows."""
    model = tiny_model(8)
    dec = decoder(model)
    prompt = torch.tensor([[5, 17, 42, 8]])
    out = dec.generate(prompt, max_new_tokens=8)
    assert out.shape == (1, 12) and torch.equal(out[:, :4], prompt)
    model.setup_caches(1, 16)
    ref = []
    logits = model(prompt, torch.arange(4))[:, -1]
    for t in range(8):
        ref.append(int(logits.argmax(-1)))
        logits = model(torch.tensor([[ref[-1]]]), torch.tensor([4 + t]))[:, -1]
    model.clear_caches()
    assert out[0, 4:].tolist() == ref
    stop = ref[2]
    cut = dec.generate(prompt, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    first = ref.index(stop)
    assert cut[0, 4:4 + first + 1].tolist() == ref[:first + 1] and (cut[0, 4 + first + 1:] == 0).all()


def test_generate_batch_rows_equal_single_sequences():
    """Two prompts at once give each prompt's own greedy continuation (batch 2 decodes with torch attention and
    the several-token kernel path; every group sparse, planned=None)."""
    model = tiny_model(9)
    th = thresholds(CONFIG["num_hidden_layers"])
    planned = None
    singles = []
    for p in ([3, 1, 4, 1], [2, 7, 1, 8]):
        dec = decoder(model)
        dec.set_settings(settings_of(th), planned)
        singles.append(dec.generate(torch.tensor([p]), max_new_tokens=5))
    dec = decoder(model, batch=2)
    dec.set_settings(settings_of(th), planned)
    both = dec.generate(torch.tensor([[3, 1, 4, 1], [2, 7, 1, 8]]), max_new_tokens=5)
    assert torch.equal(both, torch.cat(singles))


def test_sampler_draws_from_the_filtered_distribution():
    """The exponential race draws token i with probability p_i; top-k and top-p remove what transformers'
    warpers remove; top_k=1 is greedy."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(20000, 1)
    draws = Sampler(temperature=1.0, top_k=None)(logits)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.01)
    assert set(Sampler(top_k=2)(logits).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # sorted: 0.49, 0.18, 0.11, 0.07, 0.02 (about)
    assert set(Sampler(top_k=None, top_p=0.6)(logits).tolist()) == {0, 1}  # the smallest set reaching 0.6
    assert torch.equal(Sampler(top_k=1)(logits[:3]), greedy(logits[:3])) and p.sum() > 0.99
    with pytest.raises(Exception, match="temperature > 0"):
        Sampler(temperature=0.0)


def test_streamer_gets_the_prompt_then_each_new_token():
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    model = tiny_model(8)
    dec = decoder(model)
    s = Collect()
    out = dec.generate(torch.tensor([[5, 17]]), max_new_tokens=4, streamer=s)
    assert s.puts[0] == [[5, 17]] and sum(s.puts[1:], []) == out[0, 2:].tolist() and s.ended
    with pytest.raises(Exception, match="batch 1"):
        decoder(model, batch=2).generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=2, streamer=s)


def test_after_eos_pads_and_cuts():
    seq = torch.tensor([[9, 9, 1, 5, 2, 7], [9, 9, 4, 2, 6, 6]])
    out = _after_eos(seq.clone(), 2, [2], 0)
    assert out.tolist() == [[9, 9, 1, 5, 2], [9, 9, 4, 2, 0]]
    assert _after_eos(seq.clone(), 2, [7], 0).tolist() == [[9, 9, 1, 5, 2, 7], [9, 9, 4, 2, 6, 6]]  # one row runs on
