"""One front door: every command of the CLI gives what its Python API verb gives for the same arguments (the
documents compared with their timestamps, paths and timings removed), on a tiny model whose tokenizer asks
for BOS; and a warning of the API is the CLI's ``acttail: warning:`` line, word for word."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import acttail
from acttail.cli import main
from acttail.outputs import to_json, write_json
from acttail.inputs import ModelInput, text_windows
from acttail.sensitivity import measure as measure_sensitivity

from runtime_tiny import write_hf_model, write_text

pytest.importorskip("transformers")

VOLATILE = ("created", "path", "file", "seconds")  # timestamps, paths, timings (and the sidecar's file name)


def strip(doc):
    """``doc`` without its volatile fields, at any depth."""
    if isinstance(doc, dict):
        return {k: strip(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [strip(v) for v in doc]
    return doc


def read(path: Path):
    return strip(json.loads(Path(path).read_text()))


def same(api_doc, cli_path: Path) -> None:
    """The API's document (an object with to_dict, or a dict) equals the file the CLI wrote."""
    doc = api_doc.to_dict() if hasattr(api_doc, "to_dict") else api_doc
    got, want = strip(json.loads(to_json(doc))), read(cli_path)
    assert got == want


def cli(*args) -> object:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def warnings_of(r) -> list[str]:
    return [ln.removeprefix("acttail: warning: ") for ln in r.stderr.splitlines() if ln.startswith("acttail: warning:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    folder = root / "model"
    write_hf_model(folder, "llama", layers=2, seed=4, scale=0.3, bos=True)
    text = write_text(root / "cal.txt", 3000, seed=6)
    cli("analyze", folder, "-o", root / "analysis.json")
    return {"root": root, "model": folder, "text": text, "analysis": root / "analysis.json"}


@pytest.fixture(scope="module")
def calibrated(tiny):
    """A uniform 50% plan calibrated by the CLI (learned biases, 2 steps), and the same by the API."""
    root = tiny["root"]
    cli("allocate", tiny["analysis"], "--budget", 0.5, "--method", "uniform", "-o", root / "plan.json")
    cli("calibrate", tiny["model"], root / "plan.json", "--text", tiny["text"], "--tokens", 512, "--ctx", 64,
        "--steps", 2, "-o", root / "cal.json")
    plan = acttail.calibrate(tiny["model"], root / "plan.json", tiny["text"], tokens=512, ctx=64, steps=2,
                             progress=False)
    return root / "cal.json", plan


def test_analyze(tiny):
    same(acttail.analyze(tiny["model"], progress=False), tiny["analysis"])


def test_allocate_and_its_fallback_warning(tiny):
    out = tiny["root"] / "greedy-fallback.json"
    r = cli("allocate", tiny["analysis"], "--budget", 0.4, "-o", out)  # greedy, the default, has no paths here
    with pytest.warns(acttail.ActTailWarning) as caught:
        plan = acttail.allocate(str(tiny["analysis"]), 0.4)
    assert plan.method["name"] == "uniform"
    assert warnings_of(r) == [str(w.message) for w in caught] and "no greedy paths" in warnings_of(r)[0]
    same(plan, out)
    cli("allocate", tiny["analysis"], "--budget", 0.3, "--method", "acttail", "--epsilon", 0.2, "--scope",
        "per-kind", "-o", tiny["root"] / "map.json")
    with pytest.warns(acttail.ActTailWarning, match="no 'sensitivity' column"):
        same(acttail.allocate(str(tiny["analysis"]), 0.3, method="acttail", epsilon=0.2, scope="per-kind"),
             tiny["root"] / "map.json")


def test_greedy_measured_and_measured_again(tiny):
    root, args = tiny["root"], {"tokens": 256, "ctx": 64, "base_step": 0.2, "max_sparsity": 0.5}
    cli("greedy", tiny["model"], tiny["analysis"], "--text", tiny["text"], "--tokens", 256, "--ctx", 64,
        "--base-step", 0.2, "--max-sparsity", 0.5, "-o", root / "greedy.json")
    measured = acttail.measure_greedy(tiny["model"], tiny["analysis"], tiny["text"], progress=False, **args)
    same(measured, root / "greedy.json")
    write_json(root / "paths.json", measured.extra["greedy"])
    cli("greedy", tiny["model"], tiny["analysis"], "--measured", root / "paths.json", "-o", root / "reused.json")
    same(acttail.measure_greedy(tiny["model"], tiny["analysis"], measured=root / "paths.json"), root / "reused.json")
    # and a greedy plan from it
    cli("allocate", root / "reused.json", "--budget", 0.3, "-o", root / "greedy-plan.json")
    same(acttail.allocate(str(root / "reused.json"), 0.3), root / "greedy-plan.json")


def test_sensitivity_measured_and_measured_again(tiny):
    root = tiny["root"]
    cli("sensitivity", tiny["model"], tiny["analysis"], "--text", tiny["text"], "--tokens", 256, "--ctx", 64,
        "-o", root / "sens-analysis.json")
    api = acttail.measure_sensitivity(tiny["model"], tiny["analysis"], tiny["text"], tokens=256, ctx=64,
                                      progress=False)
    same(api, root / "sens-analysis.json")
    m = ModelInput(tiny["model"])  # a sensitivity.json as a GPU run would have written it
    wins, name, _ = text_windows(m, tiny["text"], 256, 64)
    write_json(root / "sens.json", measure_sensitivity(m.net, wins, m.fingerprint, name, progress=False))
    cli("sensitivity", tiny["model"], tiny["analysis"], "--measured", root / "sens.json", "-o", root / "reused.json")
    reused = acttail.measure_sensitivity(tiny["model"], tiny["analysis"], measured=root / "sens.json")
    same(reused, root / "reused.json")
    assert strip(reused.to_dict()) == strip(api.to_dict())  # measured now or read back: the same column


def test_calibrate(calibrated, tmp_path):
    cli_path, plan = calibrated
    plan.save(tmp_path / "api.json")
    assert plan.compensation == "learned" and plan.calibration["learned"]["steps"] == 2  # the default, both ways
    assert read(tmp_path / "api.json") == read(cli_path)  # tensors included: the sidecars' sha256 agree
    assert plan.calibration["text"] == str(cli_path.parent / "cal.txt")


def test_tune(tiny, tmp_path):
    args = {"within": 0.2, "tokens": 512, "held_tokens": 256, "ctx": 64, "tolerance": 0.3, "steps": 2}
    r = cli("tune", tiny["model"], tiny["analysis"], "--text", tiny["text"], "--within", 0.2, "--tokens", 512,
            "--held-tokens", 256, "--ctx", 64, "--tolerance", 0.3, "--steps", 2, "-o", tmp_path / "cli.json")
    with pytest.warns(acttail.ActTailWarning) as caught:
        plan = acttail.tune(tiny["model"], tiny["analysis"], tiny["text"], progress=False, **args)
    assert warnings_of(r) == [str(w.message) for w in caught]  # greedy without paths: probing uniformly
    plan.save(tmp_path / "api.json")
    assert read(tmp_path / "api.json") == read(tmp_path / "cli.json")
    rec = plan.calibration["tune"]
    assert plan.compensation == "learned" and rec["held_tokens"] == 256 and len(rec["probes"]) == 2


def test_eval(tiny, calibrated, tmp_path):
    cli_plan, _ = calibrated
    cli("eval", tiny["model"], "--plan", cli_plan, "--text", tiny["text"], "--tokens", 512, "--ctx", 64,
        "--batch-size", 3, "-o", tmp_path / "r.json")
    r = acttail.evaluate(tiny["model"], tiny["text"], plan=cli_plan, tokens=512, ctx=64, batch_size=3,
                         progress=False)
    same(r, tmp_path / "r.json")
    assert r["settings"]["bos"] == 1 and r["kl"] > 0
    cli("eval", tiny["model"], "--text", tiny["text"], "--tokens", 512, "--ctx", 64, "-o", tmp_path / "dense.json")
    same(acttail.evaluate(tiny["model"], tiny["text"], tokens=512, ctx=64, progress=False), tmp_path / "dense.json")


def test_generate(tiny, calibrated):
    cli_plan, _ = calibrated
    r = cli("generate", tiny["model"], "--plan", cli_plan, "--prompt", "the cat sat", "--max-new-tokens", 6,
            "--prefill", "all")
    text, info = acttail.generate(tiny["model"], "the cat sat", plan=cli_plan, max_new_tokens=6, prefill="all")
    assert r.stdout == text + "\n" and text
    assert f"{info['new_tokens']} new tokens" in r.stderr and info["backend"] == "reference"
    dense = cli("generate", tiny["model"], "--prompt", "the cat sat", "--max-new-tokens", 6)
    assert dense.stdout == acttail.generate(tiny["model"], "the cat sat", max_new_tokens=6)[0] + "\n"


@pytest.mark.parametrize("fmt, out", [("gemma3n", "g.json"), ("nncf", "n.json"), ("teal", "teal")])
def test_export(calibrated, tmp_path, fmt, out):
    cli_plan, _ = calibrated
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    r = cli("export", cli_plan, "--to", fmt, "-o", tmp_path / "cli" / out)
    with pytest.warns(acttail.ActTailWarning) as caught:
        written = acttail.export_plan(cli_plan, fmt, tmp_path / "api" / out)
    assert warnings_of(r) == [str(w.message) for w in caught] and "learned compensation" in warnings_of(r)[0]
    assert f"wrote {len(written)} file(s)" in r.stdout
    files = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "api") for p in written)
    for f in files:
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "api" / f).read_bytes()
