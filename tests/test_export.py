"""Exporters (gemma3n, nncf, teal) and examples/hf_hooks.py consuming a calibrated plan."""

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from acttail.allocation import plan_from_analysis
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.export import TEAL_COLUMNS, export, gemma3n_pattern, nncf_scopes
from stage2_synthetic import KINDS, analysis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plan():
    return plan_from_analysis(analysis(num_layers=12, seed=3), 0.6, method="acttail")


def layer_mean(plan, layer):
    es = [e for e in plan.projections if e.layer == layer]
    return sum(e.sparsity * e.params for e in es) / sum(e.params for e in es)


def test_gemma3n_pattern(plan, tmp_path):
    out = tmp_path / "gemma3n.json"
    export(plan, "gemma3n", out)
    pattern = json.loads(out.read_text())["activation_sparsity_pattern"]
    assert len(pattern) == 12 and pattern == gemma3n_pattern(plan)
    assert pattern == pytest.approx([layer_mean(plan, i) for i in range(12)], rel=1e-12)
    assert len(set(pattern)) == 12  # real per-layer numbers, not the budget repeated


def gemma3n_classes():
    """Gemma-3n's text config and model from the installed transformers; a printed skip where it has none."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3nTextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma-3n (added in 4.53)")
    return transformers.AutoConfig, transformers.Gemma3nTextConfig, transformers.Gemma3nForCausalLM


def test_gemma3n_pattern_loads_in_transformers(plan, tmp_path):
    """transformers' own Gemma-3n reads the exported field from config.json and cuts each layer's gate output
    at the plan's per-layer sparsity."""
    import torch

    auto_config, config_class, model_class = gemma3n_classes()
    export(plan, "gemma3n", tmp_path / "gemma3n.json")
    exported = json.loads((tmp_path / "gemma3n.json").read_text())
    pattern = exported["activation_sparsity_pattern"]
    tiny = config_class(vocab_size=64, vocab_size_per_layer_input=64, hidden_size=32, hidden_size_per_layer_input=8,
                        intermediate_size=256, num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, layer_types=["full_attention"] * 12, num_kv_shared_layers=0, laurel_rank=4,
                        altup_num_inputs=2)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**tiny.to_dict(), **exported}))  # the field merged in
    cfg = auto_config.from_pretrained(tmp_path / "model")
    assert type(cfg) is config_class and cfg.activation_sparsity_pattern == pattern
    torch.manual_seed(0)
    model = model_class(cfg).eval()
    assert [layer.mlp.activation_sparsity for layer in model.model.layers] == pattern
    zeroed = {}  # fraction of each layer's gate-projection output that reaches the activation function as 0
    for i, layer in enumerate(model.model.layers):
        layer.mlp.act_fn.register_forward_pre_hook(
            lambda m, args, i=i: zeroed.__setitem__(i, float((args[0] == 0).float().mean())))
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (1, 16))).logits
    assert logits.shape == (1, 16, 64) and torch.isfinite(logits).all()
    assert [zeroed[i] for i in range(12)] == pytest.approx(pattern, abs=0.04)  # Gaussian quantile, 16 x 256 samples
    with pytest.raises(ValueError, match="every layer"):  # one value per layer, checked by transformers
        config_class(num_hidden_layers=11, layer_types=["full_attention"] * 11, activation_sparsity_pattern=pattern)


def test_nncf_scopes_match_one_node_each(plan, tmp_path):
    out = tmp_path / "nncf.json"
    export(plan, "nncf", out)
    scopes = json.loads(out.read_text())
    assert scopes == nncf_scopes(plan) and len(scopes) == 12 * 7
    # node names of NNCF 3.4's torch tracing of a HF Llama (call index = layer), plus lm_head
    names = [f"model/{'self_attn' if k in 'qkvo' else 'mlp'}/{k}_proj/linear/{i}" for i in range(12) for k in KINDS]
    names.append("lm_head/linear/0")
    for pattern, sparsity in scopes.items():
        matched = [n for n in names if re.match(pattern, n)]  # NNCF uses re.match
        assert len(matched) == 1, (pattern, matched)
        kind, layer = re.search(r"/(\w+)_proj/linear/(\d+)$", matched[0]).groups()
        assert plan.projections[int(layer) * 7 + KINDS.index(kind)].sparsity == sparsity


