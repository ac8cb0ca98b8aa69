"""The runtime: dense logits against HF transformers, KV-cache decode, and the sparsifier's contract."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from acttail.checkpoint import Checkpoint
from acttail.errors import ActTailError
from acttail.runtime import load_model, open_model, plan_sparsifier
from acttail.plan import Plan, PlanEntry
from acttail.runtime.generate import generate
from acttail.runtime.model import ModelArgs, Transformer, rope_inv_freq
from acttail.runtime.sparsify import ProjectionSparsity as PS, Sparsifier, dense_prefix, threshold_sparsify, topk_sparsify

from runtime_tiny import GEMMA3_LAYERS, SLIDING_WINDOW, hf_config, randomize, write_hf_model

transformers = pytest.importorskip("transformers")

MODELS = Path.home() / ".cache" / "acttail" / "models"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder, HF model) for the architectures and rope settings the runtime supports."""
    root = tmp_path_factory.mktemp("tiny")
    specs = {"llama": dict(arch="llama"), "qwen2": dict(arch="qwen2", tie=False), "mistral": dict(arch="mistral"),
             "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3, tie=False),
             "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
             "gemma": dict(arch="gemma"), "gemma2": dict(arch="gemma2"), "gemma3": dict(arch="gemma3"),
             "phi3": dict(arch="phi3")}
    return {name: (root / name, write_hf_model(root / name, seed=i, **kw)) for i, (name, kw) in enumerate(specs.items())}


NEW = ["gemma", "gemma2", "gemma3", "phi3"]


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama3-rope", "linear-rope", *NEW])
def test_dense_logits_match_transformers(tiny, name):
    """200 tokens: far past the sliding window of the Gemma 2/3 and Phi-3 configs."""
    folder, hf = tiny[name]
    _, model = open_model(folder)
    ids = torch.randint(0, 320, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    err = rel_err(model(ids), ref)
    print(f"{name}: relative logit error {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("name", NEW)
def test_kv_cache_decode_matches_transformers(tiny, name):
    """Prefill 6 tokens, then decode 26 one at a time (the sliding window is 8): transformers' logits."""
    folder, hf = tiny[name]
    _, model = open_model(folder)
    ids = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
    model.setup_caches(1, 40)
    steps = [model(ids[:, :6], torch.arange(6))]
    steps += [model(ids[:, p: p + 1], torch.tensor([p])) for p in range(6, 32)]
    model.clear_caches()
    err = rel_err(torch.cat(steps, dim=1), ref)
    print(f"{name}: relative logit error with the KV cache {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3"])
def test_greedy_generation_past_the_window_matches_transformers(tiny, name):
    folder, hf = tiny[name]
    _, model = open_model(folder)
    prompt = torch.tensor([5, 17, 42, 99, 7])
    ours = generate(model, prompt, 3 * SLIDING_WINDOW, temperature=0.0)
    with torch.no_grad():
        ref = hf.generate(prompt[None], max_new_tokens=3 * SLIDING_WINDOW, do_sample=False, eos_token_id=None)
    assert ours == ref[0, 5:].tolist()


@pytest.mark.parametrize("name,option,value", [
    ("gemma", "embed_scale", None), ("gemma", "activation", "silu"), ("gemma", "norm_offset", 0.0),
    ("gemma2", "attn_softcap", None), ("gemma2", "final_softcap", None), ("gemma2", "sliding_window", None),
    ("gemma2", "attn_scale", None), ("gemma3", "local_rope_base", None), ("gemma3", "rope_scaling", None),
    ("gemma3", "qk_norm", False), ("gemma3", "sliding_window", None), ("phi3", "rope_scaling", None),
    ("phi3", "sliding_window", None)])
def test_each_option_changes_the_logits(tiny, name, option, value):
    """Without any one of its options the model strays from transformers: the matches above mean something."""
    _, model = open_model(tiny[name][0])
    other = Transformer(dataclasses.replace(model.args, **{option: value}))
    other.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(3))
    assert rel_err(other.eval().requires_grad_(False)(ids), model(ids)) > 1e-2


def test_gemma3_multimodal_checkpoint_runs_its_text_part(tmp_path):
    """Gemma3ForConditionalGeneration: the decoder is found beside the vision tower's layers."""
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, eos_token_id=0,
                  bos_token_id=0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=hf_config("gemma3", common), vision_config=vision,
                                    mm_tokens_per_image=4, image_token_index=300, boi_token_index=301,
                                    eoi_token_index=302)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg)
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ckpt, model = open_model(tmp_path)
    assert ckpt.num_layers == len(GEMMA3_LAYERS) and len(ckpt.projections()) == 7 * len(GEMMA3_LAYERS)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids).logits
    assert rel_err(model(ids), ref) < 1e-4


