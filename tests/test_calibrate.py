"""Calibration: thresholds hit their targets in the sparse run, the histogram's quantiles, the CLI."""

from __future__ import annotations


import pytest
import torch
from click.testing import CliRunner

from acttail import allocation
from acttail.calibration import fit_thresholds
from acttail.checkpoint import Checkpoint
from acttail.cli import main
from acttail.histogram import LogHistogram
from acttail.plan import Plan
from acttail.runtime import open_model
from acttail.runtime.perplexity import perplexity
from acttail.runtime.sparsify import ProjectionSparsity, Sparsifier
from acttail.runtime.tokens import load_tokenizer, text_tokens, windows

from runtime_tiny import write_hf_model, write_text

pytest.importorskip("transformers")


def test_histogram_threshold_matches_the_exact_quantile():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 3
    h = LogHistogram()
    for chunk in x.split(30_000):
        h.add(chunk)
    for s in (0.1, 0.5, 0.9, 0.99):
        t = h.threshold(s)
        assert abs(float((x.abs() <= t).float().mean()) - s) < 1e-3
    assert h.threshold(0.0) == 0.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny 4-layer model, calibration and held-out texts, and an uncalibrated plan at budget 0.6."""
    root = tmp_path_factory.mktemp("cal")
    folder = root / "model"
    write_hf_model(folder, "llama", layers=4, seed=3, scale=0.3)
    ckpt = Checkpoint.open(folder)
    rows = [{"key": p.key, "layer": p.layer, "kind": p.kind, "in_features": p.in_features,
             "out_features": p.out_features, "params": p.params, "alpha": 2.0 + ((p.layer * 7 + i) % 5) / 2}
            for i, p in enumerate(ckpt.projections())]
    analysis = {"model": {"fingerprint": ckpt.fingerprint, "architecture": ckpt.architecture,
                          "model_type": ckpt.model_type, "num_layers": ckpt.num_layers, "path": str(folder)},
                "projections": rows}
    plan = allocation.plan_from_analysis(analysis, 0.6, method="acttail", epsilon=0.5)
    plan.save(root / "plan.json")
    return {"root": root, "model": folder, "plan": root / "plan.json", "ckpt": ckpt, "analysis": analysis,
            "cal": write_text(root / "cal.txt", 6000, seed=5), "held": write_text(root / "held.txt", 6000, seed=6)}


def calibration_inputs(setup):
    """The tiny model, its plan, 4096 calibration tokens in windows of 128, and the target per projection."""
    _, model = open_model(setup["model"])
    plan = Plan.load(setup["plan"])
    wins = windows(text_tokens(load_tokenizer(setup["model"]), setup["cal"].read_text(), 4096), 128, 256)
    return model, plan, wins, plan.sparsities()


def test_sparse_run_hits_every_target_on_the_calibration_text(setup):
    """Layer-by-layer calibration: in the full sparse run every projection is within 1% of its target."""
    model, plan, wins, targets = calibration_inputs(setup)
    found = fit_thresholds(model, wins, targets, progress=False)
    assert max(abs(r["achieved"] - targets[k]) for k, r in found.items()) < 0.01
    # the same thresholds in the ordinary sparse forward pass, measured independently
    with model.sparsified(Sparsifier({k: ProjectionSparsity(threshold=r["threshold"]) for k, r in found.items()})) as sp:
        perplexity(model, wins, progress=False)
    got = sp.achieved()
    assert max(abs(got[k] - targets[k]) for k in targets) < 0.01


def test_smaller_batches_give_the_same_thresholds(setup):
    """All windows in one pass, or a pass per group over batches of 8: the same histograms, same thresholds."""
    model, plan, wins, targets = calibration_inputs(setup)
    one = fit_thresholds(model, wins, targets, progress=False)
    batched = fit_thresholds(model, wins, targets, batch_size=8, progress=False)
    assert len(wins) > 8 and set(one) == set(batched) == set(targets)
    for k in targets:
        assert batched[k]["threshold"] == pytest.approx(one[k]["threshold"], rel=1e-3)
        assert batched[k]["achieved"] == pytest.approx(one[k]["achieved"], abs=1e-3)


def test_dense_thresholds_would_overshoot(setup):
    """What layer-by-layer calibration fixes: thresholds from dense activations miss deep in the model."""
    model, plan, wins, targets = calibration_inputs(setup)
    layered = fit_thresholds(model, wins, targets, progress=False)
    dense_t = {}
    for layer in range(4):  # each layer calibrated with every other layer dense
        one = {k: v for k, v in targets.items() if k[0] == layer}
        dense_t.update({k: r["threshold"] for k, r in fit_thresholds(model, wins, one, progress=False).items()})
    assert any(abs(dense_t[k] - layered[k]["threshold"]) > 1e-3 * layered[k]["threshold"] for k in targets if k[0] > 0)


def test_cli_calibrate_writes_thresholds_and_stats(setup, tmp_path):
    out = tmp_path / "calibrated.json"
    r = CliRunner().invoke(main, ["calibrate", str(setup["model"]), str(setup["plan"]), "--text", str(setup["cal"]),
                                  "--tokens", "2048", "--ctx", "128", "-o", str(out)])
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.calibrated
    assert plan.calibration["n_tokens"] == 2048 and plan.calibration["max_abs_deviation"] < 0.01
    for e in plan.projections:
        assert abs(e.calibration["achieved_sparsity"] - e.sparsity) < 0.01
        assert e.calibration["n_tokens"] == 2048


def test_cli_calibrate_bad_inputs(setup, tmp_path):
    run = lambda *a: CliRunner().invoke(main, ["calibrate", *map(str, a)])  # noqa: E731
    short = tmp_path / "short.txt"
    short.write_text("the cat sat.")
    out = tmp_path / "p.json"
    r = run(setup["model"], setup["plan"], "--text", short, "--ctx", "128", "-o", out)
    assert r.exit_code == 2 and "shorter than one context" in r.output and not out.exists()
    r = run(setup["model"], setup["plan"], "--text", setup["cal"], "--ctx", "1024", "-o", out)
    assert r.exit_code == 2 and "exceeds the model's maximum" in r.output
    other = tmp_path / "other"
    write_hf_model(other, "llama", layers=4, seed=9)
    r = run(other, setup["plan"], "--text", setup["cal"], "-o", out)
    assert r.exit_code == 2 and "another checkpoint" in r.output
    r = run(setup["model"], tmp_path / "missing.json", "--text", setup["cal"], "-o", out)
    assert r.exit_code == 2 and "not found" in r.output
    r = run(setup["model"], setup["plan"], "--text", tmp_path / "none.txt", "-o", out)
    assert r.exit_code == 2 and "not found" in r.output
    assert not out.exists()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"])
def test_calibration_runs_the_gemma_and_phi3_blocks(tmp_path, arch):
    """The calibration watches these blocks through the Sparsifier like any other (sliding windows, local
    rope, sandwich norms): each target is hit in the full sparse run, windows longer than the window."""
    from runtime_tiny import synthetic_analysis

    write_hf_model(tmp_path / arch, arch, seed=4, scale=0.3)
    plan = allocation.plan_from_analysis(synthetic_analysis(tmp_path / arch), 0.5, method="acttail")
    _, model = open_model(tmp_path / arch)
    wins = windows(text_tokens(load_tokenizer(tmp_path / arch), write_text(tmp_path / "c.txt", 3000).read_text(),
                               2048), 64, 256)
    found = fit_thresholds(model, wins, plan.sparsities(), batch_size=8, progress=False)
    with model.sparsified(Sparsifier({k: ProjectionSparsity(threshold=r["threshold"]) for k, r in found.items()})) as sp:
        perplexity(model, wins, progress=False)
    got = sp.achieved()
    assert len(got) == len(plan.projections) and max(abs(got[k] - s) for k, s in plan.sparsities().items()) < 0.01


def test_streamed_model_calibrates_and_evaluates_the_same(setup):
    """--stream: one block in memory at a time, read from the checkpoint; same thresholds, same perplexity."""
    from acttail.evaluation import evaluate_windows

    model, plan, wins, targets = calibration_inputs(setup)
    _, streamed = open_model(setup["model"], stream=True)
    assert all(p.is_meta for p in streamed.layers.parameters())  # nothing of the blocks loaded yet
    whole = fit_thresholds(model, wins, targets, progress=False)
    part = fit_thresholds(streamed, wins, targets, progress=False)
    assert {k: r["threshold"] for k, r in part.items()} == pytest.approx({k: r["threshold"] for k, r in whole.items()})
    resident = [i for i, b in enumerate(streamed.layers) if not any(p.is_meta for p in b.parameters())]
    assert len(resident) == 1  # at most one block's weights at a time
    cal = plan.with_thresholds({f"layers.{k[0]}.{k[1]}": r["threshold"] for k, r in whole.items()})
    a = evaluate_windows(model, wins[:8], cal, progress=False)
    b = evaluate_windows(streamed, wins[:8], cal, progress=False)
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6) and b["kl"] == pytest.approx(a["kl"], rel=1e-5)
    assert b["achieved"]["weighted_achieved"] == pytest.approx(a["achieved"]["weighted_achieved"])


def test_cli_stream_option(setup, tmp_path):
    out = tmp_path / "streamed.json"
    args = ["calibrate", str(setup["model"]), str(setup["plan"]), "--text", str(setup["cal"]), "--tokens", "1024",
            "--ctx", "128", "--stream", "-o", str(out)]
    r = CliRunner().invoke(main, args + ["--compensation", "none"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, args)  # learned compensation needs every block at once
    assert r.exit_code == 2 and "streamed model" in r.output
    r = CliRunner().invoke(main, ["eval", str(setup["model"]), "--plan", str(out), "--text", str(setup["held"]),
                                  "--ctx", "128", "--tokens", "1024", "--stream"])
    assert r.exit_code == 0 and "perplexity" in r.output, r.output


def test_alpha_split_between_sparsity_and_rank(setup):
    """--rank-split: rank max_rank (1 - t) by normalised alpha in steps of 8 (heaviest tail most), paid in
    sparsity at calibration; the split plan calibrates only with low-rank compensation."""
    from acttail.calibration import calibrate
    from acttail.errors import ActTailError

    plan = allocation.plan_from_analysis(setup["analysis"], 0.5, method="uniform", rank_split=16)
    alphas = {e.key: e.metric for e in plan.projections}
    lo, hi = min(alphas.values()), max(alphas.values())
    for e in plan.projections:
        assert e.rank % 8 == 0 and 0 <= e.rank <= 16
        assert e.rank == (16 if e.metric == lo else 0 if e.metric == hi else e.rank)
    assert {e.rank for e in plan.projections} == {0, 8, 16} and plan.method["rank_split"] == 16
    model, _, wins, _ = calibration_inputs(setup)
    with pytest.raises(ActTailError, match="--compensation lowrank"):
        calibrate(model, plan, wins[:4], progress=False, compensation="learned", steps=1)
    cal = calibrate(model, plan, wins[:8], progress=False, compensation="lowrank", rank=4)  # the plan's ranks win
    for before, e in zip(plan.projections, cal.projections):
        cost = before.rank * (e.in_features + e.out_features) / (e.in_features * e.out_features)
        assert e.rank == before.rank and e.overhead == pytest.approx(cost)
        assert e.sparsity == pytest.approx(min(0.99, before.sparsity + cost))
        u = cal.tensor(e.key, "lowrank_u")
        assert (u is None) == (e.rank == 0) and (u is None or tuple(u.shape) == (e.out_features, e.rank))
    path = setup["root"] / "split.json"
    cal.save(path)
    assert [e.rank for e in Plan.load(path).projections] == [e.rank for e in cal.projections]

