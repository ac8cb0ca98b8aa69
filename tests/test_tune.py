"""acttail tune: the largest budget within a perplexity bound of dense on held-out text, by bisection."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import acttail
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.evaluation import evaluate_windows
from acttail.plan import Plan
from acttail.runtime.tokens import load_tokenizer, text_tokens, windows
from acttail.tuning import tune

from runtime_tiny import write_hf_model, write_text

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    folder = root / "model"
    write_hf_model(folder, "llama", layers=2, seed=3, scale=0.3)
    analysis = acttail.analyze(folder, progress=False)
    analysis.save(root / "analysis.json")
    text = write_text(root / "cal.txt", 3000, seed=5)
    model = acttail.load(folder)
    ids = text_tokens(load_tokenizer(folder), text.read_text(), 1536)
    return {"root": root, "model": folder, "analysis": analysis, "text": text, "net": model,
            "cal": windows(ids[:1024], 128, 256), "held": windows(ids[1024:], 128, 256)}


def test_bisection_returns_the_largest_budget_within_the_bound(setup):
    net, cal, held = setup["net"], setup["cal"], setup["held"]
    plan = tune(net, setup["analysis"], cal, held, within=0.05, method="uniform", tolerance=0.05, progress=False,
                compensation="none")
    rec = plan.calibration["tune"]
    dense = evaluate_windows(net, held, progress=False)["perplexity"]
    assert rec["dense_perplexity"] == pytest.approx(dense) and rec["limit"] == pytest.approx(1.05 * dense)
    ok = [p["budget"] for p in rec["probes"] if p["within"]]
    assert plan.budget == max(ok) and 0.05 <= plan.budget < 0.9
    assert all(p["budget"] > plan.budget for p in rec["probes"] if not p["within"])
    assert any(not p["within"] for p in rec["probes"])  # the bound bit: the search could have gone wrong
    # measured again, independently: the plan holds the bound on the held-out windows
    assert evaluate_windows(net, held, plan, progress=False, compare=False)["perplexity"] <= rec["limit"]
    assert plan.calibration["text"] == "tokens" and plan.calibration["n_tokens"] == cal.numel()


def test_a_bound_nothing_meets_is_an_error(setup):
    with pytest.raises(ActTailError, match="nothing to tune"):
        tune(setup["net"], setup["analysis"], setup["cal"], setup["held"], within=0.001, lo=0.8, hi=0.9,
             method="uniform", tolerance=0.2, progress=False, compensation="none")
    with pytest.raises(ActTailError, match="within > 0"):
        tune(setup["net"], setup["analysis"], setup["cal"], setup["held"], within=0.0)


def test_api_and_cli(setup, tmp_path):
    plan = acttail.tune(setup["net"], setup["analysis"], setup["text"].read_text(), within=0.2, tokens=1024,
                        held_tokens=512, ctx=128, tolerance=0.1, progress=False, compensation="none")
    assert plan.calibration["tune"]["held_tokens"] == 512 and plan.method["name"] == "uniform"  # no greedy paths
    out = tmp_path / "plan.json"
    args = ["tune", str(setup["model"]), str(setup["root"] / "analysis.json"), "--text", str(setup["text"]),
            "--within", "0.2", "--tokens", "1024", "--held-tokens", "512", "--ctx", "128", "--tolerance", "0.1",
            "--compensation", "none", "-o", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "largest budget within +20.0% of dense" in r.output
    saved = Plan.load(out)
    assert saved.budget == pytest.approx(plan.budget) and saved.calibration["tune"]["within"] == 0.2
    bad = CliRunner().invoke(main, args[:5] + ["--tokens", "100000"] + args[9:])
    assert bad.exit_code != 0 and "fewer than" in bad.output and "Traceback" not in bad.output
