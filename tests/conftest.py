"""Shared fixtures: tiny model folders written with safetensors (no hub, no transformers needed).

Without a CUDA GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before triton is
imported anywhere), with the compatibility shim below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _kernels_not_shadowed():
    """The top-level kernels/ folder installs as acttail.kernels; with the repository root itself on sys.path
    (``python -m pytest`` from the root) it would also be the top-level ``kernels`` and hide transformers' own
    ``kernels`` package, which transformers imports: say so in one line instead of failing in its import."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
    if spec is not None and spec.origin and Path(spec.origin).resolve() == ours:
        pytest.exit("run `pytest` or `make test`, not `python -m pytest` from the repository root: the root on "
                    "sys.path lets kernels/ shadow transformers' `kernels` package", returncode=2)


_kernels_not_shadowed()


def _interpreter_compat():
    """Triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 2.4 refuses; loops with
    run-time bounds (``range(0, nnz, BK)``) then fail under TRITON_INTERPRET=1. Convert through .item()."""
    try:
        import triton.runtime.interpreter as interp
    except Exception:  # triton missing or reorganised
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_acttail_compat", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._acttail_compat = True
    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_compat()

SMOLLM2 = Path.home() / ".cache" / "acttail" / "models" / "smollm2-135m"


def write_tiny_model(folder: Path, arch: str = "LlamaForCausalLM", layers: int = 2, hidden: int = 64,
                     heads: int = 4, kv_heads: int = 2, inter: int = 96, vocab: int = 128,
                     dtype=torch.float32, seed: int = 0, shards: int = 1) -> Path:
    """Write a random decoder in HF layout (config.json + safetensors, sharded if ``shards`` > 1)."""
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Phi3ForCausalLM": "phi3",
                  "MistralForCausalLM": "mistral", "GemmaForCausalLM": "gemma"}.get(arch, "llama")
    config = {"architectures": [arch], "model_type": model_type, "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": True,
              "hidden_act": "silu", "torch_dtype": str(dtype).split(".")[-1]}

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[f"{p}.self_attn.o_proj.weight"] = rnd(hidden, heads * hd)
        t[f"{p}.mlp.down_proj.weight"] = rnd(hidden, inter)
        if arch == "Phi3ForCausalLM":
            t[f"{p}.self_attn.qkv_proj.weight"] = rnd((heads + 2 * kv_heads) * hd, hidden)
            t[f"{p}.mlp.gate_up_proj.weight"] = rnd(2 * inter, hidden)
        else:
            t[f"{p}.self_attn.q_proj.weight"] = rnd(heads * hd, hidden)
            t[f"{p}.self_attn.k_proj.weight"] = rnd(kv_heads * hd, hidden)
            t[f"{p}.self_attn.v_proj.weight"] = rnd(kv_heads * hd, hidden)
            t[f"{p}.mlp.gate_proj.weight"] = rnd(inter, hidden)
            t[f"{p}.mlp.up_proj.weight"] = rnd(inter, hidden)
            if arch == "Qwen2ForCausalLM":
                for k, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                    t[f"{p}.self_attn.{k}_proj.bias"] = rnd(n * hd)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(t, str(folder / "model.safetensors"))
    else:
        names = sorted(t)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: t[n] for n in names[s::shards]}
            save_file(part, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return write_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def smollm2() -> Path:
    """The real SmolLM2-135M folder made by `acttail fetch smollm2`; tests needing it skip without it."""
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"real model not fetched: run `acttail fetch smollm2` (expects {SMOLLM2})")
    return SMOLLM2
