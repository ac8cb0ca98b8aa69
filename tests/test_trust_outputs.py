"""Issue 21, classes 1, 2, 3 and 5: no output may destroy an input, a plan and its sidecar are one unit, and a
full disk is one line. Every command that writes is refused (exit 2, one line, before any work) when an output
(or a plan output's sidecar) is one of its inputs, through symlinks and hard links; every write that fails
(ENOSPC injected at the n-th byte, a failed rename, a real 2 MB tmpfs where mounting works) leaves the previous
outputs as they were and no temporary file behind."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import acttail
from acttail import outputs
from acttail.checkpoint import Checkpoint
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.plan import Plan
from runtime_tiny import write_hf_model, write_text
from test_trust import fake_gguf  # noqa: F401  (a fixture: convert_gguf's reading replaced by a tiny model)

transformers = pytest.importorskip("transformers")  # the tiny model is written with it

SMALL = ["--tokens", "256", "--ctx", "64"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(r, *words) -> str:
    """Exit 2 and one line 'acttail: error: ...' naming ``words``, no traceback (progress bars aside)."""
    lines = [ln for ln in r.output.splitlines() if ln.strip() and not re.search(r"\[\d+:\d+", ln)]  # tqdm's
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("acttail: error:"), r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under ``folders`` with its bytes: equal snapshots mean nothing changed, appeared or vanished
    (temporary files included)."""
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for f in folders for p in sorted(f.rglob("*"))}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny Llama with tokenizer, a text, its analysis, a plan, a calibrated plan with a sidecar (learned
    biases), measured greedy paths and a sensitivity file."""
    root = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACTTAIL_CACHE", str(root / "cache"))
        model = root / "model"
        write_hf_model(model, "llama", layers=2, seed=3, scale=0.3)
        k = {"root": root, "model": model, "text": write_text(root / "text.txt", 3000, seed=2),
             "analysis": root / "analysis.json", "plan": root / "plan.json", "cal": root / "cal.json",
             "greedy": root / "greedy.json", "sens": root / "sens.json"}
        assert run("analyze", model, "-o", k["analysis"]).exit_code == 0
        assert run("allocate", k["analysis"], "--budget", "0.5", "-o", k["plan"]).exit_code == 0
        r = run("calibrate", model, k["plan"], "--text", k["text"], *SMALL, "--steps", "2", "-o", k["cal"])
        assert r.exit_code == 0 and (root / "cal.safetensors").is_file(), r.output
        r = run("greedy", model, k["analysis"], "--text", k["text"], "--tokens", "128", "--ctx", "64",
                "--base-step", "0.5", "--max-sparsity", "0.5", "-o", root / "with-greedy.json")
        assert r.exit_code == 0, r.output
        k["greedy"].write_text(json.dumps(json.loads((root / "with-greedy.json").read_text())["greedy"]))
        rows = json.loads(k["analysis"].read_text())["projections"]
        k["sens"].write_text(json.dumps({
            "model": {"fingerprint": Checkpoint.open(model).fingerprint}, "text": "c4", "tokens": 512, "mode": "topk",
            "projections": [{"key": r["key"], "layer": r["layer"], "kind": r["kind"], "dnll_50": 0.001 * i,
                             "dnll_80": 0.002 * i} for i, r in enumerate(rows)]}))
        yield k


@pytest.fixture
def no_work(monkeypatch):
    """Every verb's work replaced by a failure: a refusal must come before any of it."""
    import acttail.api as api
    import acttail.convert as convert
    import acttail.report as report

    def boom(*a, **k):
        raise AssertionError("work started before the outputs were checked against the inputs")

    for mod, name in ((api, "ModelInput"), (api, "run_analysis"), (api, "plan_from_analysis"),
                      (api, "analysis_input"), (report, "draw_figures"), (convert, "open_gguf")):
        monkeypatch.setattr(mod, name, boom)


# ---- class 1: an output that is an input (or whose sidecar is one) is refused, before any work ---------------

