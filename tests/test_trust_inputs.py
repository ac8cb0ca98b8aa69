"""Issue 21 ("Trust, round two"): every lying input refused, on fixtures made here from tiny random models.

Class 6: token ids outside the vocabulary (or not integers) at every entry point. Class 7: a plan's layer count
and shapes checked against the model on every path that runs it. Class 8: a plan's tensors file holds exactly
what its score and compensation declare. Class 12: self-contradicting plans. Class 13: concurrent evaluations
of one applied model each measure their own run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save as to_bytes

import acttail
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.plan import Plan
from acttail.runtime.tokens import load_tokenizer
from conftest import write_tiny_model
from runtime_tiny import write_hf_model, write_text

transformers = pytest.importorskip("transformers")
VOCAB = 320  # runtime_tiny's models and tokenizers


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(r, *words):
    """Exit 2 with one line 'acttail: error: ...' naming ``words`` (progress bars of earlier work aside)."""
    lines = [ln for ln in r.output.strip().splitlines() if not re.search(r": +\d+%\|", ln)]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("acttail: error:"), r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def needs_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on the CPU under TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny Llama (vocab 320) with its tokenizer, two texts, an uncalibrated plan and one calibrated with
    learned biases (a few steps)."""
    root = tmp_path_factory.mktemp("trust2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTTAIL_CACHE", str(root / "cache"))
        model = root / "model"
        hf = write_hf_model(model, "llama", layers=2, seed=5, scale=0.3)
        k = {"root": root, "model": model, "hf": hf, "a": write_text(root / "a.txt", 3000, seed=1),
             "b": write_text(root / "b.txt", 3000, seed=2), "plan": root / "plan.json",
             "learned": root / "learned.json"}
        plan = acttail.allocate(acttail.analyze(model, progress=False), 0.5, method="uniform")
        plan.save(k["plan"])
        cal = acttail.calibrate(model, plan, k["a"], tokens=512, ctx=64, steps=2, progress=False)
        assert cal.compensation == "learned" and len(cal.tensors) == 14
        cal.save(k["learned"])
        yield k


@pytest.fixture(autouse=True)
def _cache(kit, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(kit["root"] / "cache"))


def write_plan(doc: dict, tensors: dict | None, path):
    """A plan file as given (no validation) and, with ``tensors``, its tensors file named with its sha256."""
    doc = json.loads(json.dumps(doc))
    if tensors is not None:
        data = to_bytes(tensors)
        st = path.with_suffix(".safetensors")
        st.write_bytes(data)
        doc["tensors"] = {"file": st.name, "sha256": hashlib.sha256(data).hexdigest()}
    else:
        doc["tensors"] = None
    path.write_text(json.dumps(doc))
    return path


# ---- class 6: token ids inside the vocabulary, integers only ---------------------------------------------


@pytest.fixture(scope="module")
def small_vocab(kit):
    """A model of vocabulary 128 beside the 320-token tokenizer of another model."""
    folder = write_tiny_model(kit["root"] / "small-vocab", vocab=128)
    shutil.copy(kit["model"] / "tokenizer.json", folder / "tokenizer.json")
    return folder


def test_6_cli_eval_and_generate_with_a_larger_tokenizer(small_vocab, kit, tmp_path):
    out = tmp_path / "r.json"
    refused(run("eval", small_vocab, "--text", kit["a"], "--tokens", 256, "--ctx", 64, "-o", out),
            "outside the model's vocabulary of 128", "tokenizer")
    assert not out.exists()
    refused(run("generate", small_vocab, "--prompt", "the cat sat on the mat", "--max-new-tokens", 4),
            "outside the model's vocabulary of 128")


@pytest.mark.parametrize("bad, words", [
    (lambda: torch.tensor([5] * 200 + [VOCAB]), [f"id {VOCAB}", "vocabulary of 320"]),
    (lambda: torch.tensor([5] * 200 + [-1]), ["id -1"]),
    (lambda: torch.full((256,), 7.9), ["must be integers, not float32"]),
    (lambda: torch.ones(256, dtype=torch.bool), ["must be integers, not bool"]),
])
def test_6_api_token_ids(kit, bad, words):
    ours = acttail.load(kit["model"])
    plan = Plan.load(kit["plan"])
    for call in (lambda: acttail.evaluate(ours, bad(), tokens=256, ctx=64, progress=False),
                 lambda: acttail.evaluate(kit["hf"], bad(), tokens=256, ctx=64, progress=False),
                 lambda: acttail.calibrate(ours, plan, bad(), tokens=256, ctx=64, compensation="none",
                                           progress=False),
                 lambda: acttail.calibrate(kit["model"], plan, bad(), tokens=256, ctx=64, compensation="none",
                                           progress=False)):
        with pytest.raises(ActTailError) as e:
            call()
        assert all(w in str(e.value) for w in words), str(e.value)
    ok = acttail.evaluate(ours, torch.randint(0, VOCAB, (256,), dtype=torch.int32), tokens=256, ctx=64,
                          progress=False)
    assert ok["predictions"] == 4 * 63  # integer ids of another width are taken


