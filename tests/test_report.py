"""acttail report: inputs are cross-checked, figures are drawn, the page is self-contained and atomic."""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_tiny_model

from acttail.checkpoint import Checkpoint
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.esd import analyze_matrix
from acttail.plan import Plan, PlanEntry
from acttail.report import build_report, eval_labels, figures as F
from acttail.report.html import png_size

KINDS = ("q", "k", "v", "o", "gate", "up", "down")


# ---- synthetic inputs (real formats: plans go through acttail.plan's schema) ---------------------------

def make_analysis(model_dir: Path | None, layers: int = 3, seed: int = 0, fingerprint: str | None = None) -> dict:
    """An analysis in the documented format. With a model folder, rows come from the real checkpoint
    through acttail.esd.analyze_matrix; without one, shapes and alphas are made up."""
    rows = []
    if model_dir is not None:
        ckpt = Checkpoint.open(model_dir)
        fingerprint = ckpt.fingerprint
        for p in ckpt.projections():
            row = {"key": p.key, "layer": p.layer, "kind": p.kind, "out_features": p.out_features,
                   "in_features": p.in_features, "params": p.params}
            rows.append(row | analyze_matrix(ckpt.load(p), fit="ks", dtype=torch.float64))
    else:
        rng = random.Random(seed)
        for layer in range(layers):
            for kind in KINDS:
                alpha = rng.uniform(1.5, 8.0) if rng.random() > 0.05 else None
                warnings = ([] if alpha is not None and 2 <= alpha <= 6 else
                            ["fit failed: synthetic"] if alpha is None else [f"alpha {alpha:.2f} outside 2-6"])
                rows.append({"key": f"layers.{layer}.{kind}", "layer": layer, "kind": kind, "out_features": 64,
                             "in_features": 64, "params": 4096, "n_evals": 64, "alpha": alpha,
                             "xmin": 1.0 if alpha else None, "n_tail": 10 if alpha else None,
                             "ks_distance": 0.05 if alpha else None, "sigma": None, "lambda_max": 3.0,
                             "spectral_norm": 1.7, "stable_rank": 5.0, "alpha_weighted": None, "log_norm": 0.5,
                             "warnings": warnings})
    n = max(r["layer"] for r in rows) + 1
    return {"format": "acttail-analysis", "version": 1, "tool_version": "0.1.0", "created": "2026-11-23T07:00:00Z",
            "model": {"path": str(model_dir) if model_dir else None, "fingerprint": fingerprint or "sha256:synthetic",
                      "architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": n},
            "settings": {"fit": "ks", "dtype": "float64", "device": "cpu", "eval_floor": 1e-5, "backend": "acttail"},
            "projections": rows, "summary": {"n_projections": len(rows)}}


def make_plan(analysis: dict, budget: float, name: str = "acttail", calibrated: bool = False) -> Plan:
    """A schema-valid plan: sparsity rises with alpha around the budget; calibrated plans get thresholds."""
    entries = []
    for r in analysis["projections"]:
        a = r["alpha"]
        s = min(0.95, max(0.0, budget + ((a if a is not None else 4.5) - 4.5) * 0.04))
        entries.append(PlanEntry(layer=r["layer"], kind=r["kind"], in_features=r["in_features"],
                                 out_features=r["out_features"], sparsity=s, metric=a))
    plan = Plan(model=dict(analysis["model"]), budget=budget, method={"name": name, "metric": "alpha"},
                projections=entries)
    if calibrated:
        plan = plan.with_thresholds({e.key: 0.01 * (1 + e.layer) for e in entries},
                                    {e.key: {"achieved_sparsity": max(0.0, e.sparsity - 0.01)} for e in entries},
                                    {"text": "c4", "tokens": 2048})
    return plan


