"""`acttail analyze` end to end on tiny models, the cache, and one-line errors for bad input."""

import json

import pytest
from click.testing import CliRunner

from acttail.analysis import load_analysis
from acttail.cli import main
from acttail.errors import ActTailError
from conftest import write_tiny_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_analyze_writes_json_csv_and_caches(tmp_path):
    model = write_tiny_model(tmp_path / "m", hidden=96, inter=160, heads=4, kv_heads=4)
    out, csv = tmp_path / "a.json", tmp_path / "a.csv"
    r = run("analyze", model, "-o", out, "--csv", csv)
    assert r.exit_code == 0, r.output
    doc = load_analysis(out)
    assert len(doc["projections"]) == 14 and doc["settings"]["fit"] == "ks"
    assert all(p["alpha"] > 1 for p in doc["projections"])
    assert doc["summary"]["n_fitted"] == 14 and "up" in doc["summary"]["per_kind"]
    assert len(csv.read_text().splitlines()) == 15
    assert "cached" not in r.output
    r2 = run("analyze", model, "--fit", "ks", "--json")
    assert json.loads(r2.output)["projections"] == doc["projections"]
    assert "cached" in run("analyze", model).output
    assert "cached" not in run("analyze", model, "--force").output


def test_fits_differ(tmp_path):
    model = write_tiny_model(tmp_path / "m", hidden=96, inter=160)
    alphas = {f: [p["alpha"] for p in json.loads(run("analyze", model, "--fit", f, "--json").output)["projections"]]
              for f in ("ks", "median")}
    assert alphas["ks"] != alphas["median"]


@pytest.mark.parametrize("case", ["missing", "noconfig", "garbage", "unwritable", "arch"])
def test_bad_input_one_line_no_output(tmp_path, case):
    model = write_tiny_model(tmp_path / "m")
    out = tmp_path / "out" / "a.json"
    out.parent.mkdir()
    if case == "missing":
        model = tmp_path / "nothing"
    elif case == "noconfig":
        (model / "config.json").unlink()
    elif case == "garbage":
        (model / "model.safetensors").write_bytes(b"garbage" * 10)
    elif case == "unwritable":
        out = tmp_path / "no-such-dir" / "a.json"
    elif case == "arch":
        cfg = json.loads((model / "config.json").read_text())
        cfg["architectures"] = ["GPT2LMHeadModel"]
        (model / "config.json").write_text(json.dumps(cfg))
    r = run("analyze", model, "-o", out)
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("acttail: error:"), r.output
    assert "Traceback" not in r.output
    assert not out.exists() and list(out.parent.glob("*")) == [] if out.parent.exists() else True


def test_load_analysis_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ActTailError, match="not an acttail analysis"):
        load_analysis(bad)
    bad.write_text('{"format": "acttail-analysis", "vers')
    with pytest.raises(ActTailError, match="not valid JSON"):
        load_analysis(bad)
