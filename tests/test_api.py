"""The Python API: analyze / allocate / calibrate / apply / evaluate on stock transformers models and ours,
agreeing with the command line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import acttail
from acttail.cli import main
from acttail.runtime.tokens import load_tokenizer

from runtime_tiny import write_hf_model, write_text

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    folder = root / "model"
    hf = write_hf_model(folder, "llama", layers=2, seed=12, scale=0.3)
    return {"root": root, "model": folder, "hf": hf, "cal": write_text(root / "cal.txt", 5000, seed=1),
            "held": write_text(root / "held.txt", 5000, seed=2)}


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_analyze_a_module_equals_its_folder(tiny):
    from_disk = acttail.analyze(tiny["model"], progress=False)
    in_memory = acttail.analyze(tiny["hf"], progress=False)
    ours = acttail.analyze(acttail.load(tiny["model"]), progress=False)
    for a in (in_memory, ours):
        assert [r["key"] for r in a.projections] == [r["key"] for r in from_disk.projections]
        assert [r["alpha"] for r in a.projections] == pytest.approx([r["alpha"] for r in from_disk.projections],
                                                                    rel=1e-5)
    assert in_memory.model["fingerprint"] == ours.model["fingerprint"]  # the same weights, seen twice


def test_calibrate_a_transformers_model_equals_the_cli(tiny):
    """acttail.calibrate on the transformers model (text + its tokenizer) gives the CLI's thresholds."""
    plan = acttail.allocate(acttail.analyze(tiny["model"], progress=False), 0.5, method="uniform")
    plan.save(tiny["root"] / "plan.json")
    cli("calibrate", tiny["model"], tiny["root"] / "plan.json", "--text", tiny["cal"], "--tokens", 2048, "--ctx", 128,
        "-o", tiny["root"] / "cal.json")
    by_cli = acttail.Plan.load(tiny["root"] / "cal.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny["model"] / "tokenizer.json"))
    by_api = acttail.calibrate(tiny["hf"], plan, tiny["cal"].read_text(), fast, tokens=2048, ctx=128, progress=False)
    assert [e.threshold for e in by_api.projections] == pytest.approx([e.threshold for e in by_cli.projections],
                                                                       rel=1e-4)
    assert not plan.calibrated  # the input plan is left as it was


def test_apply_and_evaluate_equal_acttail_eval(tiny):
    """A plan applied to the stock transformers model gives `acttail eval`'s perplexity; remove() restores it."""
    cal = tiny["root"] / "cal.json"
    if not cal.is_file():
        pytest.skip("needs the calibrated plan of the previous test")
    out = tiny["root"] / "eval.json"
    cli("eval", tiny["model"], "--plan", cal, "--text", tiny["held"], "--ctx", 128, "--tokens", 1024, "-o", out)
    ref = json.loads(out.read_text())
    hf, text = tiny["hf"], tiny["held"].read_text()
    tok = load_tokenizer(tiny["model"])
    ids = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        dense_logits = hf(ids).logits
    handle = acttail.apply(hf, acttail.Plan.load(cal))
    got = acttail.evaluate(hf, text, tok, tokens=1024, ctx=128, progress=False)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-3) and got["top1_agreement"] == pytest.approx(
        ref["top1_agreement"], abs=2e-3)
    with pytest.raises(acttail.ActTailError, match="already applied"):
        acttail.apply(hf, acttail.Plan.load(cal))
    handle.remove()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, dense_logits)
    # our own decoder through the same verbs
    ours = acttail.load(tiny["model"])
    mine = acttail.evaluate(ours, text, plan=acttail.Plan.load(cal), tokens=1024, ctx=128, progress=False)
    assert mine["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)


def test_apply_to_fused_phi3_projections(tmp_path):
    """Phi-3 fuses q/k/v and gate/up in one Linear: each part still gets its own sparsified input."""
    cfg = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    plan = acttail.allocate(acttail.analyze(hf, progress=False), 0.5, method="uniform")
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        dense = hf(ids).logits
        with acttail.apply(hf, plan, mode="topk") as handle:
            sparse = hf(ids).logits
            got = handle.achieved()
    assert set(got) == {(layer, k) for layer in range(2) for k in ("q", "k", "v", "o", "gate", "up", "down")}
    assert all(v == pytest.approx(0.5, abs=0.02) for v in got.values())
    assert not torch.allclose(sparse, dense, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, dense)


def test_apply_refuses_a_plan_for_another_shape(tiny):
    plan = acttail.allocate(acttail.analyze(tiny["model"], progress=False), 0.5, method="uniform")
    other = write_hf_model(tiny["root"] / "other", "llama", layers=2, seed=1, hidden=32, inter=48)
    with pytest.raises(acttail.ActTailError, match="in the plan"):
        acttail.apply(other, plan, mode="topk")


def test_python_api_example_matches_acttail_eval(smollm2, tmp_path):
    """examples/python_api.py on SmolLM2 (transformers model + apply) gives `acttail eval`'s perplexity."""
    spec = importlib.util.spec_from_file_location("python_api", ROOT / "examples" / "python_api.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.main([str(smollm2), "--budget", "0.5", "--tokens", "1024", "--ctx", "256", "--steps", "3"])
    assert r["plan"].compensation == "learned" and len(r["plan"].tensors) == 210  # one bias per projection
    r["plan"].save(tmp_path / "plan.json")
    out = tmp_path / "eval.json"
    cli("eval", smollm2, "--plan", tmp_path / "plan.json", "--text", "wiki", "--ctx", 256, "--tokens", 1024, "-o", out)
    ref = json.loads(out.read_text())
    assert r["sparse"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    assert r["dense"]["perplexity"] < r["sparse"]["perplexity"]
