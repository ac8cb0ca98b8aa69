"""GGUF import: turn a llama.cpp GGUF file into an HF model folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that the checkpoint reader and the runtime load like any other.

The architecture is read from the start of the file and checked before anything else is parsed (the
``gguf`` reader takes seconds on a large vocabulary). Weights are dequantized with the ``gguf`` package
into float32, which holds every dequantized value exactly (Q4/Q5/Q8 blocks are fp16 scales times small
integers). llama.cpp permutes the rows of q and k for its interleaved rotary layout on Llama models, and
stores Gemma's norm weights plus one; we undo both so the weights match the HF layout. Tokenizers:
byte-level BPE (``gpt2``) and SentencePiece (``llama``), rebuilt as transformers' GGUF loader does.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .errors import ActTailError
from .files import check_output, check_outputs, write_file, writing

ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
         "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
GEMMA = ("gemma", "gemma2", "gemma3")  # llama.cpp stores their norm weights as 1 + weight

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Gemma 3 (as llama.cpp names its norms): ffn_norm is the pre-feedforward norm, and there are three more.
_GEMMA3_BLOCK = {**_BLOCK, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
                 "attn_k_norm": "self_attn.k_norm"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# Pre-tokenizer regexes of llama.cpp's BPE "pre" types we support (HF tokenizer.json equivalents).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def open_gguf(path: str | Path):
    """Open a GGUF file with the gguf package, turning a bad file into one clear error."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ActTailError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError for bad files
        raise ActTailError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


