"""TEAL's greedy allocation: the paths it measures, and `acttail allocate --method greedy` from them."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from click.testing import CliRunner

from acttail.allocation import plan_from_analysis
from acttail.analysis import Analysis
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.greedy import greedy_paths, load_paths
from acttail.layout import KINDS
from acttail.runtime import open_model
from acttail.runtime.tokens import load_tokenizer, text_tokens, windows

from runtime_tiny import synthetic_analysis, write_hf_model, write_text

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("greedy")
    folder = root / "model"
    hf = write_hf_model(folder, "llama", layers=2, seed=21, scale=0.3)
    with torch.no_grad():  # layer 0's attention adds nothing: sparsifying q/k/v/o there costs no error
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
    hf.save_pretrained(folder, safe_serialization=True)
    return {"root": root, "model": folder, "text": write_text(root / "cal.txt", 4000, seed=3)}


def test_paths_step_by_equal_parameters_and_take_the_cheapest_first(tiny):
    _, model = open_model(tiny["model"])
    wins = windows(text_tokens(load_tokenizer(tiny["model"]), tiny["text"].read_text(), 1024), 64, 256)
    paths = greedy_paths(model, wins, base_step=0.1, max_sparsity=0.6, progress=False)
    assert len(paths) == 2
    params = {k: model.args.in_features(k) * model.args.out_features(k) for k in KINDS}
    for path in paths:
        eff = [s["effective"] for s in path]
        assert eff == sorted(eff) and eff[-1] >= 0.6 and eff[-2] < 0.6
        steps = [eff[0]] + [b - a for a, b in zip(eff, eff[1:])]
        assert max(steps) - min(steps) < 1e-9  # each step skips the same number of parameters
        for s in path:
            got = sum(s["sparsity"][k] * params[k] for k in KINDS) / sum(params.values())
            assert got == pytest.approx(s["effective"])
    attention, mlp = ("q", "k", "v", "o"), ("gate", "up", "down")
    first_mlp = next(s for s in paths[0] if any(s["sparsity"][k] > 0 for k in mlp))
    assert all(s["error"] == pytest.approx(0.0, abs=1e-6) for s in paths[0][:paths[0].index(first_mlp)])
    step = {k: 0.1 * params["q"] / params[k] for k in KINDS}
    assert all(first_mlp["sparsity"][k] + step[k] > 0.999 for k in attention)  # the free ones went first, to the cap
    assert paths[0].index(first_mlp) > 4 and first_mlp["error"] > 0


def test_cli_greedy_then_allocate(tiny):
    root = tiny["root"]
    Analysis.from_dict(synthetic_analysis(tiny["model"])).save(root / "analysis.json")
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    r = run("greedy", tiny["model"], root / "analysis.json", "--text", tiny["text"], "--tokens", 512, "--ctx", 64,
            "--base-step", 0.1, "-o", root / "analysis-greedy.json")
    assert r.exit_code == 0, r.output
    r = run("allocate", root / "analysis-greedy.json", "--method", "greedy", "--budget", 0.4, "-o", root / "plan.json")
    assert r.exit_code == 0, r.output
    plan = json.loads((root / "plan.json").read_text())
    assert plan["method"]["name"] == "greedy" and plan["source"]["greedy"]["base_step"] == 0.1
    s = {e["key"]: e["sparsity"] for e in plan["projections"]}
    assert min(s[f"layers.0.{k}"] for k in "qkvo") > max(s[f"layers.0.{k}"] for k in ("gate", "up", "down"))
    r = run("allocate", root / "analysis.json", "--budget", 0.4, "-o", root / "p2.json")  # greedy is the default
    assert r.exit_code == 0 and "no greedy paths" in r.stderr and "allocating uniformly" in r.stderr
    assert json.loads((root / "p2.json").read_text())["method"]["name"] == "uniform"
    # the committed-measurement path: --measured reuses paths, checked against the analysed weights
    (root / "paths.json").write_text(json.dumps(json.loads((root / "analysis-greedy.json").read_text())["greedy"]))
    r = run("greedy", tiny["model"], root / "analysis.json", "--measured", root / "paths.json", "-o", root / "a3.json")
    assert r.exit_code == 0, r.output
    assert json.loads((root / "a3.json").read_text())["greedy"]["layers"] == \
        json.loads((root / "analysis-greedy.json").read_text())["greedy"]["layers"]
    bad = json.loads((root / "paths.json").read_text())
    bad["fingerprint"] = "sha256:other"
    (root / "bad.json").write_text(json.dumps(bad))
    r = run("greedy", tiny["model"], root / "analysis.json", "--measured", root / "bad.json", "-o", root / "a4.json")
    assert r.exit_code == 2 and "other weights" in r.output and not (root / "a4.json").exists()


def test_a_broken_greedy_file_is_refused_with_one_line(tiny):
    """The paths are checked against schemas/greedy.schema.json: one error line naming the field, no output."""
    root = tiny["root"]
    Analysis.from_dict(synthetic_analysis(tiny["model"])).save(root / "analysis.json")
    fingerprint = json.loads((root / "analysis.json").read_text())["model"]["fingerprint"]
    step = {"effective": 0.1, "error": 0.01, "sparsity": {k: 0.1 for k in KINDS}}
    good = {"fingerprint": fingerprint, "text": "c4", "tokens": 64, "ctx": 32, "base_step": 0.1, "max_sparsity": 0.6,
            "last_fraction": 0.25, "layers": [[step], [step]]}
    run = lambda p: CliRunner().invoke(main, ["greedy", str(tiny["model"]), str(root / "analysis.json"),  # noqa: E731
                                              "--measured", str(p), "-o", str(root / "out.json")])
    (root / "good.json.gz").write_bytes(gzip.compress(json.dumps(good).encode()))  # gzipped files are read too
    assert run(root / "good.json.gz").exit_code == 0 and (root / "out.json").is_file()
    (root / "out.json").unlink()
    for field, bad in [("$.layers[1][0].sparsity.up", dict(good, layers=[[step], [dict(step, sparsity=dict(
                            step["sparsity"], up=1.5))]])),
                       ("$.layers[0][0]", dict(good, layers=[[{"effective": 0.1}], [step]])),
                       ("$.layers[0]", dict(good, layers=[[], [step]])),
                       ("$", {k: v for k, v in good.items() if k != "base_step"})]:
        (root / "bad.json").write_text(json.dumps(bad))
        r = run(root / "bad.json")
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert r.output.startswith(f"acttail: error: greedy paths {root / 'bad.json'}: field {field}"), r.output
        assert not (root / "out.json").exists()
    doc = synthetic_analysis(tiny["model"])  # the analysis' greedy section follows the same schema
    doc["greedy"] = dict(good, layers=[[dict(step, effective=2.0)], [step]])
    with pytest.raises(ActTailError, match=r"field \$\.greedy\.layers\[0\]\[0\]\.effective"):
        Analysis.from_dict(doc).save(root / "a.json")


def test_shipped_paths_are_found_by_name():
    """`--measured smollm2-135m` reads the paths shipped in acttail/data (make demo's); other names are refused."""
    model = {"fingerprint": "sha256:174abc8c45a690368291195c60980534", "num_layers": 30}
    doc = load_paths("smollm2-135m", model)
    assert doc["tokens"] == 8192 and doc["base_step"] == 0.025 and len(doc["layers"]) == 30
    assert all(p[-1]["effective"] >= 0.9 for p in doc["layers"])  # every block's path reaches max_sparsity
    with pytest.raises(ActTailError, match="measured on other weights"):
        load_paths("smollm2-135m", dict(model, fingerprint="sha256:other"))
    with pytest.raises(ActTailError, match=r"greedy paths not found: qwen9 \(.*shipped with acttail: smollm2-135m\)"):
        load_paths("qwen9", model)


def test_greedy_budget_is_met_exactly():
    rows = [{"key": f"layers.{i}.{k}", "layer": i, "kind": k, "params": 100 * (1 + j), "in_features": 10,
             "out_features": 10 * (1 + j), "alpha": 3.0} for i in range(2) for j, k in enumerate(KINDS)]
    path = [{"effective": e, "error": 0.0, "sparsity": {k: min(0.95, e * (1 + j / 7)) for j, k in enumerate(KINDS)}}
            for e in (0.2, 0.4, 0.6)]
    doc = {"model": {"fingerprint": "fp", "architecture": "LlamaForCausalLM", "model_type": "llama",
                     "num_layers": 2, "path": None}, "projections": rows,
           "greedy": {"layers": [path, path], "text": "c4", "tokens": 1, "base_step": 0.1, "max_sparsity": 0.6,
                      "last_fraction": 0.25}}
    plan = plan_from_analysis(doc, 0.45, method="greedy")
    assert plan.weighted_sparsity == pytest.approx(0.45, abs=1e-9)
