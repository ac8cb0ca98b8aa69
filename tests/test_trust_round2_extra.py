"""Issue 21 ("Trust, round two"), the hostile cases the first round of tests did not try, on the tiny random
models of tests/test_trust_inputs.py (its ``kit``): outputs onto a model folder the command does not read, a
report over a folder of other files, two plans sharing one tensors file (plan-0.5 and plan-0.6), token ids that
are no tensor of integers, analyses and plans edited to other shapes, negative score weights, two threads
applying plans to one model at once, and what a broken cache or a full disk under it does. Every refusal is one
line (``acttail: error: ...``, exit 2; ActTailError in the API) and leaves the inputs byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

import acttail
from acttail.errors import ActTailError
from acttail.plan import Plan
from test_trust_inputs import VOCAB, kit, refused, run, write_plan  # noqa: F401  (kit: a module fixture)
from test_trust_outputs import full_disk, snapshot

transformers = pytest.importorskip("transformers")
SMALL = ["--tokens", "256", "--ctx", "64"]


@pytest.fixture(autouse=True)
def _cache(kit, monkeypatch):  # noqa: F811
    monkeypatch.setenv("ACTTAIL_CACHE", str(kit["root"] / "cache"))


@pytest.fixture(scope="module")
def files(kit):  # noqa: F811
    """The kit's analysis and its uniform plan as files (beside the kit's model, plans and texts)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTTAIL_CACHE", str(kit["root"] / "cache"))
        analysis = kit["root"] / "analysis.json"
        acttail.analyze(kit["model"], progress=False, out=analysis)
    return {**kit, "analysis": analysis}


@pytest.fixture
def model(kit, tmp_path):  # noqa: F811
    """A copy of the kit's model folder that a test may point outputs at."""
    return shutil.copytree(kit["model"], tmp_path / "model")


def no_work(monkeypatch):
    """Every long stage replaced by a failure: a refusal must come before any of it."""
    import acttail.api as api
    import acttail.report as report

    def boom(*a, **k):
        raise AssertionError("work started before the outputs were checked")

    for mod, name in ((api, "calibrate_windows"), (api, "evaluate_windows"), (report, "draw_figures")):
        monkeypatch.setattr(mod, name, boom)


# ---- class 1: no output replaces a model's files, read by the command or not ---------------------------------

def test_outputs_onto_a_model_folder_the_command_does_not_read(files, model, tmp_path, monkeypatch):
    """allocate and export read no model, but -o MODEL/config.json would still leave that model unreadable:
    refused, also through a symlinked folder, a relative spelling and the API."""
    (tmp_path / "link").symlink_to(model)
    a, p = files["analysis"], files["plan"]
    before = {**snapshot(tmp_path), "a": a.read_bytes(), "p": p.read_bytes()}
    refused(run("allocate", a, "--budget", "0.5", "-o", model / "config.json"), "a file of the model folder")
    refused(run("allocate", a, "--budget", "0.5", "-o", tmp_path / "link" / "tokenizer.json"), "model folder")
    refused(run("export", p, "--to", "gemma3n", "-o", model / "config.json"), "config.json", "model folder")
    refused(run("export", p, "--to", "nncf", "-o", model / "model.safetensors"), "model.safetensors")
    refused(run("export", p, "--to", "teal", "-o", model), "not a TEAL lookup folder")
    monkeypatch.chdir(model)
    refused(run("export", p, "--to", "nncf", "-o", "./tokenizer.json"), "model folder")
    with pytest.raises(ActTailError, match="a file of the model folder"):
        acttail.export_plan(p, "gemma3n", model / "config.json")
    with pytest.raises(ActTailError, match="a file of the model folder"):
        acttail.allocate(a, 0.5, method="uniform", out=model / "generation_config.json")
    assert {**snapshot(tmp_path), "a": a.read_bytes(), "p": p.read_bytes()} == before
    r = run("export", p, "--to", "gemma3n", "-o", model / "gemma3n.json")  # a new name in the folder is fine
    assert r.exit_code == 0, r.output
    (model / "gemma3n.json").unlink()


