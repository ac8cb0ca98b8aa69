"""BOS: each window starts with it exactly when the model's tokenizer asks for it (``tokens.bos_id``), so
perplexity equals transformers' on the same text; models that do not ask keep their windows as they were."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import acttail
from acttail.cli import main
from acttail.errors import ActTailError
from acttail.files import cache_dir
from acttail.runtime.tokens import bos_id, load_tokenizer, text_tokens, tokenizer_bos, windows

from runtime_tiny import write_hf_model, write_text

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny Gemma 3 whose tokenizer asks for BOS, its transformers model and tokenizer, and a text."""
    root = tmp_path_factory.mktemp("bos")
    hf = write_hf_model(root / "gemma3", "gemma3", seed=5, scale=0.3, bos=True)
    tok = transformers.AutoTokenizer.from_pretrained(root / "gemma3")
    return {"folder": root / "gemma3", "hf": hf, "tok": tok, "text": write_text(root / "held.txt", 3000, seed=9)}


def hf_perplexity(hf, wins: torch.Tensor) -> float:
    with torch.no_grad():
        logits = hf(wins).logits
    return math.exp(float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), wins[:, 1:].flatten())))


def test_windows_start_with_bos_as_transformers_tokenizes_them(gemma3):
    """Each window is what transformers' tokenizer gives for that window's text on its own: BOS + tokens."""
    bos = bos_id(gemma3["folder"])
    assert bos == 1 == gemma3["tok"].bos_token_id
    text = gemma3["text"].read_text()
    ids = text_tokens(load_tokenizer(gemma3["folder"]), text, 1000)
    wins = windows(ids, 64, 256, bos=bos)
    hf_ids = gemma3["tok"](text)["input_ids"]
    assert hf_ids[0] == bos and hf_ids[1:1001] == ids.tolist()
    assert wins.shape == (1000 // 63, 64) and (wins[:, 0] == bos).all()
    for k, w in enumerate(wins):  # window k: BOS, then tokens 63k .. 63k + 62 of the text
        assert w[1:].tolist() == hf_ids[1 + 63 * k: 1 + 63 * (k + 1)]
        piece = gemma3["tok"].decode(w[1:].tolist())
        assert gemma3["tok"](piece)["input_ids"][0] == bos


def test_gemma3_perplexity_with_bos_equals_transformers(gemma3, tmp_path):
    """`acttail eval` and `acttail.evaluate` (ours, and transformers' model with its tokenizer) all give
    transformers' perplexity on BOS-led windows, and it is not the one without BOS."""
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", str(gemma3["folder"]), "--text", str(gemma3["text"]), "--ctx", "64",
                                  "--tokens", "1000", "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["bos"] == 1
    ids = gemma3["tok"](gemma3["text"].read_text())["input_ids"][1:1001]
    n = len(ids) // 63
    wins = torch.cat([torch.ones(n, 1, dtype=torch.long), torch.tensor(ids[: 63 * n]).view(n, 63)], dim=1)
    ref = hf_perplexity(gemma3["hf"], wins)
    assert doc["perplexity"] == pytest.approx(ref, rel=1e-5)
    text = gemma3["text"].read_text()
    ours = acttail.evaluate(acttail.load(gemma3["folder"]), text, tokens=1000, ctx=64, progress=False)
    theirs = acttail.evaluate(gemma3["hf"], text, gemma3["tok"], tokens=1000, ctx=64, progress=False)
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-5) and theirs["perplexity"] == pytest.approx(ref, rel=1e-5)
    plain = torch.tensor(ids[: 64 * (len(ids) // 64)]).view(-1, 64)
    assert abs(hf_perplexity(gemma3["hf"], plain) / ref - 1) > 1e-3  # BOS changes it: the test can fail


def test_windows_unchanged_when_no_bos_is_asked(tmp_path):
    """A tokenizer that asks for no BOS (no tokenizer_config.json, or add_bos_token false, as SmolLM2 and
    Qwen2.5 are converted) gives the plain cut of the token stream, exactly as before."""
    folder = tmp_path / "llama"
    write_hf_model(folder, "llama", seed=1)
    assert bos_id(folder) is None
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<eos>"}))
    assert bos_id(folder) is None
    ids = torch.arange(1000)
    assert torch.equal(windows(ids, 128, 256, bos=None), ids[: 7 * 128].view(7, 128))
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b"):  # the converted real models, where fetched
        if (cache_dir() / "models" / name / "tokenizer.json").is_file():
            assert bos_id(cache_dir() / "models" / name) is None


def test_bos_rule(tmp_path):
    folder = tmp_path / "m"
    write_hf_model(folder, "gemma", seed=2)  # a Gemma whose tokenizer files say nothing: BOS all the same
    config = json.loads((folder / "config.json").read_text())
    assert bos_id(folder) == config["bos_token_id"] == 0
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert bos_id(folder) is None  # the tokenizer's own word wins
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<eos>"}))
    assert bos_id(folder) == 0
    (folder / "config.json").write_text(json.dumps({**config, "bos_token_id": None}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    with pytest.raises(ActTailError, match="names no BOS token id"):
        bos_id(folder)
    assert tokenizer_bos(load_tokenizer(folder)) is None


def test_generate_prompt_starts_with_bos(gemma3):
    """`acttail generate` continues the prompt as transformers does from its tokenized (BOS-led) prompt."""
    r = CliRunner().invoke(main, ["generate", str(gemma3["folder"]), "--prompt", "the cat sat on",
                                  "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    prompt = gemma3["tok"]("the cat sat on", return_tensors="pt")["input_ids"]
    assert prompt[0, 0] == 1
    with torch.no_grad():
        ref = gemma3["hf"].generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert r.stdout.splitlines()[0] == gemma3["tok"].decode(ref[0, prompt.shape[1]:])


def test_gemma3_270m_perplexity_equals_transformers(tmp_path):
    """The real Gemma-3-270M (`acttail fetch gemma3-270m`): `acttail eval` on wiki text equals transformers'
    perplexity on the windows its tokenizer gives (BOS + 127 tokens each), and BOS matters a lot."""
    folder = cache_dir() / "models" / "gemma-3-270m"
    wiki = cache_dir() / "text" / "wiki.txt"
    if not (folder / "model.safetensors").is_file() or not wiki.is_file():
        pytest.skip("run `acttail fetch gemma3-270m` and `acttail fetch wiki`")
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", str(folder), "--text", str(wiki), "--ctx", "128", "--tokens", "381",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok(wiki.read_text()[:20000])["input_ids"]
    assert ids[0] == 2 == doc["settings"]["bos"]
    wins = torch.cat([torch.full((3, 1), 2), torch.tensor(ids[1:382]).view(3, 127)], dim=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = hf_perplexity(hf, wins)
    print(f"Gemma-3-270M wiki perplexity, 3 x 128 with BOS: ours {doc['perplexity']:.4f}, transformers {ref:.4f}")
    assert doc["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert hf_perplexity(hf, torch.tensor(ids[1:385]).view(3, 128)) > 1.3 * ref  # without BOS: far worse
