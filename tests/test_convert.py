"""GGUF import: the rotary un-permutation, and the converted SmolLM2 equals transformers' GGUF loader."""

import pytest
import torch

from acttail.convert import convert_gguf, unpermute_rotary
from acttail.errors import ActTailError
from acttail.files import cache_dir


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute, which the import must undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 8])
def test_unpermute_inverts_llama_cpp(n_head):
    w = torch.randn(n_head * 16, 24)
    assert torch.equal(unpermute_rotary(llama_cpp_permute(w, n_head), n_head), w)
    b = torch.randn(n_head * 16)
    assert torch.equal(unpermute_rotary(llama_cpp_permute(b, n_head), n_head), b)


def test_bad_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ActTailError, match="not a readable GGUF"):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(ActTailError, match="not found"):
        convert_gguf(tmp_path / "none.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_smollm2_matches_transformers_gguf_loader(tmp_path):
    """Converted weights, logits and tokenizer equal transformers' own GGUF loading of the same file."""
    gguf = cache_dir() / "gguf" / "smollm2-135m.gguf"
    if not gguf.is_file():
        pytest.skip("SmolLM2 GGUF not fetched: run `acttail fetch smollm2`")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = convert_gguf(gguf, tmp_path / "smol")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    ids = torch.tensor([[1, 504, 3458, 282, 4371, 314, 253, 1345, 30, 378, 5, 17, 18, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    from tokenizers import Tokenizer

    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The 2007 European Parliament election in Romania was held on 25 November 2007 (12,345 votes)."
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == ref_tok(text)["input_ids"]
