"""Issue 13: every bad input is one clear line (exit 2) with nothing written, and the fingerprint sees
every byte of the weights. One test (or more) per defect class D1-D17, on small broken fixtures made here
from a tiny random Llama; plus what must keep holding (Ctrl-C, concurrent analyses)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from acttail import files, outputs
from acttail.checkpoint import Checkpoint, read_header
from acttail.cli import main
from acttail.errors import ActTailError
from conftest import write_tiny_model
from runtime_tiny import write_hf_model, write_text

transformers = pytest.importorskip("transformers")  # the tiny runtime model is written with it


# ---- helpers -----------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(r, *words):
    """The command failed as promised: exit 2, one line 'acttail: error: ...' naming ``words`` (besides the
    progress bars of work done before the failure)."""
    lines = [ln for ln in r.output.strip().splitlines() if not re.search(r": +\d+%\|", ln)]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("acttail: error:"), r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def edited_json(src: Path, dest: Path, edit) -> Path:
    doc = json.loads(src.read_text())
    edit(doc)
    dest.write_text(json.dumps(doc))  # json.dumps writes NaN and Infinity as Python's json does
    return dest


def copy_model(src: Path, dest: Path, **config) -> Path:
    """A copy of a model folder with config.json fields replaced (a value None removes the field)."""
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(config)
    (dest / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dest


def poke(st: Path, name: str, value: float, index: int = 0) -> int:
    """Overwrite one float32 of tensor ``name`` in place (same size, same modification time); the offset."""
    raw, header = read_header(st)
    assert header[name]["dtype"] == "F32"
    offset = 8 + len(raw) + header[name]["data_offsets"][0] + 4 * index
    stat = st.stat()
    with open(st, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<f", value))
    os.utime(st, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return offset


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny Llama with tokenizer, a text, its analysis, a plan, a calibrated plan and a sensitivity file."""
    root = tmp_path_factory.mktemp("trust")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTTAIL_CACHE", str(root / "cache"))
        model = root / "model"
        write_hf_model(model, "llama", layers=2, seed=3, scale=0.3)
        text = write_text(root / "text.txt", 3000, seed=2)
        k = {"root": root, "model": model, "text": text, "analysis": root / "analysis.json",
             "plan": root / "plan.json", "calibrated": root / "calibrated.json", "sens": root / "sens.json"}
        assert run("analyze", model, "-o", k["analysis"]).exit_code == 0
        assert run("allocate", k["analysis"], "--budget", "0.5", "-o", k["plan"]).exit_code == 0
        r = run("calibrate", model, k["plan"], "--text", text, "--tokens", "512", "--ctx", "128", "-o", k["calibrated"])
        assert r.exit_code == 0, r.output
        rows = json.loads(k["analysis"].read_text())["projections"]
        k["sens"].write_text(json.dumps({
            "model": {"fingerprint": Checkpoint.open(model).fingerprint}, "text": "c4", "tokens": 512, "mode": "topk",
            "projections": [{"key": r["key"], "layer": r["layer"], "kind": r["kind"], "dnll_50": 0.001 * i,
                             "dnll_80": 0.002 * i} for i, r in enumerate(rows)]}))
        yield k