def _collisions(k):
    m, a, p, c, t = k["model"], k["analysis"], k["plan"], k["cal"], k["text"]
    cal_side = k["root"] / "cal.safetensors"
    return [
        # the weights: a plan's sidecar named like them, or the output itself
        (["calibrate", m, p, "--text", t, "-o", m / "model.json"], "model.safetensors"),
        (["tune", m, a, "--text", t, "-o", m / "model.json"], "model.safetensors"),
        (["analyze", m, "-o", m / "config.json"], "config.json"),
        (["analyze", m, "-o", m / "model.safetensors"], "model.safetensors"),
        (["analyze", m, "--csv", m / "tokenizer.json"], "tokenizer.json"),
        (["eval", m, "--text", t, "-o", m / "tokenizer.json"], "tokenizer.json"),
        (["eval", m, "--text", t, "-o", m / "generation_config.json"], "generation_config.json"),
        (["sensitivity", m, a, "--measured", k["sens"], "-o", m / "config.json"], "config.json"),
        # what the command reads: its analysis, plan (and sidecar), text, measured files
        (["allocate", a, "--budget", "0.5", "-o", a], "analysis"),
        (["eval", m, "--plan", p, "--text", t, "-o", p], "plan"),
        (["eval", m, "--plan", c, "--text", t, "-o", cal_side], "tensors file"),
        (["eval", m, "--text", t, "-o", t], "text"),
        (["calibrate", m, p, "--text", t, "-o", p], "plan"),
        (["calibrate", m, c, "--text", t, "-o", k["root"] / "cal.yaml"], "cal.safetensors"),
        (["calibrate", m, p, "--text", t, "-o", t], "text"),
        (["tune", m, a, "--text", t, "-o", a], "analysis"),
        (["greedy", m, a, "--text", t, "-o", a], "analysis"),
        (["greedy", m, a, "--measured", k["greedy"], "-o", k["greedy"]], "greedy"),
        (["greedy", m, a, "--text", t, "-o", t], "text"),
        (["sensitivity", m, a, "--measured", k["sens"], "-o", k["sens"]], "sensitivity"),
        (["sensitivity", m, a, "--measured", k["sens"], "-o", a], "analysis"),
        (["export", p, "--to", "gemma3n", "-o", p], "plan"),
        (["export", c, "--to", "nncf", "-o", cal_side], "tensors file"),
        (["report", a, "--plan", k["root"] / "index.html", "-o", k["root"]], "index.html"),
        # class 3: a plan named like its own sidecar
        (["allocate", a, "--budget", "0.5", "-o", k["root"] / "x.safetensors"], "its own tensors file"),
        (["calibrate", m, p, "--text", t, "-o", k["root"] / "x.safetensors"], "its own tensors file"),
    ]


def test_every_writing_command_refuses_an_output_that_is_an_input(kit, no_work):
    shutil.copy(kit["plan"], kit["root"] / "index.html")  # a plan named index.html
    before = snapshot(kit["root"])
    for args, word in _collisions(kit):
        line = refused(run(*args), word)
        assert "an input" in line or "its own tensors file" in line, line
        assert snapshot(kit["root"]) == before, args
    (kit["root"] / "index.html").unlink()


def test_symlinks_and_hard_links_to_inputs_are_refused(kit, tmp_path, no_work):
    m, a = kit["model"], kit["analysis"]
    (tmp_path / "weights.json").symlink_to(m / "model.safetensors")
    os.link(a, tmp_path / "hard.json")
    os.link(kit["text"], tmp_path / "text-link.json")
    (tmp_path / "model-link").symlink_to(m)
    before = snapshot(kit["root"], tmp_path)
    refused(run("analyze", m, "-o", tmp_path / "weights.json"), "model.safetensors", "an input")
    refused(run("allocate", a, "--budget", "0.5", "-o", tmp_path / "hard.json"), "the analysis", "an input")
    refused(run("eval", m, "--text", kit["text"], "-o", tmp_path / "text-link.json"), "the text")
    refused(run("calibrate", tmp_path / "model-link", kit["plan"], "--text", kit["text"], "-o",
                m / "model.json"), "model.safetensors")
    assert snapshot(kit["root"], tmp_path) == before


def test_folder_outputs_holding_an_input_are_refused(kit, tmp_path, no_work):
    """teal and the report replace whole folders: one holding an input is refused."""
    teal = tmp_path / "teal"
    (teal / "layer-0").mkdir(parents=True)
    shutil.copy(kit["plan"], teal / "layer-0" / "results.csv")  # a plan where the export would go
    figures = tmp_path / "report" / "figures"
    figures.mkdir(parents=True)
    e = figures / "e.json"
    e.write_text("{}")
    before = snapshot(tmp_path)
    refused(run("export", teal / "layer-0" / "results.csv", "--to", "teal", "-o", teal), "holds the plan")
    refused(run("report", kit["analysis"], "--eval", figures, "-o", tmp_path / "report"), "holds eval result")
    assert snapshot(tmp_path) == before