def test_gemma3_hub_style_config_reads_like_transformers():
    """A config.json as on the hub (rope_theta, rope_local_base_freq, rope_scaling, the window pattern, a
    multimodal text_config giving few keys) gives the options transformers reads from it."""
    old = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 7, "vocab_size": 320,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 16}
    args = ModelArgs.from_config(old, "Gemma3ForConditionalGeneration")
    ref = transformers.Gemma3TextConfig(**old)
    assert args.layer_types == tuple(ref.layer_types) and args.layer_types[5] == "full_attention"
    assert (args.n_head, args.n_local_heads, args.head_dim) == (ref.num_attention_heads, ref.num_key_value_heads,
                                                                ref.head_dim)
    assert args.rope_base == ref.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert args.local_rope_base == ref.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert args.rope_scaling["factor"] == 8.0 and args.attn_scale == 256 ** -0.5
    assert (args.embed_scale, args.norm_offset, args.activation) == (8.0, 1.0, "gelu_tanh")


@pytest.mark.parametrize("config,arch,match", [
    ({"partial_rotary_factor": 0.75}, "Phi3ForCausalLM", "partial rotary"),
    ({"hidden_act": "relu"}, "LlamaForCausalLM", "hidden activation 'relu'"),
    ({"hidden_activation": "gelu"}, "Gemma2ForCausalLM", "hidden activation 'gelu'"),
    ({"use_bidirectional_attention": True}, "Gemma3ForCausalLM", "bidirectional"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8}}, "Phi3ForCausalLM", "LongRoPE"),
    # found by the config fuzzer: LongRoPE on another family without its original length (was a KeyError)
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8}}, "LlamaForCausalLM", "LongRoPE"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 5, "original_max_position_embeddings": 64}},
     "LlamaForCausalLM", "short_factor has 5 values, the head dimension 16 needs 8")])
def test_unsupported_options_are_clear_errors(config, arch, match):
    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 320}
    with pytest.raises(ActTailError, match=match):
        ModelArgs.from_config({**base, **config}, arch)


def test_rope_scaling_is_applied(tiny):
    """The llama3 model differs from the same weights without scaling (so the match above means something)."""
    folder, hf = tiny["llama3-rope"]
    ckpt = Checkpoint.open(folder)
    plain = ModelArgs.from_config({**ckpt.config, "rope_parameters": {"rope_theta": 10000.0}}, ckpt.architecture)
    scaled = ModelArgs.from_config(ckpt.config, ckpt.architecture)
    assert not torch.allclose(rope_inv_freq(plain), rope_inv_freq(scaled))


def test_unknown_rope_scaling_is_a_clear_error(tiny):
    ckpt = Checkpoint.open(tiny["llama"][0])
    args = ModelArgs.from_config({**ckpt.config, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
                                 ckpt.architecture)
    with pytest.raises(ActTailError, match="rope scaling type 'yarn'"):
        rope_inv_freq(args)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(ActTailError, match="runtime runs"):
        ModelArgs.from_config({"num_attention_heads": 4}, "GPT2LMHeadModel")


def test_kv_cache_decode_matches_one_forward(tiny):
    """Prefill + token-by-token decode with the static cache gives the full forward's logits."""
    _, model = open_model(tiny["qwen2"][0])
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    model.setup_caches(1, 64)
    steps = [model(ids[:, :30], torch.arange(30))]
    for pos in range(30, 40):
        steps.append(model(ids[:, pos : pos + 1], torch.tensor([pos])))
    model.clear_caches()
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_greedy_generation_matches_transformers(tiny):
    folder, hf = tiny["llama"]
    _, model = open_model(folder)
    prompt = torch.tensor([5, 17, 42, 99, 7])
    ours = generate(model, prompt, 12, temperature=0.0)
    with torch.no_grad():
        ref = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 5:]
    assert ours == ref.tolist()


def test_context_longer_than_the_model_is_an_error(tiny):
    _, model = open_model(tiny["llama"][0])
    with pytest.raises(ActTailError, match="maximum context"):
        model(torch.zeros(1, 257, dtype=torch.int64))
    with pytest.raises(ActTailError, match="maximum context"):
        model.setup_caches(1, 300)


# ---- sparsification --------------------------------------------------------------------------------

def test_threshold_and_topk_kernels():
    x = torch.tensor([[0.125, -0.5, 0.25, -0.0625, 1.0, 0.375]])
    assert threshold_sparsify(x, 0.25).tolist() == [[0.0, -0.5, 0.0, 0.0, 1.0, 0.375]]
    assert topk_sparsify(x, 2).tolist() == [[0.0, -0.5, 0.0, 0.0, 1.0, 0.0]]
    y = topk_sparsify(torch.randn(50, 128), 40)
    assert ((y != 0).sum(-1) == 40).all()


def eye_linear(width: int, parts: int = 1) -> torch.nn.Linear:
    """A fused projection whose every part passes its (sparsified) input through unchanged."""
    linear = torch.nn.Linear(width, width * parts, bias=False)
    linear.weight.data = torch.eye(width).repeat(parts, 1)
    return linear