@pytest.fixture
def out(tmp_path):
    """An empty folder for outputs: after a refused command it must still be empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# ---- D1: the fingerprint sees every byte, and the analysis cache follows it ---------------------------

def _middle_tensor(st: Path) -> tuple[str, int]:
    """The tensor whose data is nearest the middle of the file, and the byte offset of its first value."""
    raw, header = read_header(st)
    size = st.stat().st_size
    base = 8 + len(raw)
    name = min((n for n in header if n != "__metadata__"),
               key=lambda n: abs(base + sum(header[n]["data_offsets"]) / 2 - size / 2))
    return name, base + header[name]["data_offsets"][0]


def test_d1_fingerprint_changes_with_a_middle_tensor(tmp_path):
    model = write_tiny_model(tmp_path / "m", hidden=128, inter=256, heads=4, kv_heads=4)
    st = model / "model.safetensors"
    before = Checkpoint.open(model).fingerprint
    assert re.fullmatch(r"sha256:[0-9a-f]{32}", before)
    name, offset = _middle_tensor(st)
    raw, _ = read_header(st)
    assert 8 + len(raw) + 65536 < offset < st.stat().st_size - 65536  # bytes the old fingerprint never read
    poke(st, name, 0.125)
    assert Checkpoint.open(model).fingerprint != before


def test_d1_hash_memo_is_keyed_on_the_file(tmp_path, monkeypatch):
    """The remembered hash is used for an unchanged file and never for a changed one (same size, same
    modification time: only the status-change time tells)."""
    monkeypatch.setattr(files, "SETTLED_NS", 0)
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 100_000)
    real = files.file_sha256(f)
    memo = next((tmp_path / "cache" / "sha256").glob("*.json"))
    doc = json.loads(memo.read_text())
    memo.write_text(json.dumps({**doc, "sha256": "f" * 64}))
    assert files.file_sha256(f) == "f" * 64  # unchanged file: the memo is used
    time.sleep(0.05)
    stat = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(50_000)
        fh.write(b"\1")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = files.file_sha256(f)
    assert changed not in ("f" * 64, real)


def test_d1_freshly_written_files_are_not_remembered(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 1000)
    files.file_sha256(f)
    assert not (tmp_path / "cache" / "sha256").exists()


def test_d1_analysis_cache_follows_the_weights(tmp_path):
    model = write_tiny_model(tmp_path / "m", hidden=128, inter=256, heads=4, kv_heads=4)
    first = json.loads(run("analyze", model, "--json").output)
    assert all(not r["warnings"] or "NaN" not in r["warnings"][0] for r in first["projections"])
    poke(model / "model.safetensors", "model.layers.1.mlp.up_proj.weight", float("nan"), index=7)
    r = run("analyze", model)
    assert r.exit_code == 0 and "cached" not in r.output
    again = json.loads(run("analyze", model, "--json").output)
    up = next(p for p in again["projections"] if p["key"] == "layers.1.up")
    assert up["alpha"] is None and "NaN" in up["warnings"][0]
    assert again["model"]["fingerprint"] != first["model"]["fingerprint"]


def test_d1_plan_for_edited_weights_is_refused(kit, tmp_path, out):
    model = shutil.copytree(kit["model"], tmp_path / "m")
    poke(model / "model.safetensors", "model.layers.0.mlp.down_proj.weight", 0.5, index=3)
    refused(run("eval", model, "--plan", kit["calibrated"], "--text", kit["text"], "--ctx", "128",
                "--tokens", "256", "-o", out / "r.json"), "another checkpoint")
    assert listing(out) == set()


# ---- D2 / D13: outputs checked before any work, all or nothing ----------------------------------------

needs_proc = pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")


@needs_proc
def test_d2_unwritable_outputs_refused_up_front(kit, monkeypatch):
    """/proc takes no new file even for root: every command says so before it works."""
    import acttail.analysis
    import acttail.calibration
    import acttail.evaluation
    import acttail.sensitivity

    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")

    for mod, fn in ((acttail.analysis, "run_analysis"), (acttail.calibration, "calibrate"),
                    (acttail.evaluation, "evaluate_windows"), (acttail.sensitivity, "measure")):
        monkeypatch.setattr(mod, fn, boom)
    m, a, p, t = kit["model"], kit["analysis"], kit["plan"], kit["text"]
    for args in (["analyze", m, "-o", "/proc/a.json"], ["analyze", m, "--csv", "/proc/a.csv"],
                 ["allocate", a, "--budget", "0.5", "-o", "/proc/p.json"],
                 ["export", p, "--to", "gemma3n", "-o", "/proc/g.json"],
                 ["export", p, "--to", "teal", "-o", "/proc/teal"],
                 ["calibrate", m, p, "--text", t, "-o", "/proc/c.json"],
                 ["eval", m, "--text", t, "-o", "/proc/r.json"],
                 ["sensitivity", m, a, "-o", "/proc/s.json"],
                 ["report", a, "-o", "/proc/report"],
                 ["convert-gguf", "x.gguf", "/proc/converted"]):
        refused(run(*args), "cannot write in output folder /proc")


def test_d2_folder_as_file_output_and_file_as_folder_output(kit, out):
    (out / "taken").mkdir()
    (out / "file").write_text("x")
    before = listing(out)
    refused(run("analyze", kit["model"], "-o", out / "taken"), "is a folder")
    refused(run("allocate", kit["analysis"], "--budget", "0.5", "-o", out / "taken"), "is a folder")
    refused(run("eval", kit["model"], "--text", kit["text"], "-o", out / "taken"), "is a folder")
    refused(run("export", kit["plan"], "--to", "nncf", "-o", out / "taken"), "is a folder")
    refused(run("report", kit["analysis"], "-o", out / "file"), "not a folder")
    refused(run("export", kit["plan"], "--to", "teal", "-o", out / "file"), "not a TEAL lookup folder")
    refused(run("analyze", kit["model"], "-o", out / "file" / "a.json"), "not a folder")
    assert listing(out) == before and (out / "file").read_text() == "x"


def test_d2_a_failing_second_output_leaves_no_first(tmp_path):
    ok, bad = tmp_path / "a.json", tmp_path / "gone" / "a.csv"
    with pytest.raises(ActTailError, match="output folder does not exist"):
        outputs.write_files({ok: "{}", bad: "x"})
    assert listing(tmp_path) == set()


def test_d2_analyze_writes_both_outputs_or_neither(kit, out, monkeypatch):
    import acttail.analysis

    def fail(doc):
        raise ActTailError("cannot write the CSV")

    monkeypatch.setattr(acttail.analysis, "to_csv", fail)
    refused(run("analyze", kit["model"], "-o", out / "a.json", "--csv", out / "a.csv"), "CSV")
    assert listing(out) == set()
    refused(run("analyze", kit["model"], "-o", out / "a.json", "--csv", out / "a.json"), "same file")


def test_d13_missing_output_folder_before_any_work(kit, monkeypatch):
    import acttail.calibration
    import acttail.convert

    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(acttail.calibration, "calibrate", boom)
    monkeypatch.setattr(acttail.convert, "open_gguf", boom)
    refused(run("calibrate", kit["model"], kit["plan"], "--text", kit["text"], "-o", "/nonexistent/x.json"),
            "output folder does not exist: /nonexistent")
    refused(run("convert-gguf", "x.gguf", "/nonexistent/model"), "output folder does not exist")
    with pytest.raises(ActTailError, match="does not exist"):
        acttail.convert.convert_gguf("x.gguf", "/nonexistent/model")


# ---- D3 / D5: plan and JSON documents with NaN, infinities, deep nesting --------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1e999"])
def test_d3_non_finite_numbers_in_a_plan_are_refused(kit, tmp_path, out, value):
    def edit(doc):
        doc["projections"][3]["threshold"] = value if isinstance(value, float) else 0.0
    path = edited_json(kit["calibrated"], tmp_path / "bad.json", edit)
    if isinstance(value, str):
        path.write_text(path.read_text().replace('"threshold": 0.0', f'"threshold": {value}', 1))
    line = refused(run("plan", "show", path))
    assert "NaN" in line or "Infinity" in line or "1e999" in line
    refused(run("eval", kit["model"], "--plan", path, "--text", kit["text"], "--ctx", "128", "-o", out / "r.json"))
    assert listing(out) == set()


def test_d3_in_memory_plan_with_nan_fails_validation(kit):
    from acttail import plan as P

    plan = P.Plan.load(kit["calibrated"]).to_dict()
    plan["projections"][5]["threshold"] = float("nan")
    with pytest.raises(ActTailError, match=r"\$\.projections\[5\]\.threshold: not a finite number"):
        P.validate(plan)
    plan["projections"][5]["threshold"] = 0.1
    plan["model"]["num_layers"] = 2.0
    with pytest.raises(ActTailError, match="num_layers.*not of type 'integer'"):
        P.validate(plan)


def test_d5_deep_json_is_one_line(kit, tmp_path, out):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused(run("plan", "show", deep), "nested too deeply")
    refused(run("eval", kit["model"], "--plan", deep, "--text", kit["text"], "-o", out / "r.json"), "nested too deeply")
    refused(run("report", deep, "-o", out / "rep"), "nested too deeply")
    refused(run("allocate", deep, "--budget", "0.5", "-o", out / "p.json"), "nested too deeply")
    refused(run("sensitivity", kit["model"], kit["analysis"], "--measured", deep, "-o", out / "s.json"),
            "nested too deeply")
    model = shutil.copytree(kit["model"], tmp_path / "m")
    shutil.copy(deep, model / "config.json")
    refused(run("analyze", model), "nested too deeply")
    assert listing(out) == set()


# ---- D4 / D14: config fields of the wrong type or range ---------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", "30"), ("num_hidden_layers", 2.0), ("num_hidden_layers", 0), ("hidden_size", [64]),
    ("num_attention_heads", 0), ("rope_theta", "big"), ("vocab_size", True), ("rms_norm_eps", -1),
    ("architectures", "LlamaForCausalLM"), ("architectures", []), ("rope_scaling", {"rope_type": "llama3"}),
    ("eos_token_id", "eos"),
])
def test_d4_config_field_types(kit, tmp_path, out, field, value):
    model = copy_model(kit["model"], tmp_path / "m", **{field: value})
    line = refused(run("analyze", model, "-o", out / "a.json"), f"$.{field}")
    assert "unsupported architecture L" not in line
    refused(run("generate", model, "--prompt", "the cat", "--max-new-tokens", "2"), f"$.{field}")
    assert listing(out) == set()


def test_d4_missing_fields_the_runtime_needs(kit, tmp_path):
    model = copy_model(kit["model"], tmp_path / "m", vocab_size=None)
    refused(run("generate", model, "--prompt", "the cat", "--max-new-tokens", "2"), "no vocab_size")


def test_d4_layer_count_far_beyond_the_weights(kit, tmp_path):
    model = copy_model(kit["model"], tmp_path / "m", num_hidden_layers=10**12)
    t = time.perf_counter()
    refused(run("analyze", model), "config says 1000000000000 layers")
    assert time.perf_counter() - t < 30


def test_d4_huge_context_in_config_allocates_nothing_huge(kit, tmp_path):
    """max_position_embeddings sizes the RoPE tables: 10^12 must not be a memory bomb."""
    model = copy_model(kit["model"], tmp_path / "m", max_position_embeddings=10**12)
    r = run("generate", model, "--prompt", "the cat", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.output


# ---- D6: config and weights disagree ------------------------------------------------------------------------

@pytest.mark.parametrize("config", [{"hidden_size": 80}, {"intermediate_size": 128}, {"num_key_value_heads": 4},
                                    {"head_dim": 8}])
def test_d6_config_weight_mismatch(kit, tmp_path, out, config):
    model = copy_model(kit["model"], tmp_path / "m", **config)
    refused(run("analyze", model, "-o", out / "a.json"), "config.json does not match the weights")
    refused(run("generate", model, "--prompt", "the cat", "--max-new-tokens", "2"),
            "config.json does not match the weights")
    refused(run("eval", model, "--text", kit["text"], "--ctx", "128", "-o", out / "r.json"),
            "config.json does not match the weights")
    assert listing(out) == set()


def test_d6_vocab_mismatch_caught_by_the_runtime(kit, tmp_path):
    model = copy_model(kit["model"], tmp_path / "m", vocab_size=400)
    refused(run("generate", model, "--prompt", "the cat", "--max-new-tokens", "2"),
            "config.json does not match the weights", "embeddings")


# ---- D7: a plan must cover every projection --------------------------------------------------------------

def test_d7_plan_missing_a_projection(kit, tmp_path, out):
    path = edited_json(kit["calibrated"], tmp_path / "p.json", lambda d: d["projections"].pop(9))
    for args in (["plan", "show", path], ["export", path, "--to", "gemma3n", "-o", out / "g.json"],
                 ["calibrate", kit["model"], path, "--text", kit["text"], "--tokens", "256", "--ctx", "128",
                  "-o", out / "c.json"],
                 ["eval", kit["model"], "--plan", path, "--text", kit["text"], "--ctx", "128", "-o", out / "r.json"],
                 ["report", kit["analysis"], "--plan", path, "-o", out / "rep"]):
        refused(run(*args), "1 of the model's 2 x 7 projections missing", "layers.1.v")
    assert listing(out) == set()


# ---- D8 / D12 / D14: option values -------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["eval", "{m}", "--text", "{t}", "--batch-size", "0"], "--batch-size"),
    (["calibrate", "{m}", "{p}", "--text", "{t}", "--batch-size", "0", "-o", "{o}/c.json"], "--batch-size"),
    (["eval", "{m}", "--text", "{t}", "--tokens", "-10"], "--tokens"),
    (["calibrate", "{m}", "{p}", "--text", "{t}", "--tokens", "-10", "-o", "{o}/c.json"], "--tokens"),
    (["eval", "{m}", "--text", "{t}", "--tokens", "0"], "--tokens"),
    (["sensitivity", "{m}", "{a}", "--tokens", "0", "-o", "{o}/s.json"], "--tokens"),
    (["eval", "{m}", "--text", "{t}", "--ctx", "1"], "--ctx"),
    (["generate", "{m}", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "{m}", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "{m}", "--prompt", "x", "--temperature", "inf"], "--temperature"),
    (["generate", "{m}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "{m}", "--prompt", "x", "--seed", "-3"], "--seed"),
    (["generate", "{m}", "--prompt", "x", "--device", "banana"], "unknown device"),
    (["analyze", "{m}", "--force", "--device", "banana"], "unknown device"),
    (["eval", "{m}", "--text", "{t}", "--device", "cuda:banana"], "--device"),
    (["allocate", "{a}", "--budget", "nan", "-o", "{o}/p.json"], "--budget"),
    (["allocate", "{a}", "--budget", "0.5", "--epsilon", "inf", "-o", "{o}/p.json"], "--epsilon"),
    (["report", "{a}", "--esd-layer", "-1", "-o", "{o}/rep"], "--esd-layer"),
])
def test_d8_d12_bad_option_values(kit, out, args, words):
    fill = {"m": kit["model"], "t": kit["text"], "p": kit["plan"], "a": kit["analysis"], "o": out}
    line = refused(run(*[a.format(**fill) for a in args]), words)
    assert "gives 0 tokens" not in line
    assert listing(out) == set()


def test_d14_too_few_tokens_says_why(kit):
    line = refused(run("eval", kit["model"], "--text", kit["text"], "--tokens", "100", "--ctx", "128"))
    assert "the 100 tokens taken from" in line and "shorter than one context of 128" in line


# ---- D9: sensitivity files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (lambda d: d["projections"].pop(4), ["missing", "layers.0.gate"]),
    (lambda d: d.pop("model"), ["'model' is a required property"]),
    (lambda d: d["model"].pop("fingerprint"), ["'fingerprint' is a required property"]),
    (lambda d: d["projections"][2].update(dnll_80=float("nan")), ["NaN"]),
    (lambda d: d["projections"][2].update(dnll_80="big"), ["$.projections[2].dnll_80"]),
    (lambda d: d["projections"][2].pop("dnll_80"), ["'dnll_80' is a required property"]),
    (lambda d: d["projections"].append(dict(d["projections"][0])), ["appear twice"]),
    (lambda d: d["projections"].append({**d["projections"][0], "key": "layers.9.q", "layer": 9}),
     ["not in the analysis", "layers.9.q"]),
    (lambda d: d["model"].update(fingerprint="sha256:other"), ["different checkpoints"]),
    (lambda d: d.update(projections={}), ["$.projections"]),
])
def test_d9_malformed_measured_sensitivity(kit, tmp_path, out, edit, words):
    path = edited_json(kit["sens"], tmp_path / "s.json", edit)
    refused(run("sensitivity", kit["model"], kit["analysis"], "--measured", path, "-o", out / "a.json"), *words)
    assert listing(out) == set()


def test_d9_a_good_sensitivity_file_still_works(kit, out):
    r = run("sensitivity", kit["model"], kit["analysis"], "--measured", kit["sens"], "-o", out / "a.json")
    assert r.exit_code == 0, r.output
    assert all(row["sensitivity"] > 0 for row in json.loads((out / "a.json").read_text())["projections"])


# ---- D10: analysis documents -------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (lambda d: d["projections"][0].update(layer="abc"), ["$.projections[0].layer", "'abc'"]),
    (lambda d: d["projections"][0].update(alpha="x"), ["$.projections[0].alpha"]),
    (lambda d: d["projections"][1].update(params=7), ["$.projections[1].params"]),
    (lambda d: d["projections"][2].update(kind="mlp"), ["$.projections[2].kind"]),
    (lambda d: d["projections"].pop(3), ["projections missing", "layers.0.o"]),
    (lambda d: d["projections"].append(dict(d["projections"][0])), ["appears twice"]),
    (lambda d: d["model"].update(num_layers="2"), ["$.model.num_layers"]),
    (lambda d: d["model"].update(fingerprint=7), ["$.model.fingerprint"]),
    (lambda d: d["projections"][5].update(stable_rank=float("inf")), ["Infinity is not a JSON number"]),
])
def test_d10_malformed_analysis(kit, tmp_path, out, edit, words):
    path = edited_json(kit["analysis"], tmp_path / "a.json", edit)
    refused(run("allocate", path, "--budget", "0.5", "-o", out / "p.json"), *words)
    refused(run("report", path, "-o", out / "rep"), *words)
    assert listing(out) == set()


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(model=[1]), ["$.model"]),
    (lambda d: d.update(perplexity="5"), ["perplexity"]),
    (lambda d: d.update(plan={"budget": "0.5"}), ["$.plan.budget"]),
    (lambda d: d.update(achieved={"projections": {"key": 1}}), ["$.achieved.projections"]),
    (lambda d: d.update(settings={"ctx": 1.5}), ["$.settings.ctx"]),
])
def test_d10_malformed_eval_results(kit, tmp_path, out, edit, words):
    """Eval results given to report have a schema too (acttail/schemas/eval.schema.json)."""
    good = {"format": "acttail-eval", "version": 1, "perplexity": 5.0, "plan": None,
            "model": {"fingerprint": json.loads(kit["analysis"].read_text())["model"]["fingerprint"]},
            "settings": {"text": "wiki", "ctx": 128, "tokens": 256, "mode": "dense"}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert run("report", kit["analysis"], "--eval", tmp_path / "good.json", "-o", tmp_path / "rep").exit_code == 0
    bad = edited_json(tmp_path / "good.json", tmp_path / "bad.json", edit)
    refused(run("report", kit["analysis"], "--eval", bad, "-o", out / "rep"), *words)
    assert listing(out) == set()


def test_d10_damaged_cache_entry_is_recomputed(tmp_path):
    model = write_tiny_model(tmp_path / "m")
    first = run("analyze", model, "--json")
    for entry in (tmp_path / "cache" / "analysis").glob("*.json"):
        doc = json.loads(entry.read_text())
        doc["projections"][0]["layer"] = "abc"
        entry.write_text(json.dumps(doc))
    r = run("analyze", model)
    assert r.exit_code == 0 and "cached" not in r.output
    assert json.loads(run("analyze", model, "--json").output)["projections"] == \
        json.loads(first.output)["projections"]


# ---- D11: convert-gguf outputs ----------------------------------------------------------------------------

@pytest.fixture
def fake_gguf(monkeypatch):
    """convert_gguf's reading steps replaced by a tiny model, so that only its output handling runs."""
    import acttail.convert as C

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}
    monkeypatch.setattr(C, "check_architecture", lambda path: None)
    monkeypatch.setattr(C, "open_gguf", lambda path: object())
    monkeypatch.setattr(C, "hf_config", lambda reader: dict(config))
    monkeypatch.setattr(C, "hf_tokenizer", lambda reader: ("{}", {"add_bos_token": False}))
    monkeypatch.setattr(C, "hf_tensors", lambda reader, cfg: {"w": torch.zeros(2, 2)})
    return C


