"""Sensitivity probe and the acttail-sens allocation (alpha map, direction and gate from sensitivity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from acttail import allocation as allocate
from acttail.checkpoint import Checkpoint
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.runtime import open_model
from acttail.runtime.perplexity import perplexity
from acttail.runtime.tokens import load_tokenizer, text_tokens, windows
from acttail.sensitivity import sensitivity, with_sensitivity

from runtime_tiny import write_hf_model, write_text


def rows(alpha, sens):
    kinds = ("q", "k", "v", "o", "gate", "up", "down")
    return [{"key": f"layers.{i // 7}.{kinds[i % 7]}", "layer": i // 7, "kind": kinds[i % 7], "params": 1000 + i,
             "alpha": float(a), "sensitivity": float(s)} for i, (a, s) in enumerate(zip(alpha, sens))]


def test_direction_follows_the_measured_correlation():
    rng = np.random.default_rng(0)
    alpha = rng.uniform(2, 8, 70)
    up = rows(alpha, alpha + rng.normal(0, 0.1, 70))  # sensitivity rises with alpha
    down = rows(alpha, -alpha + 20 + rng.normal(0, 0.1, 70))
    dec = allocate.sparsities(up, 0.5, method="alpha-map", direction="decreasing")
    inc = allocate.sparsities(up, 0.5, method="alpha-map", direction="increasing")
    assert allocate.sparsities(up, 0.5, method="acttail-sens") == dec
    assert allocate.sparsities(down, 0.5, method="acttail-sens") == inc
    assert allocate.sparsities(up, 0.5, method="acttail-sens", direction="decreasing") == inc  # the ablation flips


def test_no_signal_means_uniform():
    alpha = np.arange(70, dtype=float)
    noise = np.random.default_rng(1).permutation(70).astype(float)
    r = rows(alpha, noise)
    assert abs(allocate.spearman(alpha, noise)) <= 2 / np.sqrt(70)
    assert allocate.sparsities(r, 0.5, method="acttail-sens") == pytest.approx([0.5] * 70, abs=1e-12)


def test_missing_sensitivity_is_a_clear_error():
    r = rows(np.arange(14.0), np.arange(14.0))
    del r[3]["sensitivity"]
    with pytest.raises(ActTailError, match="sensitivity"):
        allocate.sparsities(r, 0.5, method="acttail-sens")


def test_probe_measures_one_projection_at_a_time(tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "m"
    write_hf_model(folder, "llama", layers=2, seed=5, scale=0.3)
    text = write_text(tmp_path / "c.txt", 3000, seed=2)
    _, model = open_model(folder)
    wins = windows(text_tokens(load_tokenizer(folder), text.read_text(), 512), 128, 256)
    r = sensitivity(model, wins, [(0, "down"), (1, "q")], levels=(0.5, 0.9), progress=False)
    assert r["dense_nll"] == pytest.approx(perplexity(model, wins, progress=False)["nll"])
    assert set(r["dnll"]) == {(0, "down"), (1, "q")} and all(v != 0 for d in r["dnll"].values() for v in d.values())
    ckpt = Checkpoint.open(folder)
    analysis = {"model": {"fingerprint": ckpt.fingerprint}, "projections": [
        {"key": p.key, "layer": p.layer, "kind": p.kind, "params": p.params} for p in ckpt.projections()]}
    sens = {"model": {"fingerprint": "sha256:other"}, "projections": []}
    with pytest.raises(ActTailError, match="different checkpoints"):
        with_sensitivity(analysis, sens)


def test_cli_sensitivity_then_allocate(tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "m"
    write_hf_model(folder, "llama", layers=2, seed=6, scale=0.3)
    text = write_text(tmp_path / "c.txt", 3000, seed=3)
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    r = run("analyze", folder, "-o", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    r = run("sensitivity", folder, tmp_path / "a.json", "--text", text, "--tokens", "512", "--ctx", "128",
            "-o", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert all(row["sensitivity"] > 0 and "dnll_80" in row for row in doc["projections"])
    r = run("allocate", tmp_path / "s.json", "--budget", "0.5", "--method", "acttail-sens", "-o", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["method"]["name"] == "acttail-sens"
