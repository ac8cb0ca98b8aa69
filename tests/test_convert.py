"""GGUF import: the rotary un-permutation, the architecture check from the header, gemma3 and SentencePiece
(a tiny synthetic GGUF, and the real Gemma-3-270M where fetched), and the converted SmolLM2 equals
transformers' GGUF loader."""

import json

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


def test_gemma3_270m_matches_transformers_gguf_loader(tmp_path):
    """The real Gemma-3-270M GGUF (Q4_K_M, `acttail fetch gemma3-270m`): converted weights, logits past the
    sliding window, and token ids on wiki text equal transformers' own GGUF loading of the file."""
    gguf = cache_dir() / "gguf" / "gemma-3-270m.gguf"
    if not gguf.is_file():
        pytest.skip("Gemma-3-270M GGUF not fetched: run `acttail fetch gemma3-270m`")
    transformers = pytest.importorskip("transformers")
    from acttail.runtime import open_model
    from acttail.text import read_text

    out = convert_gguf(gguf, tmp_path / "gemma3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    del ours
    ids = torch.randint(3, 20000, (1, 520), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 2
    _, model = open_model(out)
    with torch.no_grad():
        expected = ref(ids).logits
        assert float((model(ids) - expected).norm() / expected.norm()) < 1e-4
    from tokenizers import Tokenizer

    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = read_text("wiki")[:20000] if (cache_dir() / "text" / "wiki.txt").is_file() else \
        "The 2007 European Parliament election in Romania was held on 25 November 2007 (12,345 votes)."
    assert tok.encode(text).ids == ref_tok(text)["input_ids"]


# ---- a tiny gemma3 GGUF with a SentencePiece vocabulary, written as llama.cpp writes one --------------

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's first ids
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TEXTS = ["the cat sat on a mat", "  two  spaces,\ttabs\n\nand new lines   ", "Ünïcödé ✓ 🤖 中文 <b>bold</b> far away",
         "old river town people walked slowly to market every day under bright warm sun."]


def spm_vocab(text: str, size: int = 300) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary (tokens, scores, token types) learned on text: Gemma's specials,
    the 256 byte tokens, pieces with U+2581 for spaces (score -rank), a user-defined <b> and two runs of
    spaces stored with real spaces, as Gemma's GGUFs hold them."""
    from tokenizers import SentencePieceBPETokenizer

    spm = SentencePieceBPETokenizer(add_prefix_space=False)
    spm.train_from_iterator(text.splitlines(), vocab_size=size, show_progress=False)
    pieces = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["<b>", "  ", "   "] + pieces
    types = [3, 3, 3, 2, 3] + [6] * 256 + [4, 1, 1] + [1] * len(pieces)
    scores = [0.0] * len(SPECIALS) + [0.0] * 256 + [0.0, -1.0, -2.0] + [-3.0 - i for i in range(len(pieces))]
    return tokens, scores, types


def write_gemma3_gguf(path, hf, tokens, scores, types, quantized=("ffn_down",)):
    """``hf`` (a transformers Gemma3ForCausalLM) as llama.cpp's converter writes it: GGUF names, norms
    plus one, F32 tensors (those named in ``quantized`` as Q8_0), the SentencePiece vocabulary."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = t.detach().float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        parts = name.split(".")
        if name.startswith("model.layers."):
            gname = f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:-1])]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        if gname.split(".")[-2] in quantized:
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
    """(GGUF path, source transformers model, vocabulary) of a tiny gemma3: head_dim 256 and six layers (the
    sixth global), so transformers' GGUF loader, which reads neither, gets the same model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from runtime_tiny import SLIDING_WINDOW, randomize, write_text

    root = tmp_path_factory.mktemp("gguf")
    tokens, scores, types = spm_vocab(write_text(root / "train.txt", 3000, seed=1).read_text())
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=256, rms_norm_eps=1e-6,
        sliding_window=SLIDING_WINDOW, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(cfg)
    randomize(hf)
    with torch.no_grad():  # norms on a 2^-10 grid: 1 + w - 1 is w again in float32
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_((p * 1024).round() / 1024)
    return write_gemma3_gguf(root / "tiny-gemma3.gguf", hf.eval(), tokens, scores, types), hf, tokens


def test_gemma3_gguf_converts_to_the_source_weights(gemma3_gguf, tmp_path):
    import gguf
    from safetensors.torch import load_file

    from acttail.runtime import open_model

    path, hf, tokens = gemma3_gguf
    out = convert_gguf(path, tmp_path / "g3")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["layer_types"][5] == "full_attention"
    ours = load_file(out / "model.safetensors")
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            assert "lm_head.weight" not in ours and config["tie_word_embeddings"]
        elif "down_proj" in name:  # stored as Q8_0: equal to the quantized values
            q = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
            ref = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))
            assert torch.equal(ours[name], ref) and not torch.equal(ours[name], t), name
        else:
            assert torch.equal(ours[name], t), name
    ids = torch.randint(0, len(tokens), (2, 40), generator=torch.Generator().manual_seed(0))  # 40 > window 8
    with torch.no_grad():
        for name, t in hf.named_parameters():
            if "down_proj" in name:
                t.copy_(ours[name])
        ref = hf(ids).logits
    _, model = open_model(out)
    assert float((model(ids) - ref).norm() / ref.norm()) < 1e-4


