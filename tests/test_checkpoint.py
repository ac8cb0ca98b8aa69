"""Checkpoint reader: layouts, architectures, fused splitting, fingerprints and bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from acttail.checkpoint import Checkpoint
from acttail.errors import ActTailError
from acttail.validation import schema
from acttail.layout import KINDS, Key
from conftest import write_tiny_model


def test_projections_and_shapes(tiny_llama):
    ckpt = Checkpoint.open(tiny_llama)
    projs = ckpt.projections()
    assert ckpt.num_layers == 2 and ckpt.architecture == "LlamaForCausalLM"
    assert [p.kind for p in projs[:7]] == list(KINDS)
    shapes = {p.kind: p.shape for p in projs if p.layer == 1}
    assert shapes == {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64),
                      "gate": (96, 64), "up": (96, 64), "down": (64, 96)}
    for p in projs:
        w = ckpt.load(p)
        assert tuple(w.shape) == p.shape and p.params == w.numel()
    assert projs[8].key == "layers.1.k"


def test_key_is_a_tuple_in_memory_and_a_string_in_documents():
    k = Key(3, "up")
    assert k == (3, "up") and hash(k) == hash((3, "up")) and {(3, "up"): 1}[k] == 1
    assert str(k) == f"{k}" == "layers.3.up" and Key.parse("layers.3.up") == k
    assert sorted([Key(1, "q"), Key(0, "down"), Key(0, "q")], key=lambda x: x.order) == [(0, "q"), (0, "down"), (1, "q")]
    for bad in ("layers.3.upp", "layer.3.up", "layers.x.up", "layers.3", "layers.-1.q"):
        with pytest.raises(ValueError, match="not a projection key"):
            Key.parse(bad)


def test_schemas_list_the_layout_kinds():
    """Every file format's projection key pattern and kind enum say layout.KINDS (a schema cannot import it)."""
    def fields(doc):
        if isinstance(doc, dict):
            if isinstance(doc.get("kind"), dict) and isinstance(doc.get("key"), dict):
                yield doc["key"]["pattern"], doc["kind"]["enum"]
            for v in doc.values():
                yield from fields(v)
    found = [f for name in ("analysis", "plan", "sensitivity") for f in fields(schema(name))]
    assert len(found) == 3
    assert all(p == rf"^layers\.[0-9]+\.({'|'.join(KINDS)})$" and e == list(KINDS) for p, e in found)


def test_sharded_equals_single(tmp_path):
    single = Checkpoint.open(write_tiny_model(tmp_path / "a", seed=3))
    sharded = Checkpoint.open(write_tiny_model(tmp_path / "b", seed=3, shards=3))
    assert len(sharded.files) == 3
    for p, q in zip(single.projections(), sharded.projections()):
        assert p == q and torch.equal(single.load(p), sharded.load(q))


def test_bare_safetensors_file(tiny_llama):
    ckpt = Checkpoint.open(tiny_llama / "model.safetensors")
    assert ckpt.num_layers == 2 and len(ckpt.projections()) == 14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(tmp_path, dtype):
    ckpt = Checkpoint.open(write_tiny_model(tmp_path / "m", dtype=dtype))
    assert ckpt.load(ckpt.projections()[0]).dtype == dtype


def test_phi3_fused_split(tmp_path):
    folder = write_tiny_model(tmp_path / "phi", arch="Phi3ForCausalLM", heads=4, kv_heads=2)
    ckpt = Checkpoint.open(folder)
    shapes = {p.kind: p.shape for p in ckpt.projections() if p.layer == 0}
    assert shapes["q"] == (64, 64) and shapes["k"] == (32, 64) and shapes["v"] == (32, 64)
    assert shapes["gate"] == (96, 64) and shapes["up"] == (96, 64)
    fused = ckpt.tensor("model.layers.0.self_attn.qkv_proj.weight")
    q, k, v = (ckpt.load(p) for p in ckpt.projections()[:3])
    assert torch.equal(torch.cat([q, k, v]), fused)


def test_phi3_inconsistent_fused_shape(tmp_path):
    folder = write_tiny_model(tmp_path / "phi", arch="Phi3ForCausalLM")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ActTailError, match="rows but config.json implies"):
        Checkpoint.open(folder).projections()
    del cfg["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ActTailError, match="config.json lacks the sizes that split .*qkv_proj"):
        Checkpoint.open(folder).projections()


def test_fingerprint_changes_with_weights(tmp_path):
    a = Checkpoint.open(write_tiny_model(tmp_path / "a", seed=1)).fingerprint
    b = Checkpoint.open(write_tiny_model(tmp_path / "b", seed=2)).fingerprint
    a2 = Checkpoint.open(write_tiny_model(tmp_path / "c", seed=1)).fingerprint
    assert a == a2 and a != b and a.startswith("sha256:")


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"),
    ("noconfig", "no config.json"),
    ("garbage", "garbage|corrupt"),
    ("truncated", "truncated"),
    ("arch", "unsupported architecture"),
    ("dtype", "dtype I32"),
])
def test_bad_input(tmp_path, case, match):
    folder = write_tiny_model(tmp_path / "m")
    st = folder / "model.safetensors"
    if case == "missing":
        folder = tmp_path / "nope"
    elif case == "noconfig":
        (folder / "config.json").unlink()
    elif case == "garbage":
        st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    elif case == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif case == "arch":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"] = ["BertModel"]
        (folder / "config.json").write_text(json.dumps(cfg))
    elif case == "dtype":
        t = {f"model.layers.0.self_attn.{k}_proj.weight": torch.zeros(4, 4, dtype=torch.int32) for k in "qkvo"}
        t.update({f"model.layers.0.mlp.{k}_proj.weight": torch.zeros(4, 4, dtype=torch.int32)
                  for k in ("gate", "up", "down")})
        save_file(t, str(st))
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(num_hidden_layers=1, hidden_size=4, intermediate_size=4, num_attention_heads=1,
                   num_key_value_heads=1)  # shapes agree with config.json: only the dtype is wrong
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ActTailError, match=match):
        ckpt = Checkpoint.open(folder)
        ckpt.load(ckpt.projections()[0])