def test_relative_and_absolute_spellings_of_one_input(files, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(files["analysis"], tmp_path / "a.json")
    before = snapshot(tmp_path)
    refused(run("analyze", "model", "-o", model / "config.json"), "an input")
    refused(run("analyze", model, "-o", "./model/../model/model.safetensors"), "an input")
    refused(run("allocate", "a.json", "--budget", "0.5", "-o", tmp_path / "a.json"), "the analysis")
    refused(run("analyze", "model", "-o", "x.json", "--csv", str(tmp_path / "x.json")), "same file")
    assert snapshot(tmp_path) == before


def test_a_report_never_deletes_a_figures_folder_of_other_files(files, tmp_path, monkeypatch):
    """The report replaces DIR/figures whole: a folder holding anything but an earlier report's PNG and SVG
    files and a file browser's .DS_Store (or a file named figures) is refused before any figure is drawn; an
    earlier report's is taken."""
    no_work(monkeypatch)
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "thesis.docx").write_text("months of work")
    before = snapshot(tmp_path)
    refused(run("report", files["analysis"], "-o", out), "holds thesis.docx", "choose another output folder")
    shutil.rmtree(out / "figures")
    (out / "figures").write_text("a file")
    refused(run("report", files["analysis"], "-o", out), "is a file")
    (out / "figures").unlink()
    assert snapshot(tmp_path) == {k: v for k, v in before.items() if "figures" not in k}
    (out / "figures").mkdir()
    for name in ("alpha_heatmap.png", "alpha_heatmap.svg", ".DS_Store"):  # and what a file browser left there
        (out / "figures" / name).write_bytes(b"an earlier report's")
    with pytest.raises(AssertionError, match="work started"):  # past every check: the drawing comes next
        acttail.write_report(files["analysis"], out)


def test_convert_gguf_into_the_ggufs_own_folder(tmp_path, monkeypatch):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF")
    (folder / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    monkeypatch.chdir(folder)
    refused(run("convert-gguf", "m.gguf", "."), "holds the GGUF file", "an input")
    refused(run("convert-gguf", folder / "m.gguf", "../g"), "holds the GGUF file")
    assert snapshot(tmp_path) == before


# ---- classes 1 and 2: a plan's tensors file is its own ---------------------------------------------------------

def test_a_plan_never_takes_another_plans_tensors_file(kit, tmp_path):  # noqa: F811
    """plan-0.5 and plan-0.6 both have plan-0.safetensors beside them (as x.json and x.yaml have x.safetensors):
    saving the second would leave the first one's sha256 unmatched, so it is refused; the first still loads."""
    learned = Plan.load(kit["learned"])
    other = Plan.load(kit["learned"])
    other.tensors = {k: t + 1.0 for k, t in other.tensors.items()}
    learned.save(tmp_path / "plan-0.5")
    learned.save(tmp_path / "x.json")
    before = snapshot(tmp_path)
    for name, owner in (("plan-0.6", "plan-0.5"), ("x.yaml", "x.json")):
        with pytest.raises(ActTailError, match=f"is that of plan .*{owner}.*name of its own") as e:
            other.save(tmp_path / name)
        assert "\n" not in str(e.value)
        line = refused(run("calibrate", kit["model"], kit["plan"], "--text", kit["a"], *SMALL, "--steps", "1",
                           "-o", tmp_path / name), f"is that of plan {tmp_path / owner}")
        assert f"{name}.json" in line  # the name to use instead
    assert snapshot(tmp_path) == before
    assert Plan.load(tmp_path / "plan-0.5") == learned and Plan.load(tmp_path / "x.json") == learned
    other.save(tmp_path / "plan-0.5")  # its own pair is replaced as before
    assert Plan.load(tmp_path / "plan-0.5") == other
    stale = tmp_path / "s.safetensors"  # a tensors file no plan names (left by an earlier save): replaced
    stale.write_bytes(b"stale")
    (tmp_path / "s.txt").write_text("not a plan")
    other.save(tmp_path / "s.json")
    assert Plan.load(tmp_path / "s.json") == other


def test_a_folder_where_the_tensors_file_goes_is_refused_before_the_work(files, tmp_path, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "x.safetensors").mkdir()
    refused(run("calibrate", files["model"], files["plan"], "--text", files["a"], *SMALL, "-o", tmp_path / "x.json"),
            "x.safetensors is a folder")
    refused(run("tune", files["model"], files["analysis"], "--text", files["a"], "-o",
                tmp_path / "y.safetensors"), "its own tensors file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


# ---- class 6: token ids that are no tensor of integers -------------------------------------------------------

@pytest.mark.parametrize("ids, words", [
    ([[1, 2], [3]], "cannot read the list given"),  # ragged
    ([[1, -2], [3, 4]], "id -2"),
    (["a", "b"], "cannot read the list given"),
    (None, "cannot read the NoneType given"),
    ([2 ** 70], "cannot read the list given"),
    ({"ids": [1]}, "cannot read the dict given"),
    (torch.empty(8, dtype=torch.long, device="meta"), "meta tensor"),
    (torch.tensor([3, 1000], dtype=torch.uint16), "id 1000"),
    (torch.tensor([3, 2 ** 40], dtype=torch.uint64), "id 1099511627776"),
])
def test_token_ids_that_are_no_tensor_of_integers(kit, ids, words):  # noqa: F811
    from acttail.runtime.generate import generate
    from acttail.runtime.tokens import check_ids

    with pytest.raises(ActTailError, match=words):
        check_ids(ids, VOCAB)
    with pytest.raises(ActTailError, match=words):
        generate(acttail.load(kit["model"]), ids, 2)


def test_token_ids_at_the_verbs(kit):  # noqa: F811
    ours = acttail.load(kit["model"])
    for dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no min/max of these: read as wider ints
        ids = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(0)).to(dtype)
        r = acttail.evaluate(ours, ids, tokens=256, ctx=64, progress=False)
        assert r["predictions"] == 4 * 63
    nested = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(1))
    nested[1, 7] = -3
    for call in (lambda: acttail.evaluate(ours, nested, tokens=400, ctx=64, progress=False),
                 lambda: acttail.calibrate(ours, Plan.load(kit["plan"]), nested, tokens=400, ctx=64,
                                           compensation="none", progress=False)):
        with pytest.raises(ActTailError, match="id -3"):
            call()
    with pytest.raises(ActTailError, match="a text is a name"):  # nested lists are no text
        acttail.evaluate(ours, [[1, -2, 3]], tokens=256, ctx=64, progress=False)
    with pytest.raises(ActTailError, match="a prompt is a string, not Tensor"):
        acttail.generate(ours, torch.tensor([1, -5]), max_new_tokens=2)