def test_6_a_text_that_is_neither_strings_nor_ids(kit):
    with pytest.raises(ActTailError, match="a text is a name"):
        acttail.evaluate(acttail.load(kit["model"]), [1, 2, 3], tokens=256, ctx=64, progress=False)


def test_6_reference_generation_checks_its_prompt(kit):
    from acttail.runtime.generate import generate

    ours = acttail.load(kit["model"])
    for bad, words in ((torch.tensor([3, VOCAB + 5]), f"id {VOCAB + 5}"), (torch.tensor([-2, 3]), "id -2"),
                       (torch.tensor([3.0, 4.0]), "not float32"), (torch.tensor([], dtype=torch.long), "empty")):
        with pytest.raises(ActTailError, match=words):
            generate(ours, bad, 3)
    assert len(generate(ours, torch.tensor([3, 4]), 3)) == 3


def test_6_decoder_generate_checks_input_ids(kit):
    needs_interpreter()
    dec = acttail.decoder(acttail.load(kit["model"]), device="cpu", max_seq=32)
    for bad, words in ((torch.tensor([[3, VOCAB]]), f"id {VOCAB}"), (torch.tensor([[-1, 3]]), "id -1"),
                       (torch.tensor([[3.0, 4.0]]), "integer token ids")):
        with pytest.raises(ActTailError, match=words):
            dec.generate(bad, max_new_tokens=2)
    assert dec.generate(torch.tensor([[3, 4]]), max_new_tokens=2).shape == (1, 4)


# ---- class 7: a plan's layer count and shapes against the model, on every path -----------------------------


def _edited_plan(kit, path, how: str) -> Path:
    """The uncalibrated plan (same fingerprint) lying about the model: in_features x1000, in/out swapped on
    every entry, or more layers than the model has."""
    doc = json.loads(kit["plan"].read_text())
    rows = doc["projections"]
    if how == "x1000":
        rows[0]["in_features"] *= 1000
    elif how == "swapped":
        for r in rows:
            r["in_features"], r["out_features"] = r["out_features"], r["in_features"]
    else:  # five layers for a two-layer model
        doc["model"]["num_layers"] = 5
        rows += [{**r, "layer": r["layer"] + 2 * j, "key": f"layers.{r['layer'] + 2 * j}.{r['kind']}"}
                 for j in (1, 2) for r in list(rows) if r["layer"] + 2 * j < 5]
    for r in rows:
        r["params"] = r["in_features"] * r["out_features"]
    path.write_text(json.dumps(doc))
    return path


SHAPE_WORDS = {"x1000": ["layers.0.q", "in the plan"], "swapped": ["in the model but"], "layers": ["5 layers", "has 2"]}


@pytest.mark.parametrize("how", ["x1000", "swapped", "layers"])
def test_7_cli_paths_refuse_a_plan_of_other_shapes(kit, tmp_path, how):
    bad = _edited_plan(kit, tmp_path / "bad.json", how)
    words = SHAPE_WORDS[how]
    refused(run("calibrate", kit["model"], bad, "--text", kit["a"], "--tokens", 256, "--ctx", 64,
                "--compensation", "none", "-o", tmp_path / "cal.json"), *words)
    refused(run("eval", kit["model"], "--plan", bad, "--mode", "topk", "--text", kit["b"], "--tokens", 256,
                "--ctx", 64, "-o", tmp_path / "r.json"), *words)
    refused(run("generate", kit["model"], "--plan", bad, "--mode", "topk", "--prompt", "the cat"), *words)
    assert not (tmp_path / "cal.json").exists() and not (tmp_path / "r.json").exists()


def test_7_generate_on_the_kernel_backend_refuses_it(kit, tmp_path):
    needs_interpreter()
    bad = _edited_plan(kit, tmp_path / "bad.json", "swapped")
    refused(run("generate", kit["model"], "--plan", bad, "--mode", "topk", "--backend", "kernels", "--prompt",
                "the cat"), "in the model but")


