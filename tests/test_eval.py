"""`acttail eval` and `acttail generate`: perplexity JSON, achieved sparsity, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

from acttail import allocation
from acttail.plan import Plan
from acttail.checkpoint import Checkpoint
from acttail.cli import main
from acttail.runtime import open_model
from acttail.runtime.perplexity import perplexity
from acttail.runtime.tokens import load_tokenizer, text_tokens, windows

from runtime_tiny import synthetic_analysis, write_hf_model, write_text

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = root / "model"
    hf = write_hf_model(folder, "qwen2", layers=2, seed=4, tie=False, scale=0.3)
    allocation.plan_from_analysis(synthetic_analysis(folder), 0.5, method="acttail").save(root / "plan.json")
    cal, held = write_text(root / "cal.txt", 5000, seed=7), write_text(root / "held.txt", 5000, seed=8)
    r = CliRunner().invoke(main, ["calibrate", str(folder), str(root / "plan.json"), "--text", str(cal),
                                  "--tokens", "2048", "--ctx", "128", "-o", str(root / "calibrated.json")])
    assert r.exit_code == 0, r.output
    return {"root": root, "model": folder, "hf": hf, "plan": root / "plan.json",
            "calibrated": root / "calibrated.json", "cal": cal, "held": held}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_dense_perplexity_matches_transformers(setup):
    """Our windowed perplexity equals exp(mean CE) of HF logits on the same windows."""
    tok = load_tokenizer(setup["model"])
    wins = windows(text_tokens(tok, setup["held"].read_text(), 1024), 128, 256)
    _, model = open_model(setup["model"])
    ours = perplexity(model, wins, batch_size=3, progress=False)
    with torch.no_grad():
        logits = setup["hf"](wins).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), wins[:, 1:].flatten())
    assert ours["predictions"] == 8 * 127
    assert ours["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_eval_cli_dense_and_sparse_json(setup, tmp_path):
    dense_out, sparse_out = tmp_path / "dense.json", tmp_path / "sparse.json"
    r = run("eval", setup["model"], "--text", setup["held"], "--ctx", "128", "--tokens", "1024", "-o", dense_out)
    assert r.exit_code == 0, r.output and "perplexity" in r.output
    r = run("eval", setup["model"], "--plan", setup["calibrated"], "--text", setup["held"], "--ctx", "128",
            "--tokens", "1024", "-o", sparse_out)
    assert r.exit_code == 0, r.output
    d, s = json.loads(dense_out.read_text()), json.loads(sparse_out.read_text())
    assert d["plan"] is None and d["settings"]["mode"] == "dense" and d["settings"]["tokens"] == 1024
    assert s["model"]["fingerprint"] == d["model"]["fingerprint"] == Checkpoint.open(setup["model"]).fingerprint
    assert s["plan"]["budget"] == 0.5 and s["settings"]["mode"] == "threshold"
    rows = s["achieved"]["projections"]
    assert len(rows) == 14 and all(0.0 <= row["achieved"] <= 1.0 for row in rows)
    # held-out text: the thresholds drift, but stay near their targets on this homogeneous text
    assert abs(s["achieved"]["weighted_achieved"] - 0.5) < 0.05
    assert s["perplexity"] != d["perplexity"]
    # against the dense run: a positive KL and a top-1 agreement below 1 (the plan changes predictions)
    assert d["kl"] is None and s["kl"] > 0 and 0.0 < s["top1_agreement"] < 1.0


def test_eval_topk_mode_needs_no_thresholds_and_hits_targets(setup, tmp_path):
    out = tmp_path / "topk.json"
    r = run("eval", setup["model"], "--plan", setup["plan"], "--mode", "topk", "--text", setup["held"],
            "--ctx", "128", "--tokens", "512", "-o", out)
    assert r.exit_code == 0, r.output
    a = json.loads(out.read_text())["achieved"]
    assert a["max_abs_deviation"] < 0.02  # exact per token up to rounding (1 / 64)


def test_prefill_half_keeps_the_first_half_dense(setup, tmp_path):
    """Causal attention: with the first half dense, its logits are the dense ones; the rest differ."""
    from acttail.runtime import plan_sparsifier

    _, model = open_model(setup["model"])
    wins = windows(text_tokens(load_tokenizer(setup["model"]), setup["held"].read_text(), 256), 128, 256)
    dense = model(wins)
    with model.sparsified(plan_sparsifier(Plan.load(setup["calibrated"]), "threshold", dense_before=64)):
        half = model(wins)
    assert torch.allclose(half[:, :64], dense[:, :64], atol=1e-5)
    assert not torch.allclose(half[:, 64:], dense[:, 64:], atol=1e-3)
    out = tmp_path / "half.json"
    r = run("eval", setup["model"], "--plan", setup["calibrated"], "--prefill", "half", "--text", setup["held"],
            "--ctx", "128", "--tokens", "512", "-o", out)
    assert r.exit_code == 0 and json.loads(out.read_text())["settings"]["prefill"] == "half"


def test_eval_bad_inputs(setup, tmp_path):
    out = tmp_path / "r.json"
    r = run("eval", setup["model"], "--plan", setup["plan"], "--text", setup["held"], "--ctx", "128", "-o", out)
    assert r.exit_code == 2 and "no thresholds" in r.output and "Traceback" not in r.output
    r = run("eval", setup["model"], "--text", setup["held"], "--device", "gpu0", "-o", out)
    assert r.exit_code == 2 and "unknown device" in r.output
    r = run("eval", setup["model"], "--text", setup["held"], "--ctx", "100000", "-o", out)
    assert r.exit_code == 2 and "exceeds the model's maximum" in r.output
    short = tmp_path / "short.txt"
    short.write_text("a cat.")
    r = run("eval", setup["model"], "--text", short, "--ctx", "128", "-o", out)
    assert r.exit_code == 2 and "shorter than one context" in r.output
    other = tmp_path / "other"
    write_hf_model(other, "qwen2", layers=2, seed=11, tie=False)
    r = run("eval", other, "--plan", setup["calibrated"], "--text", setup["held"], "--ctx", "128", "-o", out)
    assert r.exit_code == 2 and "another checkpoint" in r.output
    assert not out.exists()


def test_nan_logits_are_an_error(setup, tmp_path):
    """A broken checkpoint (NaN weights) gives one clear error, not a NaN perplexity."""
    bad = tmp_path / "nan"
    hf = write_hf_model(bad, "qwen2", layers=2, seed=4, tie=False)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    hf.save_pretrained(bad, safe_serialization=True)
    r = run("eval", bad, "--text", setup["held"], "--ctx", "128", "--tokens", "512")
    assert r.exit_code == 2 and "NaN" in r.output


def test_generate_cli(setup):
    r = run("generate", setup["model"], "--prompt", "the cat sat on", "--max-new-tokens", "8")
    assert r.exit_code == 0 and r.output.strip()
    a = run("generate", setup["model"], "--plan", setup["calibrated"], "--prompt", "the cat", "--max-new-tokens", "6",
            "--temperature", "0.8", "--seed", "3")
    b = run("generate", setup["model"], "--plan", setup["calibrated"], "--prompt", "the cat", "--max-new-tokens", "6",
            "--temperature", "0.8", "--seed", "3")
    assert a.exit_code == 0 and a.stdout == b.stdout  # seeded sampling is reproducible
    assert "tok/s" in a.stderr and "reference backend on cpu" in a.stderr
    r = run("generate", setup["model"], "--plan", setup["plan"], "--prompt", "the cat")
    assert r.exit_code == 2 and "no thresholds" in r.output


def test_generate_kernel_backend(setup):
    """The Triton decode path behind `acttail generate` (under the interpreter here; --device cuda on a GPU)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    args = ["generate", setup["model"], "--plan", setup["calibrated"], "--prompt", "the cat sat on"]
    r = run(*args, "--max-new-tokens", "5", "--backend", "kernels")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "kernel backend on cpu (float16" in r.stderr and "tokens decoded" in r.stderr
    assert "/8 projection groups sparse" in r.stderr  # 2 layers x (qkv, o, gate/up, down)
    r = run(*args, "--backend", "kernels", "--temperature", "0.7")
    assert r.exit_code == 2 and "greedily" in r.output
    r = run(*args, "--backend", "kernels", "--prefill", "half")
    assert r.exit_code == 2 and "prefills the prompt densely" in r.output
    r = run(*args, "--backend", "kernels", "--max-new-tokens", "100000")
    assert r.exit_code == 2 and "exceed" in r.output
    r = run(*args, "--max-new-tokens", "3", "--backend", "kernels", "--weights", "int4")
    assert r.exit_code == 0 and "float16, int4 weights, 8/8 projection groups" in r.stderr, r.output
    r = run(*args, "--backend", "reference", "--weights", "int8")
    assert r.exit_code == 2 and "kernel backend" in r.output and "Traceback" not in r.output


def test_generate_bad_device_is_one_line(setup):
    for device, message in (("cuda:x", "unknown device"), ("mps", "unknown device")) + \
            ((("cuda", "no CUDA GPU"),) if not torch.cuda.is_available() else ()):
        r = run("generate", setup["model"], "--prompt", "the cat", "--device", device)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (device, r.output)
