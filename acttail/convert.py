"""GGUF import: turn a llama.cpp GGUF file into an HF model folder (config.json, model.safetensors,
tokenizer.json) that the checkpoint reader and the runtime load like any other.

Weights are dequantized with the ``gguf`` package into float32, which holds every dequantized value
exactly (Q4/Q5/Q8 blocks are fp16 scales times small integers). llama.cpp permutes the rows of q and k for
its interleaved rotary layout on Llama models; we undo that so the weights match the HF layout.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .errors import ActTailError
from .files import check_output

ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

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
    return config


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its ``LlamaModel.permute``) for the HF rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    """The HF tensor name of a GGUF tensor name."""
    if name in _NAMES:
        return _NAMES[name]
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in _BLOCK:
        raise ActTailError(f"GGUF tensor {name!r} has no HF equivalent we know")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as float32 in HF (row = output) layout."""
    from gguf import dequantize as gguf_dequantize

    data = gguf_dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def hf_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF, dequantized, renamed, and with q/k un-permuted on Llama models."""
    out = {}
    llama = config["model_type"] == "llama"
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", leave=False):
        name = hf_name(t.name)
        w = dequantize(t)
        if llama and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif llama and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        out[name] = w.contiguous()
    return out


def hf_tokenizer_json(reader) -> str:
    """A tokenizer.json (HF tokenizers) for the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ActTailError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
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
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(special)
    return tok.to_str(pretty=True)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer.json) from a GGUF file.

    ``out_dir`` must be new or an empty folder, in an existing writable folder: checked before any work.
    The folder appears complete or not at all: it is written into a temporary folder beside it, then
    renamed; if another run created it meanwhile, this one stops with a clear error and leaves nothing.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, folder=True)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ActTailError(f"output folder {out_dir} exists and is not empty")
    reader = open_gguf(gguf_path)
    config = hf_config(reader)
    tokenizer = hf_tokenizer_json(reader)
    tensors = hf_tensors(reader, config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        _rename_into(tmp, out_dir)
    except OSError as e:
        raise ActTailError(f"cannot write {out_dir}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


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