def test_cli_convert_gguf_writes_what_the_api_verb_writes(gemma3_gguf, tmp_path):
    """`acttail convert-gguf` is ``acttail.convert_gguf``: the same files, byte for byte (the other commands'
    parity with their verbs: tests/test_parity.py)."""
    from click.testing import CliRunner

    from acttail.cli import main

    r = CliRunner().invoke(main, ["convert-gguf", str(gemma3_gguf[0]), str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    api = convert_gguf(gemma3_gguf[0], tmp_path / "api")
    assert r.stdout.strip() == str(tmp_path / "cli")
    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert names and names == sorted(p.name for p in api.iterdir())
    for name in names:
        assert (tmp_path / "cli" / name).read_bytes() == (api / name).read_bytes(), name


def test_sentencepiece_tokenizer_round_trips_and_asks_for_bos(gemma3_gguf, tmp_path):
    from tokenizers import Tokenizer

    from acttail.runtime.tokens import bos_id

    out = convert_gguf(gemma3_gguf[0], tmp_path / "g3")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert bos_id(out) == 2
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids[0] == 2 and max(ids) < len(gemma3_gguf[2])
        assert tok.decode(ids[1:], skip_special_tokens=False) == text
    assert "<0xF0>" in tok.encode("🤖").tokens  # byte fallback for what the vocabulary lacks
    assert tok.encode("<b>x").tokens[1] == "<b>"  # user-defined tokens are matched whole
    assert len(tok.encode("the cat sat on a mat").ids) < len("the cat sat on a mat") // 2  # merges apply


def test_gemma3_gguf_agrees_with_transformers_gguf_loader(gemma3_gguf, tmp_path):
    """transformers reads the same GGUF to the same weights, logits and token ids."""
    transformers = pytest.importorskip("transformers")
    path, _, tokens = gemma3_gguf
    out = convert_gguf(path, tmp_path / "g3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    ids = torch.randint(0, len(tokens), (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    our_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert our_tok(text)["input_ids"] == ref_tok(text)["input_ids"], text


def test_unsupported_gguf_is_refused_from_its_header(tmp_path):
    """An architecture we do not convert is refused before the file is parsed: in milliseconds, while
    the gguf package's reader takes far longer on a large vocabulary."""
    import time

    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_token_list([f"tok{i}" for i in range(200_000)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    t0 = time.perf_counter()
    with pytest.raises(ActTailError, match="architecture 'falcon' is not supported"):
        convert_gguf(path, tmp_path / "out")
    refused = time.perf_counter() - t0
    t0 = time.perf_counter()
    gguf.GGUFReader(str(path))
    parsed = time.perf_counter() - t0
    print(f"refused in {refused * 1e3:.1f} ms; the full parse takes {parsed * 1e3:.0f} ms")
    assert refused < 0.05 < parsed and not (tmp_path / "out").exists()


def test_analyze_a_gguf_directly(gemma3_gguf, tmp_path):
    """`acttail analyze FILE.gguf` gives the analysis (and fingerprint) of the converted folder's weights."""
    from click.testing import CliRunner

    from acttail.cli import main

    path = gemma3_gguf[0]
    out = convert_gguf(path, tmp_path / "g3")
    docs = []
    for model in (path, out):
        r = CliRunner().invoke(main, ["analyze", str(model), "--json", "--force"])
        assert r.exit_code == 0, r.output
        docs.append(json.loads(r.output[r.output.index("{"):]))
    assert docs[0]["model"]["fingerprint"] == docs[1]["model"]["fingerprint"]
    assert docs[0]["model"]["path"] == str(path) and docs[0]["model"]["architecture"] == "Gemma3ForCausalLM"
    assert [r["alpha"] for r in docs[0]["projections"]] == [r["alpha"] for r in docs[1]["projections"]]
