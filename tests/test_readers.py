"""Issue 21 (trust, round two), the readers: a FIFO, device, socket or folder where a file is expected is
refused before it is opened (class 4); reads are bounded; the analysis cache serves only an entry of this
model with these settings (class 9); ACTTAIL_CACHE and tokenizer_config.json values (class 10); a malformed
GGUF merge and a huge plan integer (class 11); config.json contradicting the weights; a large plan shown in
linear time. Every fixture is built here (a FIFO with os.mkfifo, a sparse file with truncate)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from acttail import analysis
from acttail.checkpoint import Checkpoint, read_header
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.files import cache_dir, read_json
from conftest import write_tiny_model
from test_trust import listing, refused

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer (read-only for the tests: they copy it to change it)."""
    pytest.importorskip("transformers")
    from runtime_tiny import write_hf_model

    folder = tmp_path_factory.mktemp("readers") / "model"
    write_hf_model(folder, "llama", layers=2, seed=3, scale=0.3)
    return folder


def finishes(fn, fifos=(), timeout: float = 30.0):
    """``fn()``'s exception (or None) if it returns within ``timeout``; otherwise the test fails, after the
    FIFOs are opened for writing so that a reader blocked on one is released (the test never hangs)."""
    out = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: B036 (handed back to the test)
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(5)
        pytest.fail(f"blocked on a FIFO for over {timeout} s")
    return out.get("error")


def rejects(fn, fifos=(), *words):
    error = finishes(fn, fifos)
    assert isinstance(error, ActTailError), repr(error)
    for w in words:
        assert w in str(error), (w, str(error))
    return str(error)


def bytes_read() -> int | None:
    """Bytes this process has read so far (Linux' /proc/self/io rchar), or None elsewhere."""
    try:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar")).split()[1])
    except (OSError, StopIteration):
        return None


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space (holes)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ---- class 4: non-regular files are refused before they are opened -----------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.safetensors.index.json", "shard"])
def test_fifo_in_a_model_folder_is_refused(model, tmp_path, name):
    folder = shutil.copytree(model, tmp_path / "m")
    if name == "shard":
        names = [n for n in read_header(folder / "model.safetensors")[1] if n != "__metadata__"]
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
        (folder / "model.safetensors").unlink()
        name = "model-00001-of-00001.safetensors"
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    rejects(lambda: Checkpoint.open(folder), [folder / name], "FIFO", name)


def test_analyze_on_a_fifo_weights_file_is_one_line_and_no_output(model, tmp_path):
    folder = shutil.copytree(model, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    r = {}
    assert finishes(lambda: r.update(r=run("analyze", folder, "-o", out / "a.json")),
                    [folder / "model.safetensors"]) is None
    refused(r["r"], "is a FIFO, not a regular file")
    bare = tmp_path / "bare.safetensors"
    os.mkfifo(bare)
    assert finishes(lambda: r.update(r=run("analyze", bare, "-o", out / "a.json")), [bare]) is None
    refused(r["r"], "is a FIFO")
    assert listing(out) == set()


@pytest.mark.parametrize("kind", ["folder", "socket", "char device"])
def test_other_non_regular_files_are_refused(model, tmp_path, kind):
    folder = shutil.copytree(model, tmp_path / "m")
    target = folder / "model.safetensors"
    target.unlink()
    if kind == "folder":
        target.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(target))
        except OSError:
            pytest.skip("cannot bind a unix socket here")
    else:
        target.symlink_to("/dev/zero")  # endless zeros: a read of it would never finish
    rejects(lambda: Checkpoint.open(folder), (), {"folder": "a folder", "socket": "a socket",
                                                  "char device": "a character device"}[kind])
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    rejects(lambda: Checkpoint.open(folder), (), "config", "a character device")


