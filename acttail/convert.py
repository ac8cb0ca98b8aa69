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

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import ActTailError
from .outputs import check_new_folder, write_model_folder
from .gguf_file import GEMMA, REQUIRED, get, gguf_architecture, open_gguf
from .gguf_tokenizer import hf_tokenizer

ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
         "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}

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

def check_architecture(path: str | Path) -> str:
    """The GGUF's architecture if we convert it, else one clear error (before anything is dequantized)."""
    arch = gguf_architecture(path)
    if arch not in ARCHS:
        raise ActTailError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    return arch


def hf_config(reader) -> dict:
    """An HF config.json for the GGUF's architecture, from its metadata."""
    arch = get(reader, "general.architecture", "str")
    if arch not in ARCHS:
        raise ActTailError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}")
    hf_arch, model_type = ARCHS[arch]
    g = lambda k, kind="int", d=REQUIRED, lo=1: get(reader, f"{arch}.{k}", kind, d, lo)  # noqa: E731
    heads, hidden = g("attention.head_count"), g("embedding_length")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ActTailError("GGUF with rope_freqs (Llama-3 rope scaling) is not supported yet")
    embed = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if embed and len(embed[0].shape) != 2:
        raise ActTailError(f"GGUF tensor token_embd.weight has shape {list(embed[0].shape)}, expected 2 dimensions")
    vocab = int(embed[0].shape[1]) if embed else len(get(reader, "tokenizer.ggml.tokens", "strs"))
    config = {
        "architectures": [hf_arch], "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", d=heads),
        "head_dim": g("attention.key_length", d=max(1, hidden // heads)),
        "max_position_embeddings": g("context_length", lo=2),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", "number", lo=0)),
        "rope_theta": float(g("rope.freq_base", "number", 10000.0, lo=1e-30)),
        "vocab_size": vocab, "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": get(reader, "tokenizer.ggml.bos_token_id", "int", None, 0),
        "eos_token_id": get(reader, "tokenizer.ggml.eos_token_id", "int", None, 0),
        "torch_dtype": "float32",
    }
    scaling = g("rope.scaling.type", "str", None)
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor", "number", lo=1e-30))}
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
    pattern = g("attention.sliding_window_pattern", "pattern", 6, None)
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise ActTailError(f"GGUF metadata gemma3.attention.sliding_window_pattern has {len(pattern)} flags "
                               f"for {n} layers")
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [bool((i + 1) % pattern) for i in range(n)]
    softcap = {k: g(k, "number", None, 1e-30) for k in ("final_logit_softcapping", "attn_logit_softcapping")}
    return {"hidden_activation": "gelu_pytorch_tanh",
            "rope_local_base_freq": float(g("rope.freq_base_swa", "number", 10000.0, 1e-30)),
            "sliding_window": g("attention.sliding_window"),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if n == 62
            else config["head_dim"], **softcap, "use_bidirectional_attention": False}


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its ``LlamaModel.permute``) for the HF rotate-half layout."""
    if w.shape[0] % (2 * n_head):
        raise ActTailError(f"a q/k tensor of {w.shape[0]} rows cannot hold {n_head} heads of rotary pairs")
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, arch: str = "llama") -> str:
    """The HF tensor name of a GGUF tensor name."""
    if name in _NAMES:
        return _NAMES[name]
    block = _GEMMA3_BLOCK if arch == "gemma3" else _BLOCK
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in block:
        shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
        raise ActTailError(f"GGUF tensor {shown} has no HF equivalent we know")
    return f"model.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"


def dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as float32 in HF (row = output) layout."""
    from gguf import dequantize as gguf_dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        data = np.array(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except Exception as e:  # the gguf package: unknown or unsupported quantization types, odd block sizes
        raise ActTailError(f"cannot dequantize GGUF tensor {tensor.name!r} ({type(e).__name__}: "
                           f"{str(e)[:120]})") from None
    if data.size != math.prod(shape):
        raise ActTailError(f"GGUF tensor {tensor.name!r} holds {data.size} values, its shape {list(shape)} "
                           f"needs {math.prod(shape)}")
    return torch.from_numpy(data.reshape(shape))


def hf_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF, dequantized, renamed, with q/k un-permuted on Llama models and the norms of
    Gemma models minus the one llama.cpp added."""
    out = {}
    arch = get(reader, "general.architecture", "str")
    llama = config["model_type"] == "llama"
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", leave=False):
        name = hf_name(t.name, arch)
        if name in out:
            raise ActTailError(f"the GGUF holds tensor {t.name!r} twice")
        w = dequantize(t)
        if arch in GEMMA and name.endswith("norm.weight"):
            w = w - 1
        if llama and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif llama and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        out[name] = w.contiguous()
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) from a GGUF.

    ``out_dir`` must be new or an empty folder, in an existing writable folder: checked before any work. An
    architecture we do not convert is refused from the file's header, before the file is parsed. The folder
    appears complete or not at all: it is written into a temporary folder beside it, then renamed; if
    another run created it meanwhile, this one stops with a clear error and leaves nothing.
    """
    out_dir = check_new_folder(out_dir, [("the GGUF file", gguf_path)])
    check_architecture(gguf_path)
    reader = open_gguf(gguf_path)
    config = hf_config(reader)
    tokenizer, tokenizer_config = hf_tokenizer(reader)
    tensors = hf_tensors(reader, config)
    files = {"config.json": json.dumps(config, indent=2) + "\n", "tokenizer.json": tokenizer,
             "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
             "generation_config.json": json.dumps({"bos_token_id": config["bos_token_id"],
                                                   "eos_token_id": config["eos_token_id"]}, indent=2) + "\n"}
    write_model_folder(out_dir, tensors, files)
    return out_dir