def test_the_python_api_refuses_too(kit, tmp_path, no_work):
    before = snapshot(kit["root"])
    m, a, p, t = kit["model"], kit["analysis"], kit["plan"], kit["text"]
    calls = [lambda: acttail.allocate(a, 0.5, out=a),
             lambda: acttail.calibrate(m, p, t, out=m / "model.json"),
             lambda: acttail.evaluate(m, t, plan=p, out=m / "tokenizer.json"),
             lambda: acttail.analyze(m, out=m / "config.json"),
             lambda: acttail.measure_sensitivity(m, a, measured=kit["sens"], out=kit["sens"]),
             lambda: acttail.measure_greedy(m, a, measured=kit["greedy"], out=a),
             lambda: acttail.tune(m, a, t, out=t),
             lambda: acttail.export_plan(kit["cal"], "nncf", kit["root"] / "cal.safetensors"),
             lambda: acttail.write_report(a, kit["root"], evals=[kit["root"] / "index.html"])]
    (kit["root"] / "index.html").write_text("{}")
    for call in calls:
        with pytest.raises(ActTailError, match="an input|same file"):
            call()
    (kit["root"] / "index.html").unlink()
    with pytest.raises(ActTailError, match="its own tensors file"):
        Plan.load(kit["cal"]).save(tmp_path / "x.safetensors")
    assert snapshot(kit["root"]) == before and not list(tmp_path.iterdir())


def test_convert_refuses_an_output_folder_holding_the_gguf(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ActTailError, match="holds the GGUF file"):
        acttail.convert_gguf(gguf, tmp_path)  # refused before its emptiness is even looked at
    assert gguf.read_bytes() == b"GGUF"


def test_outputs_beside_the_inputs_still_work(kit, tmp_path):
    """Not every name in a model folder is taken: a plan beside the weights, under its own name, is fine."""
    model = tmp_path / "model"
    shutil.copytree(kit["model"], model)
    r = run("allocate", kit["analysis"], "--budget", "0.4", "-o", model / "plan.json")
    assert r.exit_code == 0, r.output
    r = run("analyze", model, "-o", model / "analysis.json", "--csv", model / "analysis.csv")
    assert r.exit_code == 0, r.output


# ---- class 2: the plan and its sidecar are one unit ----------------------------------------------------------

def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def full_disk(monkeypatch, folder: Path, after: int = 0):
    """os.write raises ENOSPC once ``after`` bytes have gone to files under ``folder`` (as a full disk)."""
    real, written = os.write, [0]
    folder = os.path.realpath(folder)

    def write(fd, data):
        if not _fd_path(fd).startswith(folder + os.sep):
            return real(fd, data)
        room = after - written[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data)[:room])
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", write)


def _pair(kit, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    shutil.copy(kit["cal"], folder / "cal.json")
    shutil.copy(kit["root"] / "cal.safetensors", folder / "cal.safetensors")
    return folder / "cal.json"


def _new_plan(kit) -> Plan:
    plan = Plan.load(kit["cal"])
    plan.tensors = {k: t + 1.0 for k, t in plan.tensors.items()}  # other bytes, another sha256
    plan.budget = 0.45
    return plan


@pytest.mark.parametrize("where", ["sidecar's first byte", "sidecar's middle", "plan JSON", "nowhere"])
def test_a_full_disk_keeps_the_previous_pair(kit, tmp_path, monkeypatch, where):
    """ENOSPC at the n-th byte (of the sidecar, of the plan after it, or never): the old pair stays whole
    and consistent (Plan.load checks the sidecar's sha256), and no temporary file is left."""
    out = _pair(kit, tmp_path / "out")
    old, before = Plan.load(out), snapshot(out.parent)
    new = _new_plan(kit)
    sidecar = (out.parent / "cal.safetensors").stat().st_size
    after = {"sidecar's first byte": 0, "sidecar's middle": sidecar // 2, "plan JSON": sidecar + 100,
             "nowhere": 10**9}[where]
    full_disk(monkeypatch, out.parent, after)
    if where == "nowhere":
        new.save(out)
        monkeypatch.undo()
        assert Plan.load(out) == new and set(snapshot(out.parent)) == set(before)
        return
    with pytest.raises(ActTailError, match=f"cannot write {out.parent}/cal.*: No space left on device"):
        new.save(out)
    monkeypatch.undo()
    assert snapshot(out.parent) == before and Plan.load(out) == old


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_rename_keeps_the_previous_pair(kit, tmp_path, monkeypatch, failing):
    """The first rename (the sidecar) or the second (the plan) fails: the old pair is back, nothing left over."""
    out = _pair(kit, tmp_path / "out")
    old, before = Plan.load(out), snapshot(out.parent)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ActTailError, match="cannot write .*Input/output error"):
        _new_plan(kit).save(out)
    monkeypatch.undo()
    assert Path(calls[0]).name == "cal.safetensors" and (failing == 1 or Path(calls[1]).name == "cal.json")
    assert snapshot(out.parent) == before and Plan.load(out) == old