def test_every_reader_refuses_a_fifo(model, tmp_path):
    """Plan, its tensors file, analysis, measured files, eval results, tokenizer files, texts, GGUF:
    each reader refuses a FIFO in one ActTailError, without blocking on it."""
    from acttail.convert import check_architecture, open_gguf
    from acttail.greedy import load_paths
    from acttail.plan import Plan
    from acttail.runtime.tokens import bos_id, load_tokenizer
    from acttail.sensitivity import load_sensitivity
    from acttail.text import read_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for read in (lambda: Plan.load(fifo), lambda: analysis.Analysis.load(fifo), lambda: load_sensitivity(fifo),
                 lambda: load_paths(str(fifo), {"fingerprint": "x", "num_layers": 1}), lambda: read_text(fifo),
                 lambda: check_architecture(fifo), lambda: open_gguf(fifo), lambda: read_json(fifo)):
        rejects(read, [fifo], "FIFO")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        folder = shutil.copytree(model, tmp_path / name)
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)
        rejects(lambda: bos_id(folder), [folder / name], "FIFO", name)
        if name == "tokenizer.json":
            rejects(lambda: load_tokenizer(folder), [folder / name], "FIFO")


def test_a_fifo_as_the_plans_tensors_file(tmp_path):
    from acttail.plan import Plan, PlanEntry

    entries = [PlanEntry(0, k, 8, 8, 0.5) for k in ("q", "k", "v", "o", "gate", "up", "down")]
    plan = Plan(model={"fingerprint": "sha256:x", "architecture": None, "model_type": None, "num_layers": 1,
                       "path": None}, budget=0.5, method={"name": "uniform"}, projections=entries,
                score="weight", tensors={f"{e.key}.score": torch.ones(8) for e in entries})
    plan.save(tmp_path / "plan.json")
    (tmp_path / "plan.safetensors").unlink()
    os.mkfifo(tmp_path / "plan.safetensors")
    rejects(lambda: Plan.load(tmp_path / "plan.json"), [tmp_path / "plan.safetensors"], "FIFO")


# ---- bounded reads ------------------------------------------------------------------------------------------

def test_a_config_linked_to_a_3gb_file_is_refused_unread(model, tmp_path):
    folder = shutil.copytree(model, tmp_path / "m")
    big = sparse(tmp_path / "big.json", 3 << 30)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(big)
    before, t0 = bytes_read(), time.perf_counter()
    line = refused(run("analyze", folder), "config", "3,221,225,472 bytes", "over the")
    assert time.perf_counter() - t0 < 10 and "Traceback" not in line
    if before is not None:
        assert bytes_read() - before < 50 << 20  # the 3 GB were not read (the command reads its own files)


@pytest.mark.parametrize("name, size", [("tokenizer.json", 300 << 20), ("tokenizer_config.json", 20 << 20)])
def test_oversized_tokenizer_files_are_refused(model, tmp_path, name, size):
    from acttail.runtime.tokens import bos_id

    folder = shutil.copytree(model, tmp_path / "m")
    sparse(folder / name, size)
    before = bytes_read()
    rejects(lambda: bos_id(folder), (), name, "over the")
    if before is not None:
        assert bytes_read() - before < size // 4


def test_oversized_and_overdeep_json_documents(tmp_path):
    from acttail.plan import Plan
    from acttail.text import read_text

    rejects(lambda: Plan.load(sparse(tmp_path / "plan.json", 300 << 20)), (), "over the")
    rejects(lambda: read_text(sparse(tmp_path / "text.txt", (1 << 30) + 1)), (), "over the")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 500 + "]" * 500)  # parses, but our readers (and deepcopy) recurse
    rejects(lambda: Plan.load(deep), (), "nested too deeply")
    gz = tmp_path / "bomb.json.gz"
    import gzip

    gz.write_bytes(gzip.compress(b" " * (300 << 20)))  # 300 MB of spaces, compressed to 300 kB
    rejects(lambda: read_json(gz), (), "decompresses to over")


# ---- class 9: the analysis cache serves only this model's entry with these settings ------------------------

def _entry(model: Path, fit: str = "ks") -> Path:
    ckpt = Checkpoint.open(model)
    return analysis.cache_path(ckpt, analysis.settings(fit=fit, device="cpu"))


def test_cache_key_covers_the_settings_but_not_the_device(tmp_path):
    model = write_tiny_model(tmp_path / "m")
    keys = {_entry(model, fit) for fit in ("ks", "peak", "median")}
    ckpt = Checkpoint.open(model)
    keys |= {analysis.cache_path(ckpt, analysis.settings(dtype="float64", device="cpu"))}
    assert len(keys) == 4
    cfg = analysis.settings(device="cpu")
    assert analysis.cache_path(ckpt, cfg) == analysis.cache_path(ckpt, {**cfg, "device": "cuda"})


