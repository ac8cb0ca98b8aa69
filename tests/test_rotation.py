"""Issue 20: rotated checkpoints (``acttail rotate``, acttail.rotation). The rotated folder computes the same
logits as the original on every pre-norm architecture; a plan for it pays each layer's basis change from its
budget (round trip, every runtime against the reference); what cannot run it refuses in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

import acttail
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.plan import Plan
from acttail.runtime.sparsify import check_plan
from runtime_tiny import write_hf_model, write_text

transformers = pytest.importorskip("transformers")  # the tiny models are written with it

ARCHS = {"llama": True, "qwen2": False, "gemma": None, "phi3": False}  # arch -> tie_word_embeddings


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation")
    write_text(root / "text.txt", 3000)
    return root


def rotated(root, arch, tie=None):
    """(original folder, rotated folder) of a tiny 3-layer ``arch``, made once per module."""
    src, out = root / arch, root / f"{arch}-rotated"
    if not out.exists():
        write_hf_model(src, arch, layers=3, tie=tie, seed=3)
        acttail.rotate(src, out, root / "text.txt", tokens=1024, ctx=64, progress=False)
    return src, out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rotated_checkpoint_computes_the_same_logits(root, arch):
    src, out = rotated(root, arch, ARCHS[arch])
    a, b = acttail.load(src), acttail.load(out)
    ids = torch.randint(0, a.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    la, lb = a(ids), b(ids)
    assert ((la - lb).norm() / la.norm()).item() < 1e-5
    assert b.args.rotated and not a.args.rotated
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "acttail_rotated" and config["tie_word_embeddings"] is False
    assert config["acttail_rotation"]["kind"] == "layer" and config["acttail_rotation"]["tokens"] == 1024
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    for i, block in enumerate(b.layers):  # each basis change is orthogonal; the folded norms scale by 1
        if i == 0:
            assert block.basis is None
            continue
        m = block.basis.weight
        assert torch.allclose(m @ m.T, torch.eye(m.shape[0]), atol=1e-5)
        assert torch.allclose(block.attention_norm.weight + block.attention_norm.offset, torch.ones(m.shape[0]))
    assert not torch.allclose(a.layers[1].attention.wqkv.weight, b.layers[1].attention.wqkv.weight)


def test_the_rotation_concentrates_the_inputs_variance(root):
    """The PCA basis puts the variance of each layer's normalised input in its first coordinates: the first
    eighth of the rotated coordinates holds much more than an eighth of it."""
    from acttail.rotation import fit_rotations

    src, _ = rotated(root, "llama", True)
    model = acttail.load(src)
    wins = torch.randint(0, model.args.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    rotations = fit_rotations(model, wins, progress=False)
    h = model.hidden(wins, layers=range(1))
    u = h / h.pow(2).mean(-1, keepdim=True).sqrt()
    var = (u.reshape(-1, u.shape[-1]) @ rotations[1]).pow(2).mean(0)
    assert var[: len(var) // 8].sum() > 0.3 * var.sum()
    assert torch.allclose(rotations[1].T @ rotations[1], torch.eye(len(var)), atol=1e-5)


def test_transformers_refuses_the_rotated_folder(root):
    """Rather than loading it without its basis changes (garbage logits), transformers stops."""
    _, out = rotated(root, "llama", True)
    with pytest.raises(ValueError, match="acttail_rotated"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("compensation", ["none", "learned"])
def test_a_plan_for_a_rotated_checkpoint_pays_its_basis_changes(root, compensation):
    """At budget 0.5 every projection of a layer > 0 runs d^2 / (layer's projection weights) sparser, so the
    plan saves 0.5 of the bytes with the basis changes paid; it round-trips, and the reference runs it at the
    calibrated sparsity."""
    _, out = rotated(root, "llama", True)
    plan = acttail.allocate(acttail.analyze(out, progress=False), 0.5, method="uniform")
    assert plan.model["rotation"] == "layer"
    text = root / "text.txt"
    plan = acttail.calibrate(out, plan, text, tokens=1024, ctx=64, compensation=compensation, steps=2,
                             out=root / f"plan-{compensation}.json", progress=False)
    loaded = Plan.load(root / f"plan-{compensation}.json")
    assert loaded == plan
    model = acttail.load(out)
    d = model.args.dim
    per_layer = sum(e.params for e in plan.projections if e.layer == 1)
    for e in plan.projections:
        comp = 1.0 / e.in_features if compensation == "learned" else 0.0
        turn = d * d / per_layer if e.layer > 0 else 0.0
        assert e.overhead == pytest.approx(comp + turn) and e.sparsity == pytest.approx(0.5 + comp + turn)
    assert plan.weighted_saving == pytest.approx(0.5)
    doc = plan.to_dict()
    doc["projections"][7]["overhead"] = 0.0  # layer 1 not paying for its basis change
    with pytest.raises(ActTailError, match="basis change"):
        Plan.from_dict(doc)
    r = acttail.evaluate(out, text, plan=root / f"plan-{compensation}.json", tokens=512, ctx=64, progress=False)
    assert r["achieved"]["weighted_achieved"] == pytest.approx(plan.weighted_sparsity, abs=0.05)


def test_a_plan_runs_only_in_its_own_basis(root):
    src, out = rotated(root, "llama", True)
    plan = acttail.allocate(acttail.analyze(out, progress=False), 0.5, method="uniform")
    with pytest.raises(ActTailError, match="rotated checkpoint"):
        check_plan(plan, acttail.load(src).args)
    with pytest.raises(ActTailError, match="rotated checkpoint"):
        acttail.export_plan(plan, "teal", root / "teal")
    assert not (root / "teal").exists()
    other = acttail.allocate(acttail.analyze(src, progress=False), 0.5, method="uniform")
    with pytest.raises(ActTailError, match="unrotated checkpoint"):
        check_plan(other, acttail.load(out).args)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(r, *words):
    lines = [ln for ln in r.output.strip().splitlines() if not re.search(r": +\d+%\|", ln)]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("acttail: error:"), r.output
    assert all(w in lines[0] for w in words), (words, lines[0])


def test_rotate_command_and_its_refusals(root):
    src, _ = rotated(root, "llama", True)
    r = run("rotate", src, "-o", root / "cli-rotated", "--text", root / "text.txt", "--tokens", 256, "--ctx", 64)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and acttail.load(root / "cli-rotated").args.rotated
    one_error(run("rotate", src, "-o", root / "cli-rotated", "--text", root / "text.txt"), "not empty")
    one_error(run("rotate", src, "-o", src, "--text", root / "text.txt"))
    one_error(run("rotate", root / "cli-rotated", "-o", root / "twice", "--text", root / "text.txt"),
              "already rotated")
    write_hf_model(root / "gemma2", "gemma2", layers=2)
    one_error(run("rotate", root / "gemma2", "-o", root / "g2", "--text", root / "text.txt"), "Gemma 2/3")
    for bad in ("gemma2", "twice", "g2"):
        assert not (root / bad).exists() or bad == "gemma2"