def test_a_failed_plan_rename_over_a_plan_without_sidecar(kit, tmp_path, monkeypatch):
    """The old plan had no tensors: the new sidecar does not stay behind when the plan cannot be renamed, and
    a file system without hard links (the old file copied instead) is handled the same."""
    out = tmp_path / "cal.json"
    shutil.copy(kit["plan"], out)
    (tmp_path / "cal.safetensors").write_bytes(b"a stale file of someone's")
    before = snapshot(tmp_path)
    real = os.replace
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(errno.EIO, "io"))
                        if str(d).endswith(".json") else real(s, d))
    with pytest.raises(ActTailError, match="cannot write"):
        _new_plan(kit).save(out)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_write_files_all_or_none(tmp_path, monkeypatch):
    """Three outputs, the third rename fails: the first two are put back (one existed, one did not)."""
    a, b, c = tmp_path / "a.json", tmp_path / "b.csv", tmp_path / "c.txt"
    a.write_text("old a")
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(errno.EDQUOT, "quota"))
                        if Path(d) == c else real(s, d))
    with pytest.raises(ActTailError, match=f"cannot write {c}: quota"):
        acttail.outputs.write_files({a: "new a", b: "new b", c: b"new c"})
    monkeypatch.undo()
    assert snapshot(tmp_path) == {str(a): b"old a"}
    acttail.outputs.write_files({a: "new a", b: "new b", c: b"new c"})
    assert a.read_text() == "new a" and c.read_bytes() == b"new c" and len(list(tmp_path.iterdir())) == 3


# ---- class 5: a full disk is one line, and the previous outputs stay -----------------------------------------