def test_an_entry_for_other_settings_is_not_served(tmp_path):
    model = write_tiny_model(tmp_path / "m")
    ks = json.loads(run("analyze", model, "--fit", "ks", "--json").output)
    shutil.copy(_entry(model, "ks"), _entry(model, "peak"))  # the ks result planted under peak's key
    r = run("analyze", model, "--fit", "peak", "--json")
    assert r.exit_code == 0 and "cached" not in r.output
    peak = json.loads(r.output)
    assert peak["settings"]["fit"] == "peak" and peak["projections"] != ks["projections"]
    assert "cached" in run("analyze", model, "--fit", "peak").output  # the recomputed entry is served next


def test_rows_of_another_model_under_this_fingerprint_are_not_served(tmp_path):
    model = write_tiny_model(tmp_path / "m")
    other = write_tiny_model(tmp_path / "o", hidden=96, inter=160, seed=5)
    assert run("analyze", other).exit_code == 0
    doc = json.loads(_entry(other).read_text())
    doc["model"] = json.loads(json.dumps(analysis._model_section(Checkpoint.open(model))))
    doc["summary"] = analysis.summarize(doc["projections"])
    _entry(model).parent.mkdir(parents=True, exist_ok=True)
    _entry(model).write_text(json.dumps(doc))
    r = run("analyze", model, "--json")
    assert r.exit_code == 0 and "cached" not in r.output
    assert {row["in_features"] for row in json.loads(r.output)["projections"]} == {64, 96}  # this model's


@pytest.mark.parametrize("damage", ["summary", "truncated", "fifo", "extra section", "fingerprint", "version"])
def test_a_damaged_entry_is_recomputed(tmp_path, damage):
    model = write_tiny_model(tmp_path / "m")
    first = json.loads(run("analyze", model, "--json").output)
    entry = _entry(model)
    doc = json.loads(entry.read_text())
    if damage == "summary":
        doc["summary"]["alpha_median"] = 99.0
    elif damage == "extra section":
        doc["sensitivity"] = {"level": "dnll_80"}
    elif damage == "fingerprint":
        doc["model"]["fingerprint"] = "sha256:0"
    elif damage == "version":
        doc["tool_version"] = "0.0.1"
    entry.write_text(json.dumps(doc))
    if damage == "truncated":
        entry.write_text(entry.read_text()[:100])
    if damage == "fifo":
        entry.unlink()
        os.mkfifo(entry)
    r = {}
    assert finishes(lambda: r.update(r=run("analyze", model, "--json")), [entry]) is None
    assert r["r"].exit_code == 0 and "cached" not in r["r"].output, r["r"].output
    again = json.loads(r["r"].output)
    assert again["projections"] == first["projections"] and again["summary"] == first["summary"]


def test_analyze_refuses_a_config_that_contradicts_the_weights_cached_or_not(tmp_path):
    model = write_tiny_model(tmp_path / "m")
    assert run("analyze", model).exit_code == 0  # the weights' analysis is in the cache now
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_size": 80}))  # the matrices are 64 wide
    out = tmp_path / "out"
    out.mkdir()
    refused(run("analyze", model, "-o", out / "a.json"), "config.json does not match the weights")
    shutil.rmtree(tmp_path / "cache")
    refused(run("analyze", model, "-o", out / "a.json"), "config.json does not match the weights")
    assert listing(out) == set()


def _with_config(model, tmp_path, **changes):
    folder = shutil.copytree(model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **{k: v(cfg) for k, v in changes.items()}}))
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 200)
    return folder, text


def test_a_config_vocabulary_that_contradicts_the_embeddings_is_refused(model, tmp_path):
    folder, text = _with_config(model, tmp_path, vocab_size=lambda c: c["vocab_size"] + 7)
    out = tmp_path / "out"
    out.mkdir()
    for args in (("analyze", folder, "-o", out / "a.json"),
                 ("eval", folder, "--text", text, "--tokens", "256", "--ctx", "64", "-o", out / "e.json")):
        refused(run(*args), "config.json does not match the weights")
    assert listing(out) == set()


def test_an_untied_config_without_an_lm_head_is_refused(model, tmp_path):
    assert "lm_head.weight" not in read_header(model / "model.safetensors")[1]
    folder, text = _with_config(model, tmp_path, tie_word_embeddings=lambda c: False)
    refused(run("eval", folder, "--text", text, "--tokens", "256", "--ctx", "64"), "tie_word_embeddings is false",
            "no lm_head.weight")