# ---- class 4: a FIFO where acttail.load expects the tokenizer ---------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_acttail_load_refuses_a_fifo_tokenizer(model):
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    with pytest.raises(ActTailError, match="tokenizer .* is a FIFO"):  # not a model without a tokenizer
        acttail.load(model)


# ---- class 7: analyses and plans edited to other shapes, keeping their fingerprint --------------------------

def test_an_edited_analysis_is_refused_where_the_model_is_opened(files, tmp_path, monkeypatch):
    doc = json.loads(files["analysis"].read_text())
    row = doc["projections"][0]
    row["in_features"] *= 1000
    row["params"] = row["in_features"] * row["out_features"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    m, t = files["model"], files["a"]
    words = ["layers.0.q is (64, 64) (in, out) in the model but (64000, 64) in the analysis"]
    refused(run("greedy", m, bad, "--text", t, *SMALL, "-o", tmp_path / "g.json"), *words)
    refused(run("sensitivity", m, bad, "--text", t, *SMALL, "-o", tmp_path / "s.json"), *words)
    refused(run("tune", m, bad, "--text", t, "--tokens", "128", "--held-tokens", "128", "--ctx", "64", "--method",
                "uniform", "-o", tmp_path / "t.json"), *words)
    with pytest.raises(ActTailError, match="in the analysis"):
        acttail.measure_sensitivity(acttail.load(m), bad, torch.zeros(256, dtype=torch.long), tokens=128, ctx=64)
    plan = acttail.allocate(bad, 0.5, method="uniform", out=tmp_path / "p.json")  # allocate reads no model
    assert plan.projections[0].in_features == 64000
    no_work(monkeypatch)
    refused(run("report", files["analysis"], "--plan", tmp_path / "p.json", "-o", tmp_path / "r"),
            "layers.0.q is (64000, 64) (in, out) in the plan but (64, 64) in the analysis")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "p.json"]


# ---- class 8: score weights are never negative -------------------------------------------------------------

def test_negative_score_weights_are_refused(kit, tmp_path):  # noqa: F811
    plan = Plan.load(kit["learned"])
    doc = plan.to_dict()
    doc["score"] = "weight"
    tensors = dict(plan.tensors)
    tensors.update({f"{e.key}.score": torch.ones(e.in_features) for e in plan.projections})
    tensors["layers.1.v.score"] = -torch.ones(64)  # would rank the largest inputs lowest
    path = write_plan(doc, tensors, tmp_path / "neg.json")
    with pytest.raises(ActTailError, match="layers.1.v.score holds negative score weights"):
        Plan.load(path)
    refused(run("eval", kit["model"], "--plan", path, "--text", kit["b"], *SMALL), "negative score weights")
    tensors["layers.1.v.score"] = torch.zeros(64)  # a dead channel's weight norm is 0: allowed
    assert Plan.load(write_plan(doc, tensors, tmp_path / "zero.json")).score == "weight"


# ---- class 12: what a plan says of itself -----------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (lambda d: d["projections"][0].update(params=5), "params: not in_features x out_features"),
    (lambda d: d.update(version=1.0), "plan version 1.0"),  # equal to 1 in Python: refused as a version
    (lambda d: d["projections"][0].update(key="layers.1.q"), "does not match its layer and kind"),
    (lambda d: d["projections"].append(dict(d["projections"][0])), "appears twice"),
])
def test_more_self_contradicting_plans(kit, tmp_path, edit, words):  # noqa: F811
    doc = json.loads(kit["plan"].read_text())
    edit(doc)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    refused(run("plan", "show", tmp_path / "p.json"), words)