# GGUF metadata value types: fixed sizes in bytes (8 is a string, 9 an array).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file, read from its header alone: the metadata comes first and
    llama.cpp writes this key first, so a refusal costs milliseconds, not a parse of the whole file."""
    path = Path(path)
    if not path.is_file():
        raise ActTailError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            order = "<" if struct.unpack("<I", f.read(4))[0] < 0x10000 else ">"  # version: little-endian, or not
            _, n_kv = struct.unpack(order + "QQ", _read(f, 16))
            for _ in range(n_kv):
                key = _read_string(f, order)
                (kind,) = struct.unpack(order + "I", _read(f, 4))
                if key == "general.architecture" and kind == _GGUF_STRING:
                    return _read_string(f, order)
                _skip_value(f, order, kind)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as e:
        raise ActTailError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    raise ActTailError(f"{path} is not a readable GGUF file (no general.architecture in its metadata)")


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated header")
    return data


def _read_string(f, order: str) -> str:
    (n,) = struct.unpack(order + "Q", _read(f, 8))
    if n > 1 << 24:
        raise ValueError(f"implausible string length {n}")
    return _read(f, n).decode("utf-8")


def _skip_value(f, order: str, kind: int) -> None:
    if kind == _GGUF_STRING:
        (n,) = struct.unpack(order + "Q", _read(f, 8))
        f.seek(n, 1)
    elif kind == _GGUF_ARRAY:
        item, count = struct.unpack(order + "IQ", _read(f, 12))
        if item in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[item] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, order, item)
    elif kind in _GGUF_SIZES:
        f.seek(_GGUF_SIZES[kind], 1)
    else:
        raise ValueError(f"unknown metadata value type {kind}")


def check_architecture(path: str | Path) -> str:
    """The GGUF's architecture if we convert it, else one clear error (before anything is dequantized)."""
    arch = gguf_architecture(path)
    if arch not in ARCHS:
        raise ActTailError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    return arch


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config(reader) -> dict:
    """An HF config.json for the GGUF's architecture, from its metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ActTailError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    hf_arch, model_type = ARCHS[arch]
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ActTailError("GGUF with rope_freqs (Llama-3 rope scaling) is not supported yet")
    embed = [t for t in reader.tensors if t.name == "token_embd.weight"]
    vocab = int(embed[0].shape[1]) if embed else len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": [hf_arch], "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab), "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = g("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ActTailError(f"GGUF rope scaling {scaling!r} is not supported")
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    if arch == "gemma3":
        del config["hidden_act"]  # Gemma 3's config reads hidden_activation
        config.update(_gemma3_config(config, g))
    return config


def _gemma3_config(config: dict, g) -> dict:
    """Gemma 3's settings as llama.cpp runs a gemma3 GGUF: every sixth layer global (or the file's
    sliding_window_pattern), sliding layers with rope base 10000 (or the file's freq_base_swa), scores scaled
    by head_dim**-0.5 (the 27B, 62 layers: (hidden / heads)**-0.5), GeGLU; norms stored plus one (undone in
    ``hf_tensors``)."""
    n = config["num_hidden_layers"]
    pattern = g("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: true for sliding
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [bool((i + 1) % int(pattern or 6)) for i in range(n)]
    out = {"hidden_activation": "gelu_pytorch_tanh", "rope_local_base_freq": float(g("rope.freq_base_swa", 10000.0)),
           "sliding_window": int(g("attention.sliding_window")),
           "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
           "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if n == 62
           else config["head_dim"], "final_logit_softcapping": g("final_logit_softcapping"),
           "attn_logit_softcapping": g("attn_logit_softcapping"), "use_bidirectional_attention": False}
    return out


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its ``LlamaModel.permute``) for the HF rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, arch: str = "llama") -> str:
    """The HF tensor name of a GGUF tensor name."""
    if name in _NAMES:
        return _NAMES[name]
    block = _GEMMA3_BLOCK if arch == "gemma3" else _BLOCK
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in block:
        raise ActTailError(f"GGUF tensor {name!r} has no HF equivalent we know")
    return f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"


def dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as float32 in HF (row = output) layout."""
    from gguf import dequantize as gguf_dequantize

    data = gguf_dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def hf_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF, dequantized, renamed, with q/k un-permuted on Llama models and the norms of
    Gemma models minus the one llama.cpp added."""
    out = {}
    arch = _field(reader, "general.architecture")
    llama = config["model_type"] == "llama"
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", leave=False):
        name = hf_name(t.name, arch)
        w = dequantize(t)
        if arch in GEMMA and name.endswith("norm.weight"):
            w = w - 1
        if llama and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif llama and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        out[name] = w.contiguous()
    return out


def hf_tokenizer(reader) -> tuple[str, dict]:
    """tokenizer.json (HF tokenizers) and tokenizer_config.json for the GGUF's tokenizer: byte-level BPE
    (``gpt2``) or SentencePiece (``llama``). The tokenizer puts BOS (and EOS) around a text when the GGUF
    says so (tokenizer.ggml.add_bos_token; llama.cpp's default: yes for SentencePiece, no for BPE), and
    tokenizer_config.json says it too, as transformers reads it."""
    from tokenizers import AddedToken, processors

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level_bpe(reader, tokens)
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
        tok.add_special_tokens(special)
    elif kind == "llama":
        if _field(reader, "general.architecture") in GEMMA:
            tokens = _spell_spaces(tokens)
        tok = _sentencepiece(reader, tokens)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (2, 3)])  # unknown and control
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == 4])  # user-defined: matched whole
    else:
        raise ActTailError(f"GGUF tokenizer model {kind!r} is not supported (gpt2: byte-level BPE, llama: "
                           "SentencePiece)")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    ids = {role: i for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
           if isinstance(i := _field(reader, f"tokenizer.ggml.{key}_token_id"), int) and 0 <= i < len(tokens)}
    names = {f"{role}_token": tokens[i] for role, i in ids.items()}
    ends = [role for role, add in (("bos", add_bos), ("eos", add_eos)) if add]
    if any(role not in ids for role in ends):
        raise ActTailError(f"the GGUF asks for {' and '.join(ends).upper()} around every text but gives no token id")
    if ends:
        template = ([names["bos_token"]] if add_bos else []) + ["$A"] + ([names["eos_token"]] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(template), special_tokens=[(names[f"{role}_token"], ids[role]) for role in ends])
    config = {"add_bos_token": add_bos, "add_eos_token": add_eos, **names,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return tok.to_str(pretty=True), config


def _byte_level_bpe(reader, tokens):
    """Byte-level BPE (GPT-2 style) with the GGUF's merges and its pre-tokenizer (smollm, qwen2, gpt2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ActTailError(f"GGUF BPE pre-tokenizer {pre!r} is not supported (smollm, qwen2, gpt2)")
    tok.decoder = decoders.ByteLevel()
    return tok


def _spell_spaces(tokens: list[str]) -> list[str]:
    """Gemma's GGUFs store the tokens that are runs of spaces with real spaces; SentencePiece, and so the
    tokenizer's normalizer and merges, spell them with U+2581 (as transformers' GGUF loader does)."""
    return ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _sentencepiece(reader, tokens):
    """A SentencePiece vocabulary as BPE with byte fallback, as llama.cpp runs it (pairs merged best first)
    and transformers rebuilds it: merges from every split of a token into two tokens, ordered by the
    token's score, or for Gemma by its position in the file (Gemma's scores do not follow its merge order).
    Spaces become U+2581; a space is put before the text when the GGUF says so (add_space_prefix, llama.cpp's
    default yes; Gemma no)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    arch = _field(reader, "general.architecture")
    if arch in GEMMA:
        priority = {t: -i for i, t in enumerate(tokens)}
    else:
        priority = dict(zip(tokens, _field(reader, "tokenizer.ggml.scores")))
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=sentencepiece_merges(tokens, priority),
                               unk_token=tokens[unk] if unk is not None else None, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _field(reader, "tokenizer.ggml.add_space_prefix", arch not in GEMMA):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(steps)
    return tok


def sentencepiece_merges(tokens: list[str], priority: dict) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: each way to split a token into two tokens, the token with the
    highest ``priority`` first (ties: longer left part, then longer right part; within a token, by the
    parts' ids), as transformers' ``generate_merges`` orders them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in priority.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) from a GGUF.

    ``out_dir`` must be new or an empty folder, in an existing writable folder: checked before any work. An
    architecture we do not convert is refused from the file's header, before the file is parsed. The folder
    appears complete or not at all: it is written into a temporary folder beside it, then renamed; if
    another run created it meanwhile, this one stops with a clear error and leaves nothing.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, folder=True)
    check_outputs([("the GGUF file", gguf_path)], [("output folder", out_dir)])
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ActTailError(f"output folder {out_dir} exists and is not empty")
    check_architecture(gguf_path)
    reader = open_gguf(gguf_path)
    config = hf_config(reader)
    tokenizer, tokenizer_config = hf_tokenizer(reader)
    tensors = hf_tensors(reader, config)
    with writing(out_dir):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with writing(out_dir):
            _save_tensors(tensors, tmp / "model.safetensors", out_dir)
            write_file(tmp / "config.json", json.dumps(config, indent=2) + "\n")
            write_file(tmp / "tokenizer.json", tokenizer)
            write_file(tmp / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
            write_file(tmp / "generation_config.json", json.dumps(
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2) + "\n")
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            _rename_into(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_tensors(tensors: dict, path: Path, out_dir: Path) -> None:
    """safetensors' save_file, its own error (a full disk: "No space left on device (os error 28)") one
    ActTailError."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        raise ActTailError(f"cannot write {out_dir}: {str(e).removeprefix('Error while serializing: ')}") from None


def _rename_into(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder onto ``out_dir`` (replacing an empty folder, as POSIX rename does)."""
    try:
        os.rename(tmp, out_dir)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        raise ActTailError(f"{out_dir} appeared while converting (another run?): left as it is") from None
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ActTailError(f"{out_dir} was filled while converting (another run?): left as it is") from None
        raise
