"""Tiny random HF models (written with transformers' own classes), a trained tiny tokenizer and text, for
runtime tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("the cat dog sat on a mat and ran far away from home while birds sang over green hills near "
         "old river town people walked slowly to market every day under bright warm sun").split()


def write_text(path: Path, n_words: int = 4000, seed: int = 0) -> Path:
    """Pseudo-English text of random words (deterministic)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(n_words // 12)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_tokenizer(folder: Path, vocab: int, bos: bool = False) -> None:
    """A byte-level BPE tokenizer.json trained on the tiny text, with at most ``vocab`` tokens. ``bos``: it
    also has <bos> (id 1), which it puts before every text, and says so in tokenizer_config.json (as Gemma's
    tokenizers do)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>", "<bos>"] if bos else ["<eos>"])
    text = write_text(folder / "train.txt", 3000, seed=1).read_text().splitlines()
    tok.train_from_iterator(text, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"add_bos_token": True, "bos_token": "<bos>", "eos_token": "<eos>",
             "tokenizer_class": "PreTrainedTokenizerFast"}))
    tok.save(str(folder / "tokenizer.json"))


# Tiny configs of the Gemma family and Phi-3 with every option of theirs switched on: attention scaled by a
# query_pre_attn_scalar other than head_dim, a sliding window shorter than the test windows, soft-capping
# (Gemma 2), a local rope base and linear scaling of the global layers (Gemma 3), LongRoPE (Phi-3).
SLIDING_WINDOW = 8
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def hf_config(arch: str, common: dict, tie: bool | None = None, rope_scaling: dict | None = None):
    """The transformers config of a tiny ``arch`` (llama, mistral, qwen2, gemma, gemma2, gemma3, phi3)."""
    import transformers

    if arch == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=bool(tie), sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=bool(tie), rope_theta=1e6)
    if arch == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16, hidden_act="gelu_pytorch_tanh",
                                        tie_word_embeddings=tie is not False)
    if arch == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24,
                                         sliding_window=SLIDING_WINDOW, attn_logit_softcapping=4.0,
                                         final_logit_softcapping=3.0, tie_word_embeddings=tie is not False)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": len(GEMMA3_LAYERS)}, head_dim=16,
                                             query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
                                             layer_types=GEMMA3_LAYERS, rope_parameters=GEMMA3_ROPE,
                                             tie_word_embeddings=tie is not False)
    if arch == "phi3":
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.25 * i for i in range(8)],
                "long_factor": [4.0] * 8, "factor": 4.0, "original_max_position_embeddings": 256}
        return transformers.Phi3Config(**{**common, "max_position_embeddings": 1024}, pad_token_id=0,
                                       sliding_window=SLIDING_WINDOW, original_max_position_embeddings=256,
                                       rope_parameters=rope, tie_word_embeddings=bool(tie))
    extra = {"rope_scaling": {**rope_scaling, "rope_theta": 10000.0}} if rope_scaling else {}
    return transformers.LlamaConfig(**common, tie_word_embeddings=True if tie is None else tie, **extra)


def write_hf_model(folder: Path, arch: str = "llama", seed: int = 0, rope_scaling: dict | None = None,
                   layers: int = 2, vocab: int = 320, tie: bool | None = None, scale: float | None = 0.15,
                   hidden: int = 64, inter: int = 96, heads: int = 4, kv_heads: int = 2, bos: bool = False):
    """Save a random tiny causal LM of ``arch`` (float32 safetensors, see ``hf_config``) and a tokenizer
    (one that asks for BOS with ``bos``); return the transformers model.

    Weights are N(0, scale), or N(0, 1/fan_in) for matrices when scale is None (for large shapes)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, common, tie, rope_scaling))
    randomize(model, scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, vocab, bos)
    return model.eval()


def randomize(model, scale: float | None = 0.15) -> None:
    """Random weights in place: norms U(0.5, 1.5), the rest N(0, scale) (scale None: N(0, 1/fan_in))."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif scale is None:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.02)
            else:
                p.normal_(0.0, scale)


def synthetic_analysis(folder: Path) -> dict:
    """An analysis document for a model folder with made-up alphas (2.0-4.0), for planning tests."""
    from acttail.checkpoint import Checkpoint

    ckpt = Checkpoint.open(folder)
    rows = [{"key": p.key, "layer": p.layer, "kind": p.kind, "in_features": p.in_features,
             "out_features": p.out_features, "params": p.params, "alpha": 2.0 + (i % 7) / 3}
            for i, p in enumerate(ckpt.projections())]
    return {"model": {"fingerprint": ckpt.fingerprint, "architecture": ckpt.architecture,
                      "model_type": ckpt.model_type, "num_layers": ckpt.num_layers, "path": str(folder)},
            "projections": rows}