# ---- class 13: two threads applying plans to one model at once -----------------------------------------------

@pytest.mark.parametrize("which", ["ours", "transformers"])
def test_two_threads_applying_plans_to_one_model_at_once(kit, monkeypatch, which):  # noqa: F811
    """Both threads pass the 'already applied?' check before either registers its handle (held there by a
    barrier): one is refused, and once the other's handle is removed the model is dense again (it stayed
    sparse with the first thread's plan, whose handle was gone)."""
    import acttail.runtime as runtime
    import acttail.runtime.hf as hf

    model = acttail.load(kit["model"]) if which == "ours" else kit["hf"]
    plan = Plan.load(kit["plan"])
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))

    def logits():
        with torch.no_grad():
            out = model(ids)
        return out if torch.is_tensor(out) else out.logits

    dense = logits()
    barrier = threading.Barrier(2, timeout=30)
    module, name = (runtime, "plan_sparsifier") if which == "ours" else (hf, "settings")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (barrier.wait(), real(*a, **k))[1])
    handles, errors = [], []

    def apply():
        try:
            handles.append(acttail.apply(model, plan, mode="topk"))
        except ActTailError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=apply) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(handles) == 1 and errors == ["a plan is already applied to this model: remove() it first"]
    assert not torch.equal(logits(), dense)
    handles[0].remove()
    assert acttail.runtime.applied.applied(model) is None and torch.equal(logits(), dense)


# ---- classes 5, 9 and 10: the cache broken or full ---------------------------------------------------------

def test_a_broken_or_full_cache_costs_a_recomputation_not_the_result(tmp_path, monkeypatch, model):
    from acttail import analysis
    from acttail.checkpoint import Checkpoint

    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sha256").write_text("a file where the hash memos go")
    entry = analysis.cache_path(Checkpoint.open(model), analysis.settings(device="cpu"))
    entry.mkdir(parents=True)  # a folder where the entry goes
    r = run("analyze", model, "-o", tmp_path / "a.json")
    assert r.exit_code == 0 and "cached" not in r.output, r.output
    entry.rmdir()
    entry.symlink_to("/dev/zero")  # an endless entry
    r = run("analyze", model, "-o", tmp_path / "b.json")
    assert r.exit_code == 0 and "cached" not in r.output, r.output
    assert json.loads((tmp_path / "a.json").read_text())["projections"] == json.loads(
        (tmp_path / "b.json").read_text())["projections"]
    entry.unlink()
    with pytest.MonkeyPatch.context() as mp:
        full_disk(mp, tmp_path / "cache", 0)
        r = run("analyze", model, "--force", "-o", tmp_path / "c.json")
    assert r.exit_code == 0 and (tmp_path / "c.json").is_file(), r.output
    monkeypatch.setenv("ACTTAIL_CACHE", "/dev/null")
    refused(run("analyze", model), "ACTTAIL_CACHE=/dev/null is not a folder")


# ---- slow but correct: a plan is validated once per save -----------------------------------------------------

def test_a_plan_is_validated_once_per_save(kit, tmp_path):  # noqa: F811
    """Validating 10^5 projections takes seconds (the JSON Schema check): save does it once, not twice."""
    import acttail.plan as plan_module

    learned, calls, real = Plan.load(kit["learned"]), [], plan_module.validate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "validate", lambda doc, where="plan": (calls.append(where), real(doc, where))[1])
        learned.save(tmp_path / "p.json")
    assert len(calls) == 1
    assert Plan.load(tmp_path / "p.json") == learned


def test_two_plans_saved_at_once_never_share_a_tensors_file(kit, tmp_path, monkeypatch):  # noqa: F811
    """plan-0.5 and plan-0.6 saved by two threads at the same moment (both past the early check before either
    has written): the second to take the folder lock is refused there, and the plan on disk still loads."""
    from acttail import outputs

    learned = Plan.load(kit["learned"])
    other = Plan.load(kit["learned"])
    other.tensors = {k: t + 1.0 for k, t in other.tensors.items()}
    written = outputs._written_temp
    for round_ in range(5):
        folder = tmp_path / str(round_)
        folder.mkdir()
        both_written = threading.Barrier(2)

        def slowed(path, data):
            tmp = written(path, data)
            if path.suffix == ".safetensors":
                both_written.wait(timeout=30)  # each thread has its temporary sidecar: both passed the early check
            return tmp

        monkeypatch.setattr(outputs, "_written_temp", slowed)
        errors = []

        def save(plan, name):
            try:
                plan.save(folder / name)
            except ActTailError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=save, args=a) for a in ((learned, "plan-0.5"), (other, "plan-0.6"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 1 and "name of its own" in errors[0]
        saved = [p for p in folder.iterdir() if not p.name.endswith(".safetensors")]
        assert len(saved) == 1 and Plan.load(saved[0]) in (learned, other)