def make_eval(fingerprint: str, perplexity: float, budget: float | None = None, method: str = "acttail") -> dict:
    """An eval result shaped like ``acttail eval -o`` (acttail.runtime.perplexity.evaluate)."""
    plan = None if budget is None else {"path": f"/elsewhere/plan-{budget}.json", "budget": budget,
                                        "method": {"name": method, "metric": "alpha"}, "weighted_sparsity": budget,
                                        "calibration": {"text": "c4"}}
    return {"format": "acttail-eval", "version": 1, "tool_version": "0.1.0", "created": "2026-11-23T08:00:00+00:00",
            "model": {"path": "model", "fingerprint": fingerprint, "architecture": "LlamaForCausalLM"},
            "settings": {"text": "wiki", "ctx": 256, "tokens": 4096, "windows": 16,
                         "mode": "threshold" if plan else "dense", "prefill": "all" if plan else None},
            "perplexity": perplexity, "nll": float(np.log(perplexity)), "predictions": 4080, "plan": plan,
            "achieved": None if plan is None else {"weighted_achieved": budget - 0.01, "weighted_target": budget}}


def write_inputs(folder: Path, analysis: dict, evals: bool = True) -> dict:
    """Write analysis, two plans (50% plain, 80% calibrated) and eval results; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"analysis": folder / "analysis.json", "plans": [folder / "plan-50.json", folder / "plan-80.json"],
             "evals": []}
    paths["analysis"].write_text(json.dumps(analysis))
    make_plan(analysis, 0.5).save(paths["plans"][0])
    make_plan(analysis, 0.8, calibrated=True).save(paths["plans"][1])
    if evals:
        fp = analysis["model"]["fingerprint"]
        runs = [(None, "dense", 12.0), (0.5, "uniform", 15.0), (0.5, "acttail", 14.0), (0.8, "uniform", 60.0),
                (0.8, "acttail", 40.0)]
        (folder / "runs").mkdir()
        for budget, method, ppl in runs:
            p = folder / "runs" / f"eval-{method}-{budget}.json"
            p.write_text(json.dumps(make_eval(fp, ppl, budget, method)))
            paths["evals"].append(p)
    return paths


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return write_tiny_model(tmp_path / "model", layers=3, hidden=64, inter=96)


@pytest.fixture
def inputs(tmp_path, model_dir) -> dict:
    return write_inputs(tmp_path / "in", make_analysis(model_dir))


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)]


def table_rows(html: str) -> int:
    body = html.split('id="projections"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return body.count("<tr")


# ---- the page ----------------------------------------------------------------------------------------

def test_full_report_is_self_contained(inputs, tmp_path):
    out = tmp_path / "report"
    index = build_report(inputs["analysis"], inputs["plans"], inputs["evals"], out)
    assert index == out / "index.html"
    html = index.read_text()
    # nothing to fetch: every src/href is inline data or an in-page anchor
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html)
    assert "<link" not in html and "@import" not in html
    assert html.count("<script") == 1 and "sortable" in html.split("<script>")[1]  # JS only sorts the table
    pngs = images(html)
    names = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert len(pngs) == len(names)
    assert {"esd_grid", "alpha_heatmap", "sparsity_heatmap_0", "sparsity_heatmap_1", "kind_bars",
            "alpha_vs_sparsity", "calibration_1", "perplexity_vs_budget"} <= set(names)
    assert not any(n.startswith("calibration_0") for n in names)  # the 50% plan is not calibrated
    assert sum(n.startswith("esd_layers_") for n in names) == 1
    for png in pngs:
        w, h = png_size(png)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and w > 200 and h > 100
    for n in names:
        assert (out / "figures" / f"{n}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert table_rows(html) == 21
    assert "plan-80" in html and "achieved plan-80" in html
    for section in ("Model and settings", "Summary", "Figures", "Projections", "Warnings"):
        assert f">{section}" in html
    assert not list(out.glob(".*"))  # no temporary folders left behind


def test_esd_figure_draws_the_fit_from_xmin():
    evals = np.sort(np.random.default_rng(0).pareto(2.0, 400) + 0.1)
    row = {"key": "layers.0.q", "out_features": 400, "in_features": 600, "alpha": 3.0, "xmin": 1.0,
           "ks_distance": 0.042}
    fig = F.esd_figure(evals, row)
    hist, ccdf = fig.axes
    assert hist.get_xscale() == ccdf.get_xscale() == "log" and ccdf.get_yscale() == "log"
    fit = [l for l in ccdf.get_lines() if l.get_label().startswith("power law")][0]
    assert fit.get_xdata()[0] == pytest.approx(1.0)  # drawn from xmin, not from the smallest eigenvalue
    labels = [t.get_text() for t in ccdf.get_legend().get_texts()]
    assert any("α=3.00" in t and "KS D=0.042" in t for t in labels) and any("xmin=1" in t for t in labels)
    # the fitted CCDF at xmin equals the share of eigenvalues in the tail
    assert fit.get_ydata()[0] == pytest.approx(np.mean(evals >= 1.0))


def test_alpha_heatmap_band_and_warnings():
    norm = F.BandNorm(1.0, 10.0)
    assert float(norm(2.0)) == pytest.approx(0.35) and float(norm(6.0)) == pytest.approx(0.65)
    assert norm.inverse(0.5) == pytest.approx(4.0)
    analysis = make_analysis(None, layers=4, seed=3)
    fig = F.alpha_heatmap(analysis["projections"])
    marks = fig.axes[0].collections[0].get_offsets()
    assert len(marks) == sum(1 for r in analysis["projections"] if r["warnings"]) > 0


def test_missing_model_folder_skips_esd_only(tmp_path, model_dir):
    analysis = make_analysis(model_dir)
    analysis["model"]["path"] = str(tmp_path / "moved-away")
    paths = write_inputs(tmp_path / "in", analysis, evals=False)
    html = build_report(paths["analysis"], paths["plans"], [], tmp_path / "out").read_text()
    assert "ESD figures skipped" in html
    names = {p.stem for p in (tmp_path / "out" / "figures").glob("*.png")}
    assert not any(n.startswith("esd") for n in names) and "alpha_heatmap" in names
    assert "No evaluation result given" in html


def test_moved_model_folder_is_found_in_the_cache_or_given(tmp_path, model_dir, monkeypatch):
    """An analysis made elsewhere: the same folder name in the acttail cache, or --model, is used when
    its fingerprint matches."""
    analysis = make_analysis(model_dir)
    analysis["model"]["path"] = "/elsewhere/models/tiny"
    paths = write_inputs(tmp_path / "in", analysis, evals=False)
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models").mkdir(parents=True)
    model_dir.rename(tmp_path / "cache" / "models" / "tiny")
    build_report(paths["analysis"], [], [], tmp_path / "out", esd=["layers.1.v"])
    assert (tmp_path / "out" / "figures" / "esd_layers_1_v.png").is_file()
    (tmp_path / "cache" / "models" / "tiny").rename(tmp_path / "given")
    build_report(paths["analysis"], [], [], tmp_path / "out2", esd=["layers.1.v"], model=tmp_path / "given")
    assert (tmp_path / "out2" / "figures" / "esd_layers_1_v.png").is_file()
    with pytest.raises(ActTailError, match="--model .*not found"):
        build_report(paths["analysis"], [], [], tmp_path / "out3", model=tmp_path / "nowhere")


def test_changed_model_folder_is_an_error(tmp_path, model_dir):
    """Weights changed since the analysis: no report with figures of other weights, and nothing written."""
    analysis = make_analysis(model_dir)
    write_tiny_model(model_dir, layers=3, hidden=64, inter=96, seed=1)  # same shapes, other weights
    paths = write_inputs(tmp_path / "in", analysis, evals=False)
    with pytest.raises(ActTailError, match="holds other weights than the analysis"):
        build_report(paths["analysis"], [], [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plan_of_another_model_is_refused(tmp_path):
    analysis = make_analysis(None)
    paths = write_inputs(tmp_path / "in", analysis, evals=False)
    other = make_analysis(None, fingerprint="sha256:other")
    make_plan(other, 0.5).save(tmp_path / "other.json")
    with pytest.raises(ActTailError, match="another checkpoint"):
        build_report(paths["analysis"], [tmp_path / "other.json"], [], tmp_path / "out")
    assert not (tmp_path / "out" / "index.html").exists()


def test_eval_of_another_model_is_refused(tmp_path):
    paths = write_inputs(tmp_path / "in", make_analysis(None), evals=False)
    (tmp_path / "e.json").write_text(json.dumps(make_eval("sha256:other", 10.0, 0.5)))
    with pytest.raises(ActTailError, match="eval result .* is for another model"):
        build_report(paths["analysis"], [], [tmp_path / "e.json"], tmp_path / "out")
    (tmp_path / "e.json").write_text(json.dumps({"model": {"fingerprint": "sha256:synthetic"}}))
    with pytest.raises(ActTailError, match="not an acttail eval result"):
        build_report(paths["analysis"], [], [tmp_path / "e.json"], tmp_path / "out")
    broken = make_eval("sha256:synthetic", 10.0) | {"perplexity": None}
    (tmp_path / "e.json").write_text(json.dumps(broken))
    with pytest.raises(ActTailError, match="no finite 'perplexity'"):
        build_report(paths["analysis"], [], [tmp_path / "e.json"], tmp_path / "out")


def test_eval_naming_a_given_plan_must_agree_with_it(tmp_path):
    paths = write_inputs(tmp_path / "in", make_analysis(None), evals=False)
    e = make_eval("sha256:synthetic", 20.0, 0.3)
    e["plan"]["path"] = str(paths["plans"][0])  # says it ran the 50% plan, but at a 30% budget
    (tmp_path / "e.json").write_text(json.dumps(e))
    with pytest.raises(ActTailError, match="another version of plan .*budget 0.3 there, 0.5 now"):
        build_report(paths["analysis"], paths["plans"], [tmp_path / "e.json"], tmp_path / "out")
    e = make_eval("sha256:synthetic", 20.0, 0.8)
    e["plan"]["path"] = str(paths["plans"][1])  # the 80% plan was calibrated again since
    e["plan"]["calibration"] = {"text": "wiki", "tokens": 512}
    (tmp_path / "e.json").write_text(json.dumps(e))
    with pytest.raises(ActTailError, match="another version of plan .*calibration"):
        build_report(paths["analysis"], paths["plans"], [tmp_path / "e.json"], tmp_path / "out")
    e["plan"]["calibration"] = json.loads(paths["plans"][1].read_text())["calibration"]
    (tmp_path / "e.json").write_text(json.dumps(e))
    assert build_report(paths["analysis"], paths["plans"], [tmp_path / "e.json"], tmp_path / "out").is_file()


def test_evals_on_different_texts_are_flagged(tmp_path):
    paths = write_inputs(tmp_path / "in", make_analysis(None), evals=True)
    e = json.loads(paths["evals"][1].read_text())
    e["settings"]["text"] = "c4"
    paths["evals"][1].write_text(json.dumps(e))
    html = build_report(paths["analysis"], [], [tmp_path / "in" / "runs"], tmp_path / "out").read_text()  # a folder
    assert "differ in text (c4, wiki)" in html and "not comparable" in html
    assert html.count("<code>eval-") == len(paths["evals"])


def test_bad_inputs_give_one_line_errors(tmp_path):
    runner = CliRunner()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "plan.json").write_text(json.dumps({"format": "acttail-plan", "version": 1}))
    analysis = tmp_path / "a.json"
    analysis.write_text(json.dumps(make_analysis(None)))
    cases = [(["report", str(tmp_path / "missing.json"), "-o", str(tmp_path / "o")], "analysis not found"),
             (["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "o")], "not valid JSON"),
             (["report", str(tmp_path / "plan.json"), "-o", str(tmp_path / "o")], "not an acttail analysis"),
             (["report", str(analysis), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "o")],
              "plan"),
             (["report", str(analysis), "--esd", "layers.99.q", "-o", str(tmp_path / "o")], "no such projection"),
             (["report", str(analysis), "--esd-layer", "7", "-o", str(tmp_path / "o")], "layers 0..2"),
             (["report", str(analysis), "-o", str(tmp_path / "bad.json" / "o")], "cannot create output folder")]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("acttail: error:") and message in lines[0], result.output
    assert not (tmp_path / "o" / "index.html").exists()


def test_cli_prints_index_path_and_regenerates_atomically(inputs, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["report", str(inputs["analysis"]), "-o", str(out)]
    plans = [a for p in inputs["plans"] for a in ("--plan", str(p))]
    result = runner.invoke(main, args + plans + ["--esd", "layers.1.up", "--esd", "layers.2.down"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "index.html")
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"esd_layers_1_up", "esd_layers_2_down", "sparsity_heatmap_1"} <= names
    (out / "keep.txt").write_text("user file")  # other files in the folder are left alone
    result = runner.invoke(main, args + ["--esd-kind", "down"])
    assert result.exit_code == 0, result.output
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert "sparsity_heatmap_1" not in names and "esd_layers_1_up" not in names  # stale figures gone
    assert "ESD of down across layers" in (out / "index.html").read_text()
    assert (out / "keep.txt").exists() and not list(out.glob(".*"))


def test_large_model_page_stays_bounded(tmp_path):
    """80 layers, 560 projections: a bounded number of ESD plots, a readable heatmap, every table row."""
    model = write_tiny_model(tmp_path / "big", layers=80, hidden=16, heads=2, kv_heads=1, inter=24)
    paths = write_inputs(tmp_path / "in", make_analysis(model), evals=False)
    html = build_report(paths["analysis"], paths["plans"], [], tmp_path / "out").read_text()
    names = [p.stem for p in (tmp_path / "out" / "figures").glob("*.png")]
    assert sum(n.startswith("esd") for n in names) == 2  # one full-size ESD and one grid of 7 thumbnails
    assert table_rows(html) == 560
    for png in images(html):
        assert png_size(png)[0] <= 14 * F.DPI  # fits a laptop screen


def test_kind_bars_survive_a_uniform_plan():
    """All sparsities equal up to round-off (a uniform plan): whiskers are zero, never negative."""
    rows = [{"kind": k, "sparsity": 0.51, "params": 10} for k in ("q", "up") for _ in range(30)]
    assert F._weighted_mean((r["sparsity"], 10) for r in rows[:30]) != 0.51  # the round-off at stake
    fig = F.kind_bars([("uniform", rows, 0.51)])
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([51.0] * 4)


def test_eval_runs_are_labelled_by_what_differs():
    fp = "sha256:synthetic"
    evals = [make_eval(fp, 12.0), make_eval(fp, 14.0, 0.5), make_eval(fp, 13.0, 0.3), make_eval(fp, 16.0, 0.5),
             make_eval(fp, 15.0, 0.5, "uniform"), make_eval(fp, 17.0, 0.5)]
    evals[3]["plan"]["method"]["epsilon"] = 0.6
    evals[5]["study"] = {"name": "acttail fit=peak"}
    evals[5]["settings"]["mode"] = "topk"
    assert eval_labels(evals) == {1: "acttail", 2: "acttail", 3: "acttail epsilon=0.6", 4: "uniform",
                                  5: "acttail fit=peak"}
    evals[5].pop("study")
    assert eval_labels(evals)[5] == "acttail (topk)"


def test_calibration_figure_shows_the_eval_run_of_that_plan(tmp_path):
    analysis = make_analysis(None)
    paths = write_inputs(tmp_path / "in", analysis, evals=False)
    plan80 = json.loads(paths["plans"][1].read_text())
    e = make_eval("sha256:synthetic", 30.0, 0.8)
    e["plan"].update(path=str(paths["plans"][1]), method=plan80["method"], calibration=plan80["calibration"])
    e["achieved"]["projections"] = [{"key": r["key"], "target": r["sparsity"], "threshold": r["threshold"],
                                     "achieved": r["sparsity"] - 0.05} for r in plan80["projections"]]
    (tmp_path / "e.json").write_text(json.dumps(e))
    html = build_report(paths["analysis"], paths["plans"], [tmp_path / "e.json"], tmp_path / "out").read_text()
    assert "in the eval run on wiki (hollow)" in html
    rows = [{**r, "calibration": {"achieved_sparsity": r["sparsity"]}} for r in plan80["projections"]]
    fig = F.calibration_figure(rows, "t", {r["key"]: r["sparsity"] - 0.05 for r in rows}, "wiki")
    hollow = fig.axes[0].collections[0]
    assert len(hollow.get_offsets()) == 21
    assert np.allclose(hollow.get_offsets()[:, 1], hollow.get_offsets()[:, 0] - 5)


def test_frontier_against_budget_and_measured_speed(tmp_path):
    """Eval results with KL draw the quality frontier; with --speed also against the measured speed-up."""
    analysis = make_analysis(None)
    paths = write_inputs(tmp_path / "in", analysis, evals=False)
    fp, evals = analysis["model"]["fingerprint"], []
    for i, (budget, method, ppl, kl) in enumerate([(None, "dense", 12.0, None), (0.3, "uniform", 13.0, 0.1),
                                                   (0.5, "uniform", 15.0, 0.4), (0.3, "greedy", 12.5, 0.05),
                                                   (0.5, "greedy", 13.5, 0.2)]):
        e = make_eval(fp, ppl, budget, method)
        e["kl"] = kl
        evals.append(tmp_path / f"e{i}.json")
        evals[-1].write_text(json.dumps(e))
    speed = tmp_path / "e2e.json"
    meta = {"device": "NVIDIA H200", "date": "2026-11-26 05:22 UTC", "command": "python benchmarks/gpu_e2e.py"}
    speed.write_text(json.dumps({"meta": meta, "rows": [
        {"model": "Llama-2-7B shape", "variant": f"uniform {int(100 * s)}%, use_sparse dispatch", "step": "current",
         "target_mean_sparsity": s, "speedup": v} for s, v in ((0.3, 1.2), (0.5, 1.5), (0.7, 2.0))]}))
    html = build_report(paths["analysis"], [], evals, tmp_path / "out", speed=speed).read_text()
    assert "Quality against budget and speed" in html and "decode speed-up the GPU benchmark measured" in html
    assert (tmp_path / "out" / "figures" / "frontier.png").is_file()
    speed.write_text(json.dumps({"meta": meta, "rows": []}))
    with pytest.raises(ActTailError, match="no Llama-2-7B rows"):
        build_report(paths["analysis"], [], evals, tmp_path / "out2", speed=speed)


def test_a_broken_speed_table_is_refused_with_one_line(tmp_path):
    """`acttail report --speed` checks the table against schemas/speed.schema.json before any work."""
    analysis = make_analysis(None)
    paths = write_inputs(tmp_path / "in", analysis, evals=False)
    meta = {"device": "NVIDIA H200", "date": "2026-11-26 05:22 UTC", "command": "python benchmarks/gpu_e2e.py"}
    row = {"model": "Llama-2-7B shape", "variant": "uniform 50%, use_sparse dispatch", "step": "current",
           "target_mean_sparsity": 0.5, "speedup": 1.46}
    speed = tmp_path / "e2e.json"
    for field, doc in [("$.rows[0]", {"meta": meta, "rows": [{k: v for k, v in row.items() if k != "speedup"}]}),
                       ("$.rows[0].speedup", {"meta": meta, "rows": [dict(row, speedup="1.46x")]}),
                       ("$.rows[0].target_mean_sparsity", {"meta": meta, "rows": [dict(row, target_mean_sparsity=50)]}),
                       ("$.meta", {"meta": {"device": "H200"}, "rows": [row]}),
                       ("$", {"rows": [row]})]:
        speed.write_text(json.dumps(doc))
        r = CliRunner().invoke(main, ["report", str(paths["analysis"]), "--speed", str(speed),
                                      "-o", str(tmp_path / "out")])
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert r.output.startswith(f"acttail: error: speed table {speed}: field {field}"), r.output
        assert not (tmp_path / "out").exists()