@pytest.fixture(scope="module")
def other_plan(kit):
    """A plan of a model with other shapes (hidden 32, intermediate 48), and that model's analysis."""
    other = kit["root"] / "other"
    write_hf_model(other, "llama", layers=2, seed=1, hidden=32, inter=48)
    analysis = acttail.analyze(other, progress=False)
    return acttail.allocate(analysis, 0.5, method="uniform"), analysis


def test_7_api_paths_refuse_a_plan_of_other_shapes(kit, other_plan):
    plan, analysis = other_plan
    ours = acttail.load(kit["model"])
    ids = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(0))
    calls = {
        "apply": lambda: acttail.apply(ours, plan, mode="topk"),
        "evaluate": lambda: acttail.evaluate(ours, ids, plan=plan, mode="topk", tokens=256, ctx=64, progress=False),
        "calibrate": lambda: acttail.calibrate(ours, plan, ids, tokens=256, ctx=64, compensation="none",
                                               progress=False),
        "tune": lambda: acttail.tune(ours, analysis, ids, tokens=256, held_tokens=256, ctx=64, compensation="none",
                                     method="uniform", progress=False),
        "generate": lambda: acttail.generate(ours, "the cat", plan=plan, mode="topk", max_new_tokens=2),
        "hf apply": lambda: acttail.apply(kit["hf"], plan, mode="topk"),
    }
    for name, call in calls.items():
        with pytest.raises(ActTailError, match=r"in the model but|layers"):
            call()
    assert acttail.runtime.applied.applied(ours) is None  # nothing half-applied


def test_7_the_decoder_refuses_it_before_laying_out_weights(kit, other_plan):
    needs_interpreter()
    plan, _ = other_plan
    ours = acttail.load(kit["model"])
    with pytest.raises(ActTailError, match="in the model but"):
        acttail.decoder(ours, plan, mode="topk", device="cpu", max_seq=32)
    dec = acttail.decoder(ours, device="cpu", max_seq=32)
    with pytest.raises(ActTailError, match="in the model but"):
        dec.set_plan(plan, "topk")
    dec.set_plan(Plan.load(kit["plan"]), "topk")  # the model's own plan still goes in


# ---- class 8: the tensors file holds what the plan declares -------------------------------------------------


def _learned(kit):
    plan = Plan.load(kit["learned"])
    return plan.to_dict({"file": "x.safetensors", "sha256": "0" * 64}), dict(plan.tensors)


def _sidecar_cases():
    def missing_bias(doc, t):
        t.pop("layers.1.up.bias")
        return "layers.1.up.bias is missing"

    def no_file_at_all(doc, t):
        t.clear()
        return "layers.0.q.bias is missing"

    def none_with_biases(doc, t):
        doc["compensation"] = "none"
        for e in doc["projections"]:
            e["overhead"] = 0.0
        return ".bias does not belong in a plan with score 'magnitude' and compensation 'none'"

    def score_in_a_magnitude_plan(doc, t):
        t["layers.0.k.score"] = torch.ones(64)
        return "tensor layers.0.k.score does not belong"

    def weight_score_without_scores(doc, t):
        doc["score"] = "weight"
        return "tensor layers.0.q.score is missing"

    def int64_bias(doc, t):
        t["layers.0.down.bias"] = torch.zeros(64, dtype=torch.int64)
        return "tensor layers.0.down.bias is int64, expected float32"

    def bias_of_the_wrong_length(doc, t):
        t["layers.0.o.bias"] = torch.zeros(63)
        return "tensor layers.0.o.bias has shape (63,), expected (64,)"

    def lowrank_of_another_rank(doc, t):
        doc["compensation"] = "lowrank"
        for e in doc["projections"]:
            e["rank"], e["overhead"] = 0, 0.0
        e = doc["projections"][0]
        e["rank"], e["overhead"] = 2, 2 * (e["in_features"] + e["out_features"]) / e["params"]
        t.clear()
        t.update({"layers.0.q.lowrank_u": torch.zeros(64, 3), "layers.0.q.lowrank_v": torch.zeros(2, 64)})
        return "tensor layers.0.q.lowrank_u has shape (64, 3), expected (64, 2)"

    def lowrank_beside_rank_zero(doc, t):
        lowrank_of_another_rank(doc, t)
        t.update({"layers.0.q.lowrank_u": torch.zeros(64, 2), "layers.0.q.lowrank_v": torch.zeros(2, 64),
                  "layers.0.k.lowrank_u": torch.zeros(32, 2)})
        return "tensor layers.0.k.lowrank_u does not belong"

    def a_name_of_no_projection(doc, t):
        t["layers.0.qq.bias"] = torch.zeros(64)
        return "names no projection"

    return [missing_bias, no_file_at_all, none_with_biases, score_in_a_magnitude_plan, weight_score_without_scores,
            int64_bias, bias_of_the_wrong_length, lowrank_of_another_rank, lowrank_beside_rank_zero,
            a_name_of_no_projection]