def test_d11_convert_into_a_file_or_a_full_folder(tmp_path, out, fake_gguf):
    (out / "file").write_text("x")
    (out / "full").mkdir()
    (out / "full" / "keep.txt").write_text("y")
    before = listing(out)
    refused(run("convert-gguf", tmp_path / "m.gguf", out / "file"), "exists and is not a folder")
    refused(run("convert-gguf", tmp_path / "m.gguf", out / "full"), "exists and is not empty")
    assert listing(out) == before
    (out / "empty").mkdir()
    r = run("convert-gguf", tmp_path / "m.gguf", out / "empty")
    assert r.exit_code == 0, r.output
    assert {p.name for p in (out / "empty").iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                                          "tokenizer_config.json", "generation_config.json"}


@pytest.mark.parametrize("winner", ["folder", "file"])
def test_d11_losing_a_convert_race(tmp_path, out, fake_gguf, monkeypatch, winner):
    """Another convert fills the target while this one works: a clear error, the winner's files kept,
    no temporary folder left."""
    target = out / "model"

    def other_run_wins(reader, cfg):
        if winner == "folder":
            target.mkdir()
            (target / "model.safetensors").write_text("the other run's")
        else:
            target.write_text("a file")
        return {"w": torch.zeros(2, 2)}

    monkeypatch.setattr(fake_gguf, "hf_tensors", other_run_wins)
    refused(run("convert-gguf", tmp_path / "m.gguf", target), "while it was written")
    assert listing(out) == ({"model", "model/model.safetensors"} if winner == "folder" else {"model"})


