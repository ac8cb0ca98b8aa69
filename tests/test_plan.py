"""Plan files: schema-validated round trips, clear errors, thresholds, summary, CLI allocate / plan show."""

import json
import os

import pytest
from click.testing import CliRunner

from acttail import plan as P
from acttail.allocation import plan_from_analysis
from acttail.layout import KINDS
from acttail.plan import Plan
from acttail.cli import main
from acttail.errors import ActTailError
from stage2_synthetic import analysis


@pytest.fixture
def plan():
    return plan_from_analysis(analysis(num_layers=4, null_every=6), 0.6, analysis_path="a.json", method="acttail")


def edited(plan, path, edit):
    """Write a copy of ``plan`` changed by ``edit`` (bypassing validation) and return its path."""
    doc = plan.to_dict()
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def test_round_trip_is_exact_and_ordered(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    text = path.read_text()
    assert text.startswith('{\n  "format": "acttail-plan",\n  "version": 2,\n')
    assert list(json.loads(text)) == ["format", "version", "tool_version", "created", "model", "budget", "method",
                                      "score", "compensation", "source", "projections", "calibration", "tensors"]
    assert list(json.loads(text)["projections"][0]) == list(P.ENTRY_KEYS)
    Plan.load(path).save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text  # stable bytes


def test_schema_ships_in_the_package():
    assert P.schema()["properties"]["version"] == {"enum": [1, 2]}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=3), "plan version 3; acttail .* reads versions 1, 2"),
    (lambda d: d.update(version=1.0), r"plan version 1\.0; acttail .* reads versions 1, 2 \(integers\)"),
    (lambda d: d.update(version=True), "plan version True; acttail"),
    (lambda d: d.update(compensation="magic"), r"\$\.compensation"),
    (lambda d: d["projections"][0].update(overhead=-0.1), r"\$\.projections\[0\]\.overhead"),
    (lambda d: d.update(format="something-else"), "not an acttail plan"),
    (lambda d: d["projections"][2].update(sparsity=1.5), r"\$\.projections\[2\]\.sparsity: 1.5 is greater than"),
    (lambda d: d["projections"][0].update(threshold=-1.0), r"\$\.projections\[0\]\.threshold"),
    (lambda d: d["projections"][1].pop("params"), r"\$\.projections\[1\]: 'params' is a required property"),
    (lambda d: d["model"].pop("fingerprint"), r"\$\.model: 'fingerprint' is a required property"),
    (lambda d: d.update(budget="0.6"), r"\$\.budget: '0.6' is not of type 'number'"),
    (lambda d: d.update(extra=1), "Additional properties are not allowed"),
    (lambda d: d["projections"].append(dict(d["projections"][0])), "appears twice"),
    (lambda d: d["projections"][0].update(key="layers.1.q"), "does not match its layer and kind"),
    (lambda d: d["projections"][0].update(layer=9, key="layers.9.q"), "num_layers"),
    (lambda d: d.update(projections=[]), r"\$\.projections"),
])
def test_bad_plans_name_the_problem(plan, tmp_path, edit, message):
    path = edited(plan, tmp_path / "bad.json", edit)
    with pytest.raises(ActTailError, match=message):
        Plan.load(path)


def test_truncated_missing_and_foreign_files(plan, tmp_path):
    good = tmp_path / "plan.json"
    plan.save(good)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:500])
    with pytest.raises(ActTailError, match="not valid JSON"):
        Plan.load(truncated)
    with pytest.raises(ActTailError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ActTailError, match="not an acttail plan"):
        Plan.load(listing)


def test_fingerprint_mismatch(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path, expect_fingerprint="synthetic-fp").budget == 0.6
    with pytest.raises(ActTailError, match="made for another checkpoint"):
        Plan.load(path, expect_fingerprint="other-fp")