# ---- class 10: ACTTAIL_CACHE and tokenizer_config.json -----------------------------------------------------

def test_acttail_cache_naming_a_file_is_one_line(tmp_path, monkeypatch):
    model = write_tiny_model(tmp_path / "m")
    (tmp_path / "afile").write_text("x")
    for value in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        monkeypatch.setenv("ACTTAIL_CACHE", str(value))
        refused(run("analyze", model), "ACTTAIL_CACHE=", "is not a folder")
        refused(run("fetch", "smollm2"), "ACTTAIL_CACHE=", "is not a folder")  # before any download


def test_empty_acttail_cache_means_the_default(tmp_path, monkeypatch):
    model = write_tiny_model(tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ACTTAIL_CACHE", "")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cache_dir() == tmp_path / "home" / ".cache" / "acttail"
    assert run("analyze", model).exit_code == 0
    assert listing(work) == set() and (tmp_path / "home" / ".cache" / "acttail" / "analysis").is_dir()


@pytest.mark.parametrize("value", ["no", "false", 1, [True], {"value": True}])
def test_add_bos_token_must_be_a_boolean(model, tmp_path, value):
    from acttail.runtime.tokens import bos_id

    folder = shutil.copytree(model, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": value, "bos_token": "<bos>"}))
    rejects(lambda: bos_id(folder), (), "add_bos_token must be true or false", json.dumps(value))
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 200)
    refused(run("eval", folder, "--text", text, "--tokens", "256", "--ctx", "64"), "add_bos_token")
    for ok in (True, False, None):
        (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": ok, "bos_token": "<bos>"}))
        assert finishes(lambda: bos_id(folder)) is None


def test_strings_that_are_no_text_are_refused(model, tmp_path):
    """A JSON string with an unpaired \\uD800-\\uDFFF escape is no text: tokenizers cannot take it (the config
    fuzzer's crash: a bos_token holding one gave a UnicodeEncodeError). Refused by every JSON read, in keys and
    nested values alike; a proper pair (an emoji) still reads."""
    from acttail.files import read_json
    from acttail.runtime.tokens import bos_id

    folder = shutil.copytree(model, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": true, "bos_token": "<bo\\udcdds>"}')
    rejects(lambda: bos_id(folder), (), "tokenizer_config.json", "no text")
    for doc in ('{"\\udc00": 1}', '[[{"a": "\\uD800"}]]', '{"a": ["x", "\\ude00 alone"]}'):
        (tmp_path / "d.json").write_text(doc)
        rejects(lambda: read_json(tmp_path / "d.json"), (), "no text")
    (tmp_path / "d.json").write_text('{"\\ud83d\\ude00": "ok"}')
    assert read_json(tmp_path / "d.json") == {"\U0001F600": "ok"}


# ---- class 11: tracebacks no more --------------------------------------------------------------------------

def write_bpe_gguf(path: Path, merges: list[str]) -> Path:
    """A one-layer llama GGUF with a byte-level BPE vocabulary (gpt2, as SmolLM2's), written with gguf."""
    import gguf

    tokens = ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120a"]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, 64), (w.add_embedding_length, 8), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_head_count_kv, 1)):
        add(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    g = torch.Generator().manual_seed(0)
    shapes = {"token_embd": (len(tokens), 8), "output_norm": (8,), "blk.0.attn_norm": (8,), "blk.0.ffn_norm": (8,),
              "blk.0.attn_q": (8, 8), "blk.0.attn_k": (4, 8), "blk.0.attn_v": (4, 8), "blk.0.attn_output": (8, 8),
              "blk.0.ffn_gate": (16, 8), "blk.0.ffn_up": (16, 8), "blk.0.ffn_down": (8, 16)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", torch.randn(*shape, generator=g).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_with_a_malformed_bpe_merge(tmp_path):
    pytest.importorskip("gguf")
    from acttail.convert import convert_gguf

    good = write_bpe_gguf(tmp_path / "good.gguf", ["a b", "\u0120 a"])
    assert (convert_gguf(good, tmp_path / "ok") / "tokenizer.json").is_file()
    data = good.read_bytes()
    at = data.index(b"\xc4\xa0 a")  # the second merge, "Ġ a": its space becomes a letter (same length)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + b"\xc4\xa0xa" + data[at + 4:])
    out = tmp_path / "out"
    out.mkdir()
    refused(run("convert-gguf", bad, out / "m"), "BPE merge 1", "not two tokens separated by a space")
    refused(run("analyze", bad), "BPE merge 1")
    assert listing(out) == set()


def test_a_gguf_declaring_more_than_it_holds_is_refused_fast(tmp_path):
    """An array count past the end of the file (the gguf reader would loop and allocate per item)."""
    pytest.importorskip("gguf")
    import struct

    from acttail.convert import open_gguf

    good = write_bpe_gguf(tmp_path / "good.gguf", ["a b"])
    data = good.read_bytes()
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4  # key, type, item type
    assert struct.unpack_from("<Q", data, at)[0] == 6
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + struct.pack("<Q", 1 << 40) + data[at + 8:])
    t0 = time.perf_counter()
    rejects(lambda: open_gguf(bad), (), "not a readable GGUF", "past the end")
    assert time.perf_counter() - t0 < 5


def _plan_doc(in_features: int, out_features: int = 8) -> dict:
    from acttail.plan import Plan, PlanEntry

    entries = [PlanEntry(0, k, 8, 8, 0.5) for k in ("q", "k", "v", "o", "gate", "up", "down")]
    doc = Plan(model={"fingerprint": "sha256:x", "architecture": None, "model_type": None, "num_layers": 1,
                      "path": None}, budget=0.5, method={"name": "uniform"}, projections=entries).to_dict()
    doc["projections"][0].update(in_features=in_features, out_features=out_features,
                                 params=in_features * out_features)
    return doc


def test_plan_show_with_a_huge_integer_is_one_line(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(_plan_doc(10**400)))
    refused(run("plan", "show", tmp_path / "p.json"), "outside 64 bits")
    (tmp_path / "p.json").write_text(json.dumps(_plan_doc(2**40, 1)))  # large, but a 64-bit integer
    r = run("plan", "show", tmp_path / "p.json")
    assert r.exit_code == 0 and "1099511627776" in r.output


def test_plan_show_summary_is_linear_in_the_projections():
    """105,000 projections (15,000 layers): the per-layer table in well under a second (it was quadratic:
    118 s for `acttail plan show` on such a plan)."""
    from acttail.layout import KINDS
    from acttail.plan import Plan, PlanEntry

    def timed(n_layers: int) -> float:
        plan = Plan(model={"fingerprint": "x", "architecture": None, "model_type": None, "num_layers": n_layers,
                           "path": None}, budget=0.5, method={"name": "uniform"},
                    projections=[PlanEntry(i, k, 64, 64, 0.5) for i in range(n_layers) for k in KINDS])
        t0 = time.perf_counter()
        text = plan.format_summary()
        assert text.count("\n") > n_layers
        return time.perf_counter() - t0

    small, large = timed(1500), timed(15000)
    print(f"summary of 10,500 projections {small:.3f} s, of 105,000 {large:.3f} s")
    assert large < 3 and large < 30 * max(small, 1e-3)  # quadratic would be 100x


# ---- what opening a folder reads: header entries, shard names ---------------------------------------------

def test_safetensors_entries_must_agree_with_their_bytes(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(4, 4)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data.replace(b"[4,4]", b"[4,2]"))  # 32 bytes' shape for 64 bytes of data
    rejects(lambda: read_header(bad), (), "holds 64 bytes, not what its shape [4, 2] of F32 needs")
    bad.write_bytes(data.replace(b"[4,4]", b"[4,-4]"))
    rejects(lambda: read_header(bad), (), "malformed header entry")


@pytest.mark.parametrize("shard, words", [("a\u0000b.safetensors", "is no file name"),
                                          ("\udb01.safetensors", "a string that is no text")])
def test_shard_names_that_are_no_file_names(model, tmp_path, shard, words):
    folder = shutil.copytree(model, tmp_path / "m")
    names = [n for n in read_header(folder / "model.safetensors")[1] if n != "__metadata__"]
    index = {"weight_map": {n: "model.safetensors" for n in names}}
    index["weight_map"][names[0]] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    rejects(lambda: Checkpoint.open(folder), (), words)