# ---- D14: messages that name the real problem ------------------------------------------------------------

def test_d14_nan_weights_without_a_plan_do_not_blame_a_plan(kit, tmp_path, out):
    model = shutil.copytree(kit["model"], tmp_path / "m")
    poke(model / "model.safetensors", "model.layers.1.mlp.down_proj.weight", float("nan"))
    line = refused(run("eval", model, "--text", kit["text"], "--ctx", "128", "-o", out / "r.json"), "NaN")
    assert "the plan" not in line and "model.layers.1.mlp.down_proj.weight" in line
    assert listing(out) == set()


def test_d14_overflowing_dense_model_does_not_blame_a_plan(kit):
    from acttail.runtime import open_model
    from acttail.runtime.perplexity import perplexity

    _, model = open_model(kit["model"])
    with torch.no_grad():
        model.norm.weight.fill_(float("inf"))
    wins = torch.randint(0, 300, (1, 16))
    with pytest.raises(ActTailError, match="dense, without a plan"):
        perplexity(model, wins, progress=False)


# ---- D15: no silent success ---------------------------------------------------------------------------------

def test_d15_generate_on_nan_weights_is_an_error(kit, tmp_path):
    model = shutil.copytree(kit["model"], tmp_path / "m")
    poke(model / "model.safetensors", "model.layers.0.self_attn.q_proj.weight", float("nan"), index=11)
    refused(run("generate", model, "--prompt", "the cat", "--max-new-tokens", "3"), "NaN")