def test_shared_input_gets_one_copy_per_projection_and_counts():
    sp = Sparsifier({(0, "q"): PS(threshold=0.5), (0, "k"): PS(threshold=0.0), (0, "v"): PS(threshold=10.0)})
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    q, k, v = sp.project(0, ("q", "k", "v"), x, eye_linear(64, 3), (64, 64, 64)).split(64, dim=-1)
    assert torch.equal(q, threshold_sparsify(x, 0.5)) and torch.equal(k, x) and (v == 0).all()
    got = sp.achieved()
    assert got[(0, "q")] == pytest.approx(float((x.abs() <= 0.5).float().mean()))
    assert got[(0, "k")] == 0.0 and got[(0, "v")] == 1.0
    o = sp.project(1, ("o",), x, eye_linear(64))
    assert torch.equal(o, x) and (1, "o") not in sp.achieved()  # a projection without a setting stays dense


def test_topk_mode_keeps_exactly_its_share_per_token():
    sp = Sparsifier({(0, "gate"): PS(keep=72), (0, "up"): PS(keep=24)})
    x = torch.randn(3, 5, 96)
    g, u = sp.project(0, ("gate", "up"), x, eye_linear(96, 2), (96, 96)).split(96, dim=-1)
    assert ((g != 0).sum(-1) == 72).all() and ((u != 0).sum(-1) == 24).all()
    assert sp.achieved() == {(0, "gate"): 0.25, (0, "up"): 0.75}


def test_prefill_policy_keeps_early_positions_dense():
    assert [dense_prefix(10, p) for p in ("all", "half", "none")] == [0, 5, 10]
    sp = Sparsifier({(0, "down"): PS(threshold=1e9)}, dense_before=4)
    sp.set_positions(torch.arange(10))
    x = torch.randn(2, 10, 16) + 5
    y = sp.project(0, ("down",), x, eye_linear(16))
    assert torch.equal(y[:, :4], x[:, :4]) and (y[:, 4:] == 0).all()
    assert sp.achieved()[(0, "down")] == 1.0  # counted over the sparsified positions only


def test_sparse_forward_uses_each_threshold(tiny):
    """A huge threshold on v alone zeroes the attention output; on nothing it equals the dense run."""
    _, model = open_model(tiny["llama"][0])
    ids = torch.randint(0, 320, (1, 16))
    dense = model(ids)
    with model.sparsified(Sparsifier({(0, "q"): PS(threshold=0.0), (0, "k"): PS(threshold=0.0)})):
        assert torch.allclose(model(ids), dense, atol=1e-6)
    with model.sparsified(Sparsifier({(layer, "v"): PS(threshold=1e9) for layer in range(2)})):
        assert not torch.allclose(model(ids), dense, atol=1e-3)
    assert torch.equal(model(ids), dense)  # the dense sparsifier is back


def test_plan_without_thresholds_is_refused_in_threshold_mode():
    plan = Plan(model={"fingerprint": "fp", "num_layers": 1}, budget=0.5, method={"name": "uniform"},
                projections=[PlanEntry(layer=0, kind="q", in_features=64, out_features=64, sparsity=0.5)])
    with pytest.raises(ActTailError, match="no thresholds"):
        plan_sparsifier(plan, "threshold")
    assert plan_sparsifier(plan, "topk").settings == {(0, "q"): PS(keep=32)}


# ---- the real checkpoints (fetched by CI before the tests) -----------------------------------------

@pytest.mark.parametrize("name,key,cls,n", [("smollm2-135m", "smollm2", "LlamaForCausalLM", 128),
                                            ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b", "Qwen2ForCausalLM", 128),
                                            ("gemma-3-270m", "gemma3-270m", "Gemma3ForCausalLM", 600)])
def test_real_checkpoint_matches_transformers(name, key, cls, n):
    """n tokens: Gemma-3-270M's past its sliding window of 512."""
    folder = MODELS / name
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} absent (run `acttail fetch {key}`)")
    hf = getattr(transformers, cls).from_pretrained(folder, dtype=torch.float32).eval()
    model = load_model(Checkpoint.open(folder))
    ids = torch.randint(0, 10000, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    del hf
    err = rel_err(model(ids), ref)
    print(f"{name}: relative logit error {err:.3e}")
    assert err < 1e-4


def test_scores_and_compensation_on_sparse_positions_only():
    """Per-channel score weights pick what is dropped; bias and low-rank factors act on sparsified positions,
    and dense-prefill positions keep the original projection."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 16, generator=g)
    lin = torch.nn.Linear(16, 8, bias=False)
    lin.weight.data = torch.randn(8, 16, generator=g)
    score = torch.rand(16, generator=g) + 0.5
    u, v = torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g)
    s = PS(threshold=0.6, score=score, bias=torch.ones(8), lowrank=(u, v))
    sp = Sparsifier({(0, "down"): s}, dense_before=2)
    sp.set_positions(torch.arange(6))
    y = sp.project(0, ("down",), x, lin)
    kept = x * ((x.abs() * score) > 0.6)
    want = kept @ lin.weight.T + (x - kept) @ v.T @ u.T + 1.0
    assert torch.allclose(y[:, 2:], want[:, 2:], atol=1e-5)
    assert torch.allclose(y[:, :2], lin(x)[:, :2], atol=1e-6)
    assert sp.achieved()[(0, "down")] == pytest.approx(float((kept[:, 2:] == 0).float().mean()))
