"""Fuzz the config readers: bytes as a model folder's config.json (raw, or a seed config edited: Llama,
Qwen2, Mistral, Gemma 2, Gemma 3 and its multimodal text_config, Phi-3 with LongRoPE, Llama 3 rope scaling)
read by ``checkpoint.read_config``, by ``Checkpoint.open`` of the folder with fixed weights (the config
checked against them) and by ``ModelArgs.from_config`` (the runtime's reading); or as its
tokenizer_config.json, read by ``runtime.tokens.bos_id``.

    python fuzz/config_reader.py -runs=1000000 fuzz/corpus/config
"""

import json

import atheris

import common  # first: it sets the environment (a scratch cache, no progress bars) and imports no acttail

with atheris.instrument_imports(include=["acttail"]):
    from acttail.checkpoint import Checkpoint, read_config
    from acttail.errors import ActTailError
    from acttail.runtime.args import ModelArgs
    from acttail.runtime.tokens import bos_id



def _weights() -> bytes:
    """The tiny model's weights, and Phi-3's fused qkv_proj and gate_up_proj of them too (a Phi-3 config
    reads those, any other the separate ones)."""
    import torch
    from safetensors.torch import save

    t = common.tiny_tensors()
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    t[attn + "qkv_proj.weight"] = torch.cat([t[attn + f"{k}_proj.weight"] for k in "qkv"])
    t[mlp + "gate_up_proj.weight"] = torch.cat([t[mlp + "gate_proj.weight"], t[mlp + "up_proj.weight"]])
    return save(t)


SOURCE = common.tiny_model(common.SCRATCH / "source")
WEIGHTS, TOKENIZER = _weights(), (SOURCE / "tokenizer.json").read_bytes()
C = common.CONFIG
CONFIGS = [
    C,
    {**C, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 32, "use_sliding_window": False},
    {**C, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
    {**C, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    {**C, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 4, "query_pre_attn_scalar": 4,
     "sliding_window": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
     "hidden_activation": "gelu_pytorch_tanh"},
    {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
     "text_config": {**{k: v for k, v in C.items() if k != "architectures"}, "model_type": "gemma3_text",
                     "head_dim": 4, "sliding_window": 8, "layer_types": ["sliding_attention"],
                     "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}},
    {**C, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "sliding_window": 64,
     "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [2.0, 2.0]},
     "original_max_position_embeddings": 32},
]
TOKENIZER_CONFIGS = [{"add_bos_token": True, "bos_token": "<s>"}, {"add_bos_token": False},
                     {"bos_token": {"content": "<s>"}, "add_bos_token": True}, {}]
VALID = [b"\0\0" + json.dumps(c).encode() for c in CONFIGS] + [b"\1\0" + json.dumps(c).encode()
                                                               for c in TOKENIZER_CONFIGS]
SEEDS = VALID + [b"\0" + s for s in common.json_seeds(CONFIGS)] + [b"\1" + s for s in common.json_seeds(
    TOKENIZER_CONFIGS)]


def read(data: bytes) -> bool:
    """True when the input reads without error, False when it is refused with an ActTailError. A config is
    read as the runtime reads one: checked against the weights (``Checkpoint.open``, its projections), then
    ``ModelArgs.from_config``."""
    model = common.folder("model")
    (model / "model.safetensors").write_bytes(WEIGHTS)
    (model / "tokenizer.json").write_bytes(TOKENIZER)
    try:
        if not data or data[0] % 2 == 0:
            (model / "config.json").write_bytes(common.json_input(data[1:], CONFIGS))
            read_config(model / "config.json")
            ckpt = Checkpoint.open(model)
            ckpt.projections()
            ModelArgs.from_config(ckpt.config, ckpt.architecture)
        else:
            (model / "config.json").write_text(json.dumps(C))
            (model / "tokenizer_config.json").write_bytes(common.json_input(data[1:], TOKENIZER_CONFIGS))
            bos_id(model)
        return True
    except ActTailError:
        return False


if __name__ == "__main__":
    common.main(read, SEEDS, VALID)