def nncf_sparsify(model, plan, data):
    """NNCF's own sparsify_activations on ``model`` with our export; -> (sparse model, key -> its sparsifier)."""
    nncf = pytest.importorskip("nncf", reason="nncf is not installed (pip install -e '.[dev]' installs it)")
    from nncf.experimental.torch.sparsify_activations import TargetScope, sparsify_activations
    from nncf.experimental.torch.sparsify_activations.torch_backend import ActivationsSparsifier
    from nncf.torch.function_hook.wrapper import get_hook_storage

    scopes = {TargetScope(patterns=[k]): v for k, v in nncf_scopes(plan).items()}
    sparse = sparsify_activations(model, nncf.Dataset(data), target_sparsity_by_scope=scopes)
    sparsifiers = {}
    for name, hook in get_hook_storage(sparse).named_hooks():
        if isinstance(hook, ActivationsSparsifier):
            proj, layer = re.search(r"/(\w+)_proj/linear/(\d+)__", name).groups()
            sparsifiers[f"layers.{layer}.{proj}"] = hook
    return sparse, sparsifiers


def test_nncf_accepts_the_export():
    """NNCF puts a sparsifier at the plan's sparsity before every projection the plan names (and nowhere
    else), recalibrates its thresholds on its dataset, and the projections consume the sparsified inputs."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=3, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    plan = plan_from_analysis(analysis(num_layers=3, hidden=64, inter=128, kv=32), 0.5, method="acttail")
    data = [torch.randint(0, 64, (1, 32)) for _ in range(8)]
    sparse, sparsifiers = nncf_sparsify(model, plan, data)
    assert {k: h.target_sparsity for k, h in sparsifiers.items()} == pytest.approx(
        {e.key: e.sparsity for e in plan.projections})
    assert all(torch.isfinite(h.running_threshold) and h.running_threshold > 0 for h in sparsifiers.values())
    zeroed, seen = {k: [] for k in sparsifiers}, {}
    for key, hook in sparsifiers.items():
        hook.register_forward_hook(lambda m, args, out, key=key: zeroed[key].append(float((out == 0).float().mean())))
    sparsifiers["layers.2.down"].register_forward_hook(lambda m, args, out: seen.__setitem__("x", out))
    down = sparse.model.layers[2].mlp.down_proj
    down.register_forward_hook(lambda m, args, out: seen.update(dense_x=args[0], y=out))
    with torch.no_grad():
        for ids in data:
            logits = sparse(ids).logits
    assert logits.shape == (1, 32, 64) and torch.isfinite(logits).all()
    achieved = {k: sum(v) / len(v) for k, v in zeroed.items()}  # on its own calibration data: about the target
    assert achieved == pytest.approx({e.key: e.sparsity for e in plan.projections}, abs=0.1)
    # the projection ran on the sparsified input, not on the dense one its module was called with
    assert (seen["dense_x"] != 0).all() and (seen["x"] == 0).any()
    assert torch.allclose(seen["y"], seen["x"] @ down.weight.T, atol=1e-6)
    assert not torch.allclose(seen["y"], seen["dense_x"] @ down.weight.T, atol=1e-5)


def test_teal_folder(plan, tmp_path):
    out = tmp_path / "teal"
    written = export(plan, "teal", out)
    assert len(written) == 12 and sorted(p.name for p in out.iterdir()) == sorted(f"layer-{i}" for i in range(12))
    with open(out / "layer-5" / "results.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == TEAL_COLUMNS and len(table) == 2
    row = dict(zip(table[0], table[1]))
    assert row["Activation Error"] == "" and row["Baseline Error"] == ""
    assert float(row["Effective Sparsity"]) == pytest.approx(layer_mean(plan, 5), rel=1e-12)
    for kind in KINDS:
        assert float(row[kind]) == plan.projections[5 * 7 + KINDS.index(kind)].sparsity
    # exporting again replaces the folder; a foreign folder is refused, untouched
    export(plan_from_analysis(analysis(num_layers=12, seed=3), 0.4, method="acttail"), "teal", out)
    with open(out / "layer-5" / "results.csv", newline="") as f:
        assert float(list(csv.reader(f))[1][0]) != float(row["Effective Sparsity"])
    assert [p.name for p in tmp_path.iterdir()] == ["teal"]  # no temporary folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ActTailError, match="not a TEAL lookup folder"):
        export(plan, "teal", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_teal_needs_every_kind(plan, tmp_path):
    plan.projections = [e for e in plan.projections if e.kind != "v"]
    with pytest.raises(ActTailError, match="layer 0 lacks v"):
        export(plan, "teal", tmp_path / "teal")
    assert not (tmp_path / "teal").exists()


def test_cli_export(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    runner = CliRunner()
    for fmt, out in [("gemma3n", "g.json"), ("nncf", "n.json"), ("teal", "teal")]:
        res = runner.invoke(main, ["export", str(path), "--to", fmt, "-o", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
        assert (tmp_path / out).exists()
    res = runner.invoke(main, ["export", str(tmp_path / "g.json"), "--to", "teal", "-o", str(tmp_path / "t2")])
    assert res.exit_code == 2 and "not an acttail plan" in res.output and not (tmp_path / "t2").exists()
    res = runner.invoke(main, ["export", str(path), "--to", "onnx", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2


# ---- examples/hf_hooks.py -----------------------------------------------------------------------------

def load_example():
    spec = importlib.util.spec_from_file_location("hf_hooks", ROOT / "examples" / "hf_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved as a HF folder."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    words = "the a of and to in is was it for on that with as by at from this be are".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_plan(threshold):
    plan = plan_from_analysis(analysis(num_layers=2, hidden=32, inter=64, kv=16), 0.5, method="acttail")
    return plan.with_thresholds({e.key: threshold for e in plan.projections})


def median_thresholds(model, ids):
    """A stand-in for calibration: each projection's median |input| on ``ids`` (dense pass)."""
    import torch

    hf = load_example()
    found, handles = {}, []
    for layer, block in enumerate(model.model.layers):
        for kind, name in hf.MODULES.items():
            def grab(m, args, key=f"layers.{layer}.{kind}"):
                found[key] = float(args[0].abs().median())
            handles.append(block.get_submodule(name).register_forward_pre_hook(grab))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return found


