"""What the fuzz harnesses share: a scratch folder and cache, seed files built from a tiny model, JSON edits
driven by the fuzzer's bytes, and the libFuzzer entry point.

Each harness (``fuzz/<reader>.py``) feeds bytes to one of acttail's readers and asserts the one promise of
every reader: an input either parses or raises ``ActTailError``; any other exception is a crash that
libFuzzer reports (and saves as ``crash-<sha1>``). Run one with libFuzzer's options, for example
``python fuzz/plan_reader.py -runs=1000000 CORPUS_DIR``; seed inputs are written into an empty corpus folder
(or a temporary one when none is given). reports/fuzz/README.md records the long runs.

A harness imports acttail inside ``atheris.instrument_imports`` before it imports this module, so that
coverage of acttail's own code guides the fuzzer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import atheris



def _scratch() -> Path:
    """$ACTTAIL_FUZZ_SCRATCH, or a folder of this process in /dev/shm (memory). libFuzzer ends the process
    without Python's exit handlers, so folders of processes no longer running are removed here instead."""
    if os.environ.get("ACTTAIL_FUZZ_SCRATCH"):
        return Path(tempfile.mkdtemp(prefix="acttail-fuzz-", dir=os.environ["ACTTAIL_FUZZ_SCRATCH"]))
    root = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    for old in root.glob("acttail-fuzz-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"acttail-fuzz-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


SCRATCH = _scratch()
os.environ["ACTTAIL_CACHE"] = str(SCRATCH / "cache")
os.environ["TQDM_DISABLE"] = "1"
warnings.simplefilter("ignore")


def folder(name: str) -> Path:
    """An empty scratch folder (emptied again on every call: one input at a time)."""
    path = SCRATCH / name
    path.mkdir(exist_ok=True)
    for f in path.iterdir():
        f.unlink()
    return path


# ---- a tiny model and its files ----------------------------------------------------------------------

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True,
          "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def tiny_tensors() -> dict:
    """The weights of CONFIG's decoder (one layer, hidden 8), seeded."""
    import torch

    g = torch.Generator().manual_seed(0)
    c = CONFIG
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "model.layers.0.input_layernorm.weight": (h,), "model.layers.0.post_attention_layernorm.weight": (h,),
              "model.layers.0.self_attn.q_proj.weight": (c["num_attention_heads"] * hd, h),
              "model.layers.0.self_attn.k_proj.weight": (c["num_key_value_heads"] * hd, h),
              "model.layers.0.self_attn.v_proj.weight": (c["num_key_value_heads"] * hd, h),
              "model.layers.0.self_attn.o_proj.weight": (h, c["num_attention_heads"] * hd),
              "model.layers.0.mlp.gate_proj.weight": (i, h), "model.layers.0.mlp.up_proj.weight": (i, h),
              "model.layers.0.mlp.down_proj.weight": (h, i)}
    return {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}


def tiny_model(path: Path, config: dict | None = None) -> Path:
    """A model folder: config.json, model.safetensors, and a small byte-level tokenizer.json (BOS added)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    save_file(tiny_tensors(), str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text(tiny_tokenizer())
    return path


def tiny_tokenizer() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "Ġ", "Ġa"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


# ---- JSON edits driven by the fuzzer -----------------------------------------------------------------

PALETTE = [None, True, False, 0, 1, -1, 2, 7, 2**31, 2**63 - 1, 2**63, -2**63 - 1, 10**400, 0.0, -0.0, 0.5, 1.5,
           -1.5, 1e308, 5e-324, math.nan, math.inf, -math.inf, "", "x", "no", "layers.0.q", "layers.99.q",
           "LlamaForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "sliding_attention", "longrope", "linear",
           "x" * 500, "\u2581", [], {}, [1], [None], ["a"], {"a": 1}, {"rope_type": "llama3"}]


def _nodes(doc, deepest: int = 100) -> list:
    """Every (path, value) of a JSON document down to ``deepest`` levels, the document itself first."""
    out, todo = [], [((), doc)]
    while todo:
        path, node = todo.pop()
        out.append((path, node))
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        if len(path) < deepest:
            todo.extend(reversed([(path + (k,), v) for k, v in items]))
    return out


def _value(fdp):
    """A value to put in a document: from PALETTE, or an integer, float, string, or deep nesting."""
    pick = fdp.ConsumeIntInRange(0, len(PALETTE) + 3)
    if pick < len(PALETTE):
        return copy.deepcopy(PALETTE[pick])  # never one list in two places
    return [lambda: fdp.ConsumeInt(8), lambda: fdp.ConsumeFloat(), lambda: fdp.ConsumeUnicode(12),
            lambda: _deep(fdp.ConsumeIntInRange(1, 80))][pick - len(PALETTE)]()


def _deep(n: int):
    doc = 0
    for _ in range(n):
        doc = [doc]
    return doc


def edited(seeds: list, fdp) -> bytes:
    """JSON text of one of ``seeds`` (documents) after up to 6 edits chosen by the fuzzer's bytes: a value
    replaced (by a value of any type), a key or item removed, an item duplicated, a key added."""
    doc = json.loads(json.dumps(seeds[fdp.ConsumeIntInRange(0, len(seeds) - 1)]))
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        nodes = _nodes(doc)
        path, node = nodes[fdp.ConsumeIntInRange(0, len(nodes) - 1)]
        op = fdp.ConsumeIntInRange(0, 3)
        if not path:
            if op == 0:
                doc = _value(fdp)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        if op == 0:
            parent[last] = _value(fdp)
        elif op == 1:
            del parent[last]
        elif op == 2 and isinstance(parent, list):
            parent.insert(last, json.loads(json.dumps(node)))
        elif isinstance(node, dict):
            node[fdp.ConsumeUnicode(8) or "k"] = _value(fdp)
    return json.dumps(doc, allow_nan=True).encode()


def json_input(data: bytes, seeds: list) -> bytes:
    """The file bytes an input stands for: the first byte chooses raw bytes (the rest, as they are) or edits
    of a seed document (the rest drives ``edited``)."""
    if not data or data[0] % 2 == 0:
        return data[1:]
    return edited(seeds, atheris.FuzzedDataProvider(data[1:]))


def json_seeds(docs: list) -> list[bytes]:
    """Seed inputs for ``json_input``: each document as raw bytes, and the plain edit mode."""
    return [b"\0" + json.dumps(d, indent=2).encode() for d in docs] + [b"\1", b"\1\0\1\2"]


# ---- running ---------------------------------------------------------------------------------------------

def main(read, seeds: list[bytes], valid: list[bytes]) -> None:
    """libFuzzer on ``read`` (an input's bytes -> True when read, False when refused) with sys.argv's
    options. ``seeds`` are written into the first corpus folder given when it is empty (a temporary one
    when none is); ``valid`` (seeds that must read without error: a harness that refuses them tests
    nothing) are checked first."""
    refused = [i for i, seed in enumerate(valid) if not read(seed)]
    if refused:
        sys.exit(f"fuzz harness: valid seeds {refused} were refused; the harness no longer reaches the reader")
    argv = list(sys.argv)
    corpora = [a for a in argv[1:] if not a.startswith("-")]
    if not corpora:
        corpora = [str(folder("corpus"))]
        argv.append(corpora[0])
    corpus = Path(corpora[0])
    if not corpus.is_file():  # a file: libFuzzer runs it once (reproducing a crash-<sha1> it saved)
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for i, seed in enumerate(seeds):
                (corpus / f"seed-{i:02d}").write_bytes(seed)
    atheris.Setup(argv, lambda data: read(data) and None)
    atheris.Fuzz()