def test_failed_save_leaves_the_old_file(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    before = path.read_text()
    plan.budget = 2.0
    with pytest.raises(ActTailError, match="budget"):
        plan.save(path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["plan.json"]


def test_with_thresholds(plan, tmp_path):
    keys = [e.key for e in plan.projections]
    thresholds = {k: 0.01 * i for i, k in enumerate(keys)}
    stats = {k: {"achieved_sparsity": 0.5, "n_tokens": 128} for k in keys}
    cal = plan.with_thresholds(thresholds, stats, {"text": "c4", "n_tokens": 128})
    assert not plan.calibrated and cal.calibrated  # the input plan is not changed
    assert {e.key: e.threshold for e in cal.projections} == thresholds
    assert cal.projections[3].calibration == {"achieved_sparsity": 0.5, "n_tokens": 128}
    path = tmp_path / "cal.json"
    cal.save(path)
    assert Plan.load(path) == cal
    text = cal.format_summary()
    assert "calibrated yes" in text and "achieved" in text
    up_line = next(line for line in text.splitlines() if line.startswith("up "))
    assert up_line.split()[6] == "0.5000"  # achieved column
    with pytest.raises(ActTailError, match="no threshold for 1 projections"):
        plan.with_thresholds({k: 0.1 for k in keys[1:]})
    with pytest.raises(ActTailError, match="not in the plan: layers.99.q"):
        plan.with_thresholds({**thresholds, "layers.99.q": 0.1})
    with pytest.raises(ActTailError, match="finite number >= 0"):
        plan.with_thresholds({**thresholds, keys[0]: float("nan")})
    with pytest.raises(ActTailError, match="achieved_sparsity"):
        plan.with_thresholds(thresholds, {keys[0]: {"achieved_sparsity": 3.0}})


def test_summary_numbers(plan):
    s = plan.summary()
    assert abs(s["weighted_sparsity"] - 0.6) <= 1e-9
    up = [e for e in plan.projections if e.kind == "up"]
    assert s["per_kind"]["up"]["n"] == 4
    assert s["per_kind"]["up"]["max"] == max(e.sparsity for e in up)
    assert s["per_kind"]["up"]["mean"] == pytest.approx(sum(e.sparsity for e in up) / 4)  # equal params
    assert [row["layer"] for row in s["per_layer"]] == [0, 1, 2, 3]
    assert s["per_layer"][2]["by_kind"]["gate"] == plan.projections[2 * 7 + 4].sparsity


def test_cli_allocate_and_plan_show(tmp_path):
    an = tmp_path / "analysis.json"
    an.write_text(json.dumps(analysis(num_layers=30, null_every=11)))
    out = tmp_path / "plan.json"
    runner = CliRunner()
    res = runner.invoke(main, ["allocate", str(an), "--budget", "0.7", "-o", str(out), "--scope", "per-kind",
                               "--method", "acttail"])
    assert res.exit_code == 0, res.output
    plan = Plan.load(out)
    assert plan.method["scope"] == "per-kind" and abs(plan.weighted_sparsity - 0.7) <= 1e-9
    show = runner.invoke(main, ["plan", "show", str(out)])
    assert show.exit_code == 0
    assert "weighted mean sparsity 0.700000" in show.output
    assert sum(line.split()[0] in KINDS for line in show.output.splitlines() if line.strip()) == 7
    assert sum(line.split()[0].isdigit() for line in show.output.splitlines() if line.strip()) == 30


@pytest.mark.parametrize("args, message", [
    (["--budget", "1.5"], "budget must be strictly between 0 and 1"),
    (["--budget", "0.5", "--min-sparsity", "0.6"], "infeasible"),
    (["--budget", "0.5", "--metric", "nope"], "no column 'nope'"),
    (["--budget", "0.5", "--method", "magic"], "Invalid value for '--method'"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    an = tmp_path / "analysis.json"
    an.write_text(json.dumps(analysis(num_layers=2)))
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(main, ["allocate", str(an), "-o", str(out), "--method", "acttail", *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_cli_bad_files(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["allocate", str(tmp_path / "none.json"), "--budget", "0.5", "-o", str(tmp_path / "p")])
    assert res.exit_code == 2 and "analysis not found" in res.output
    (tmp_path / "v2.json").write_text(json.dumps(dict(analysis(num_layers=1), version=2)))
    res = runner.invoke(main, ["allocate", str(tmp_path / "v2.json"), "--budget", "0.5", "-o", str(tmp_path / "p")])
    assert res.exit_code == 2 and "version 2" in res.output
    res = runner.invoke(main, ["plan", "show", str(tmp_path / "v2.json")])
    assert res.exit_code == 2 and "not an acttail plan" in res.output


def test_version_1_files_are_read(plan, tmp_path):
    """A plan written by acttail before version 2 (no score, compensation, tensors, overhead, rank)."""
    doc = plan.to_dict()
    doc["version"] = 1
    for k in ("score", "compensation", "tensors"):
        doc.pop(k)
    for e in doc["projections"]:
        e.pop("overhead")
        e.pop("rank")
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    old = Plan.load(path)
    assert old.score == "magnitude" and old.compensation == "none" and old.tensors == {}
    assert [e.sparsity for e in old.projections] == [e.sparsity for e in plan.projections]


def test_tensors_travel_beside_the_plan_checked_by_sha256(plan, tmp_path):
    import torch

    e = plan.projections[4]
    e.rank, e.overhead = 2, 2 * (e.in_features + e.out_features) / e.params
    plan.compensation = "lowrank"
    plan.tensors = {f"{e.key}.lowrank_u": torch.randn(e.out_features, 2),
                    f"{e.key}.lowrank_v": torch.randn(2, e.in_features)}
    path = tmp_path / "plan.json"
    plan.save(path)
    ref = json.loads(path.read_text())["tensors"]
    assert ref["file"] == "plan.safetensors" and (tmp_path / "plan.safetensors").is_file()
    assert Plan.load(path) == plan
    assert plan.weighted_saving < plan.weighted_sparsity
    data = bytearray((tmp_path / "plan.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "plan.safetensors").write_bytes(bytes(data))
    with pytest.raises(ActTailError, match="does not match the sha256"):
        Plan.load(path)
    (tmp_path / "plan.safetensors").unlink()
    with pytest.raises(ActTailError, match="not beside it"):
        Plan.load(path)
    plan.tensors[f"{e.key}.lowrank_u"] = torch.randn(3, 3)
    with pytest.raises(ActTailError, match="expected"):
        plan.save(tmp_path / "bad.json")
    plan.tensors = {"layers.99.q.bias": torch.zeros(3)}
    with pytest.raises(ActTailError, match="names no projection"):
        plan.save(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_cli_allocate_rank_split(tmp_path):
    """--rank-split gives each projection a rank by alpha (up to the option, multiples of 8) in the plan."""
    an = tmp_path / "analysis.json"
    an.write_text(json.dumps(analysis(num_layers=4)))
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(main, ["allocate", str(an), "--budget", "0.5", "--method", "uniform", "--rank-split",
                                    "24", "-o", str(out)])
    assert res.exit_code == 0, res.output
    ranks = [e.rank for e in Plan.load(out).projections]
    assert max(ranks) == 24 and min(ranks) == 0 and all(r % 8 == 0 for r in ranks)
    bad = CliRunner().invoke(main, ["allocate", str(an), "--budget", "0.5", "--rank-split", "-1", "-o", str(out)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