@pytest.mark.parametrize("case", _sidecar_cases(), ids=lambda f: f.__name__)
def test_8_sidecar_contents_match_the_declared_score_and_compensation(kit, tmp_path, case):
    doc, tensors = _learned(kit)
    message = case(doc, tensors)
    path = write_plan(doc, tensors or None, tmp_path / "bad.json")
    with pytest.raises(ActTailError) as e:
        Plan.load(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    line = refused(run("eval", kit["model"], "--plan", path, "--text", kit["b"], "--tokens", 256, "--ctx", 64))
    assert message in line


def test_8_a_good_sidecar_still_loads_and_an_in_memory_lie_is_refused_at_apply(kit):
    plan = Plan.load(kit["learned"])
    assert plan.compensation == "learned" and len(plan.tensors) == 14
    plan.tensors.pop("layers.0.q.bias")
    with pytest.raises(ActTailError, match="layers.0.q.bias is missing"):
        acttail.apply(acttail.load(kit["model"]), plan)
    with pytest.raises(ActTailError, match="layers.0.q.bias is missing"):
        acttail.apply(kit["hf"], plan)


# ---- class 12: self-contradicting plans ---------------------------------------------------------------------


def _none_plan(kit) -> dict:
    plan = Plan.load(kit["plan"])
    keys = [e.key for e in plan.projections]
    return plan.with_thresholds({k: 0.1 for k in keys}, calibration={"text": "x"}).to_dict()


def _contradictions():
    def rank_without_factors(doc):
        doc["projections"][3]["rank"] = 8
        return r"\$\.projections\[3\]\.rank: 8, but the plan's compensation is 'none'"

    def rank_beside_learned_biases(doc):
        doc["compensation"] = "learned"
        doc["projections"][0]["rank"] = 4
        return r"\$\.projections\[0\]\.rank"

    def overhead_of_nothing(doc):
        doc["projections"][2]["overhead"] = 0.9
        return r"\$\.projections\[2\]\.overhead: 0.9, but 'none' compensation"

    def learned_at_the_wrong_cost(doc):
        doc["compensation"] = "learned"
        for e in doc["projections"]:
            e["overhead"] = 1.0 / e["in_features"]
        doc["projections"][5]["overhead"] = 0.9
        return r"\$\.projections\[5\]\.overhead: 0.9"

    def rank_larger_than_the_matrix(doc):
        doc["compensation"] = "lowrank"
        e = doc["projections"][1]
        e["rank"] = 1000
        return r"\$\.projections\[1\]\.rank: 1000 exceeds"

    def v1_with_a_score(doc):
        _v1(doc)
        doc["score"] = "magnitude"
        return r"\$\.score"

    def v1_with_a_compensation(doc):
        _v1(doc)
        doc["compensation"] = "none"
        return r"\$\.compensation"

    def v1_with_tensors(doc):
        _v1(doc)
        doc["tensors"] = None
        return r"\$\.tensors"

    def v1_with_an_overhead(doc):
        _v1(doc)
        doc["projections"][4]["overhead"] = 0.0
        return r"\$\.projections\[4\]\.overhead"

    def v1_with_a_rank(doc):
        _v1(doc)
        doc["projections"][0]["rank"] = 0
        return r"\$\.projections\[0\]\.rank"

    return [rank_without_factors, rank_beside_learned_biases, overhead_of_nothing, learned_at_the_wrong_cost,
            rank_larger_than_the_matrix, v1_with_a_score, v1_with_a_compensation, v1_with_tensors,
            v1_with_an_overhead, v1_with_a_rank]


def _v1(doc):
    doc["version"] = 1
    for k in ("score", "compensation", "tensors"):
        doc.pop(k, None)
    for e in doc["projections"]:
        e.pop("overhead", None)
        e.pop("rank", None)


@pytest.mark.parametrize("case", _contradictions(), ids=lambda f: f.__name__)
def test_12_self_contradicting_plans_are_refused_naming_the_field(kit, tmp_path, case):
    doc = _none_plan(kit)
    field = case(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ActTailError, match=field) as e:
        Plan.load(path)
    assert "\n" not in str(e.value)
    refused(run("plan", "show", path), "field $.")


def test_12_what_is_not_a_contradiction_still_loads(kit, tmp_path):
    """A version-1 file as it was written; an allocation's rank split before calibration (compensation none,
    ranks up to the split); learned biases at their cost."""
    doc = _none_plan(kit)
    _v1(doc)
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    assert Plan.load(tmp_path / "v1.json").compensation == "none"
    split = acttail.allocate(acttail.analyze(kit["model"], progress=False), 0.5, method="uniform", rank_split=16)
    assert max(e.rank for e in split.projections) == 16 and split.compensation == "none"
    split.save(tmp_path / "split.json")
    assert Plan.load(tmp_path / "split.json") == split
    doc = split.to_dict()
    doc["method"]["rank_split"] = 8  # a rank above the split it claims
    (tmp_path / "over.json").write_text(json.dumps(doc))
    with pytest.raises(ActTailError, match=r"\.rank: 16"):
        Plan.load(tmp_path / "over.json")
    assert Plan.load(kit["learned"]).projections[0].overhead == pytest.approx(1 / 64)


# ---- class 13: concurrent evaluations of one applied model -------------------------------------------------


@pytest.fixture(scope="module")
def thresholds(kit):
    """A plan calibrated without compensation (thresholds only), so achieved sparsity differs by text."""
    plan = Plan.load(kit["plan"])
    return acttail.calibrate(kit["model"], plan, kit["a"], tokens=1024, ctx=64, compensation="none", progress=False)


def _in_two_threads(fn, args):
    """fn(arg) for each arg, in one thread each, started together."""
    start, results, errors = threading.Barrier(len(args)), [None] * len(args), []

    def work(i, arg):
        try:
            start.wait()
            results[i] = fn(arg)
        except Exception as e:  # reported by the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _same_measurement(got: dict, alone: dict):
    assert got["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
    assert got["kl"] == pytest.approx(alone["kl"], rel=1e-5, abs=1e-9)
    rows = {r["key"]: r["achieved"] for r in got["achieved"]["projections"]}
    want = {r["key"]: r["achieved"] for r in alone["achieved"]["projections"]}
    assert rows.keys() == want.keys() and all(rows[k] == pytest.approx(want[k], abs=1e-12) for k in want)


@pytest.mark.parametrize("which", ["transformers", "ours"])
def test_13_two_threads_evaluating_one_applied_model(kit, thresholds, which):
    model = kit["hf"] if which == "transformers" else acttail.load(kit["model"])
    tok = load_tokenizer(kit["model"])
    texts = [kit["a"].read_text()[::-1][:20000], kit["b"].read_text()]  # the first text reversed: other ids

    def evaluate(text):
        return acttail.evaluate(model, text, tok, tokens=1024, ctx=64, batch_size=1, progress=False)

    with acttail.apply(model, thresholds) as handle:
        alone = [evaluate(t) for t in texts]
        assert alone[0]["achieved"]["weighted_achieved"] != alone[1]["achieved"]["weighted_achieved"]
        assert alone[0]["settings"]["mode"] == "threshold" and alone[0]["plan"]["budget"] == 0.5
        handle.reset_counts()
        for _ in range(2):
            for got, want in zip(_in_two_threads(evaluate, texts), alone):
                _same_measurement(got, want)
        shared = handle.achieved()  # the handle's own counts: every thread's sparse runs, under a lock
        if which == "transformers":
            key = (0, "up")
            one = [next(r["achieved"] for r in a["achieved"]["projections"] if r["key"] == "layers.0.up")
                   for a in alone]
            assert shared[key] == pytest.approx(sum(one) / 2, abs=1e-12)  # both texts count the same entries
    dense = acttail.evaluate(model, texts[0], tok, tokens=1024, ctx=64, progress=False)  # removed: dense again
    assert dense["settings"]["mode"] == "dense" and dense["kl"] is None
    assert dense["perplexity"] < alone[0]["perplexity"]


def test_13_dense_in_one_thread_leaves_the_other_sparse(kit, thresholds):
    """Applied.dense() is this thread's: another thread keeps running the plan meanwhile."""
    ours = acttail.load(kit["model"])
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = ours(ids)
        with acttail.apply(ours, thresholds) as handle:
            sparse = ours(ids)
            inside, outside = threading.Event(), threading.Event()
            seen = {}

            def other():
                inside.wait()
                seen["logits"] = ours(ids)
                outside.set()

            t = threading.Thread(target=other)
            t.start()
            with handle.dense():
                assert torch.equal(ours(ids), dense)
                inside.set()
                outside.wait()
            t.join()
        assert torch.equal(seen["logits"], sparse) and not torch.equal(sparse, dense)
        assert torch.equal(ours(ids), dense)  # removed: dense again