def test_hooks_zero_small_inputs_exactly(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    hf = load_example()
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9, 10, 3, 4]])
    thresholds = median_thresholds(model, ids)
    plan = tiny_plan(0.0).with_thresholds(thresholds)
    sp = hf.Sparsifier()
    sp.attach(model, plan.to_dict())
    assert len(sp.handles) == 14
    seen = {}
    down = model.model.layers[1].mlp.down_proj
    down.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))  # runs after ours
    with torch.no_grad():
        model(ids)
    x, t = seen["x"], thresholds["layers.1.down"]
    assert ((x == 0) | (x.abs() > t)).all() and (x == 0).any() and (x != 0).any()
    measured = sp.measured()
    assert set(measured) == set(KINDS) and all(0.2 < v < 0.8 for v in measured.values()), measured
    assert measured["q"] == pytest.approx(0.5, abs=0.05)  # layer-0 q sees the same input as in the dense pass


def test_hf_hooks_script(tiny_model, tmp_path, capsys):
    hf = load_example()
    plan_path = tmp_path / "plan.json"
    tiny_plan(0.2).save(plan_path)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat is on the mat and it was in a box"] * 20))
    hf.main([str(tiny_model), str(plan_path), "--text", str(text), "--tokens", "64", "--prompt", "the",
             "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "14 hooks" in out and "perplexity over 64 tokens" in out and "generation:" in out
    dense, sparse = map(float, re.search(r"dense ([\d.]+)\s+sparse ([\d.]+)", out).groups())
    assert dense != sparse
    uncalibrated = tmp_path / "raw.json"
    plan_from_analysis(analysis(num_layers=2, hidden=32, inter=64, kv=16), 0.5, method="acttail").save(uncalibrated)
    with pytest.raises(SystemExit, match="no thresholds"):
        hf.main([str(tiny_model), str(uncalibrated)])