def test_d15_sampling_refuses_non_finite_logits():
    from acttail.runtime.generate import sample

    with pytest.raises(ActTailError, match="NaN or infinite logits"):
        sample(torch.tensor([[0.0, float("nan"), 1.0]]), 0.0, None)
    tiny = sample(torch.tensor([[0.0, 30.0, 1.0]]), 1e-30, torch.Generator().manual_seed(0))  # no overflow
    assert tiny.tolist() == [1]


def test_d15_report_with_other_weights_is_an_error(kit, tmp_path, out):
    other = tmp_path / "other"
    write_hf_model(other, "llama", layers=2, seed=99, scale=0.3)
    refused(run("report", kit["analysis"], "--model", other, "-o", out / "rep"), "holds other weights")
    assert listing(out) == set()
    r = run("report", kit["analysis"], "--model", kit["model"], "-o", out / "rep")
    assert r.exit_code == 0, r.output
    assert any(p.name.startswith("esd") for p in (out / "rep" / "figures").iterdir())


# ---- D16: shard paths stay inside the model folder ----------------------------------------------------------

def _sharded(kit, tmp_path) -> Path:
    model = shutil.copytree(kit["model"], tmp_path / "m")
    names = read_header(model / "model.safetensors")[1]
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names if n != "__metadata__"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize("shard", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_d16_shard_names_outside_the_folder(kit, tmp_path, shard):
    model = _sharded(kit, tmp_path)
    idx = json.loads((model / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = shard
    (model / "model.safetensors.index.json").write_text(json.dumps(idx))
    line = refused(run("analyze", model), "outside the model folder")
    assert "root:x" not in line


def test_d16_symlinked_shard_pointing_outside(kit, tmp_path):
    model = _sharded(kit, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 10)
    (model / "evil.safetensors").symlink_to(secret)
    idx = json.loads((model / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "evil.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(idx))
    line = refused(run("analyze", model), "links outside the model folder")
    assert "root:x" not in line and "/bin/bash" not in line


def test_d16_header_errors_never_echo_file_bytes(tmp_path):
    model = write_tiny_model(tmp_path / "m")
    content = b"root:x:0:0:root:/root:/bin/bash\n" * 10
    (model / "model.safetensors").write_bytes(content)
    line = refused(run("analyze", model), "corrupt or truncated")
    assert str(struct.unpack("<Q", content[:8])[0]) not in line and "root:x" not in line


def test_d16_hf_hub_cache_layout_still_opens(kit, tmp_path):
    """Snapshot folders of an HF hub cache are links into ../../blobs: that stays allowed."""
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in kit["model"].iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    names = read_header(kit["model"] / "model.safetensors")[1]
    (repo / "blobs" / "index").write_text(json.dumps(
        {"weight_map": {n: "model.safetensors" for n in names if n != "__metadata__"}}))
    (snap / "model.safetensors.index.json").symlink_to(Path("..") / ".." / "blobs" / "index")
    assert Checkpoint.open(snap).fingerprint == Checkpoint.open(kit["model"]).fingerprint


# ---- D17: the speed claim names the peer's configuration -------------------------------------------------

def test_d17_speed_claims_agree_with_the_benchmark_report():
    root = Path(__file__).resolve().parents[1]
    report = (root / "reports" / "esd-benchmark.md").read_text()
    readme = (root / "README.md").read_text()
    rows = re.findall(r"^\| (SmolLM2-135M|7B-shaped, 1 layer)[^|]*\| ([\d.]+) s \| ([\d.]+) s \| ([\d.]+)x \|",
                      report, re.M)
    current = rows[:2]  # the first table: the peer in its fastest configuration
    assert [r[0] for r in current] == ["SmolLM2-135M", "7B-shaped, 1 layer"]
    for _, ours, theirs, ratio in current:
        assert float(ratio) == pytest.approx(float(theirs) / float(ours), rel=0.04)  # seconds are rounded
        assert f"{ratio}x" in readme  # README quotes these ratios, not older ones
    head = report.split("| workload")[0]
    assert re.search(r"weightwatcher 0\.7\.7", head) and re.search(r"powerlaw 2\.\d", head)
    assert "13.9x" not in readme and "9.5x" not in readme
    assert "benchmarks/esd_speed.py" in report


def test_d17_benchmark_records_versions():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "esd_speed.py"
    spec = importlib.util.spec_from_file_location("esd_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    line = mod.versions()
    assert re.search(r"weightwatcher \S+, powerlaw \S+", line) and "torch " in line


# ---- what must keep holding: Ctrl-C, concurrent analyses ---------------------------------------------------

def test_ctrl_c_exits_130_and_leaves_nothing(kit, out, monkeypatch):
    import acttail.analysis

    def interrupted(doc):
        raise KeyboardInterrupt

    monkeypatch.setattr(acttail.analysis, "to_csv", interrupted)  # while the outputs are being written
    r = run("analyze", kit["model"], "-o", out / "a.json", "--csv", out / "a.csv")
    assert r.exit_code == 130 and "interrupted" in r.output
    assert listing(out) == set()


def test_concurrent_analyses_of_one_model(tmp_path):
    model = write_tiny_model(tmp_path / "m", hidden=96, inter=160)
    env = {**os.environ, "ACTTAIL_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "acttail.cli", "analyze", str(model), "-o",
                               str(tmp_path / f"a{i}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stdout.read().decode()
    docs = [json.loads((tmp_path / f"a{i}.json").read_text()) for i in range(3)]
    assert docs[0]["projections"] == docs[1]["projections"] == docs[2]["projections"]
    assert all(math.isfinite(r["alpha"]) for r in docs[0]["projections"])
    assert run("analyze", model).output.count("cached") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