COMMANDS = {
    "analyze": lambda k, o: ["analyze", k["model"], "-o", o / "a.json", "--csv", o / "a.csv"],
    "allocate": lambda k, o: ["allocate", k["analysis"], "--budget", "0.5", "--method", "uniform", "-o", o / "p.json"],
    "greedy": lambda k, o: ["greedy", k["model"], k["analysis"], "--measured", k["greedy"], "-o", o / "g.json"],
    "sensitivity": lambda k, o: ["sensitivity", k["model"], k["analysis"], "--measured", k["sens"], "-o",
                                 o / "s.json"],
    "calibrate": lambda k, o: ["calibrate", k["model"], k["plan"], "--text", k["text"], *SMALL, "--steps", "1",
                               "-o", o / "c.json"],
    "tune": lambda k, o: ["tune", k["model"], k["analysis"], "--text", k["text"], "--tokens", "128", "--held-tokens",
                          "128", "--ctx", "64", "--steps", "1", "--tolerance", "0.4", "--method", "uniform", "-o",
                          o / "t.json"],
    "eval": lambda k, o: ["eval", k["model"], "--plan", k["cal"], "--text", k["text"], *SMALL, "-o", o / "e.json"],
    "export gemma3n": lambda k, o: ["export", k["cal"], "--to", "gemma3n", "-o", o / "g3n.json"],
    "export nncf": lambda k, o: ["export", k["cal"], "--to", "nncf", "-o", o / "nncf.json"],
    "export teal": lambda k, o: ["export", k["cal"], "--to", "teal", "-o", o / "teal"],
    "report": lambda k, o: ["report", k["analysis"], "--plan", k["cal"], "-o", o / "report"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_is_one_line_and_keeps_the_previous_outputs(kit, tmp_path, monkeypatch, command):
    """Each command run once (the previous outputs), then again on a disk that fills at the first byte and
    halfway through what it writes: one line each time, exit 2, the previous outputs byte for byte, every
    input unchanged, no temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    args = COMMANDS[command](kit, out)
    r = run(*args)
    assert r.exit_code == 0, r.output
    before, inputs = snapshot(out), snapshot(kit["root"])
    for after in (0, sum(map(len, before.values())) // 2):
        with pytest.MonkeyPatch.context() as mp:  # not monkeypatch.undo(): that would undo _cache too
            full_disk(mp, out, after)
            refused(run(*args), "No space left on device")
        assert snapshot(out) == before, (command, after)
    assert snapshot(kit["root"]) == inputs


def test_convert_gguf_on_a_full_disk(tmp_path, monkeypatch, fake_gguf):
    """The weights (written by safetensors' own code) or a JSON file hit a full disk: one line, no folder."""
    from safetensors import SafetensorError

    out = tmp_path / "out"
    out.mkdir()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    full_disk(monkeypatch, out, 0)  # the JSON files
    refused(run("convert-gguf", gguf, out / "model"), "No space left on device")

    def save_file(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(outputs, "save_file", save_file)
    refused(run("convert-gguf", gguf, out / "model"), f"cannot write {out / 'model'}: I/O error: No space left")
    assert snapshot(out) == {} and gguf.read_bytes() == b"GGUF"


# ---- a real full disk: a 2 MB tmpfs (root and mount(2) allowed only) ------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs, unmounted afterwards; the test skips where it cannot be mounted."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to its last byte."""
    with open(folder / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with open(folder / f"filler-{uuid.uuid4().hex}", "wb", buffering=0) as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0")


def test_a_real_full_disk(kit, tmpfs):
    """On a full tmpfs: calibrate over an existing pair, the teal export and the report each fail with one
    line; the pair still loads (its sha256 matches) and nothing is left but the filler."""
    out = _pair(kit, tmpfs / "plans")
    old = Plan.load(out)
    r = run("export", kit["cal"], "--to", "teal", "-o", tmpfs / "teal")
    assert r.exit_code == 0, r.output
    fill(tmpfs)
    before = snapshot(tmpfs)
    refused(run(*COMMANDS["calibrate"](kit, out.parent)[:-1], out), "No space left on device")
    refused(run("export", kit["cal"], "--to", "teal", "-o", tmpfs / "teal"), "No space left on device")
    refused(run("report", kit["analysis"], "--plan", kit["cal"], "-o", tmpfs / "plans"), "No space left on device")
    refused(run("eval", kit["model"], "--text", kit["text"], *SMALL, "-o", tmpfs / "e.json"), "No space left")
    assert snapshot(tmpfs) == before and Plan.load(out) == old


def test_concurrent_saves_of_one_plan_leave_a_consistent_pair(kit, tmp_path, monkeypatch):
    """Two writers save different plans to one path at the same moment, round after round, one slow between
    its two renames: after every round the pair left is one of them, whole (the folder's lock keeps their
    renames from interleaving)."""
    import threading
    import time

    real = os.replace

    def slow_replace(src, dst):
        real(src, dst)
        if str(dst).endswith(".safetensors") and threading.current_thread().name == "slow":
            time.sleep(0.05)  # the other writer renames both of its files here, unless it waits for the lock

    monkeypatch.setattr(os, "replace", slow_replace)
    plans = [Plan.load(kit["cal"]), _new_plan(kit)]
    out, errors, rounds = tmp_path / "p.json", [], 8
    start, end = threading.Barrier(2, timeout=60), threading.Barrier(3, timeout=60)

    def save(plan):
        for _ in range(rounds):
            start.wait()
            try:
                plan.save(out)
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)
            end.wait()

    threads = [threading.Thread(target=save, args=(p,), name=name) for p, name in zip(plans, ("slow", "fast"))]
    for t in threads:
        t.start()
    seen = []
    for _ in range(rounds):
        end.wait()
        try:
            seen.append(Plan.load(out) in plans)
        except ActTailError as e:  # the sidecar's sha256 does not match the plan's
            seen.append(str(e))
    for t in threads:
        t.join()
    assert not errors and seen == [True] * rounds, seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.safetensors"]


def test_ctrl_c_between_the_two_renames_keeps_the_previous_pair(kit, tmp_path, monkeypatch):
    out = _pair(kit, tmp_path / "out")
    old, before = Plan.load(out), snapshot(out.parent)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _new_plan(kit).save(out)
    monkeypatch.undo()
    assert snapshot(out.parent) == before and Plan.load(out) == old
