"""Tiny random HF models (written with transformers), a trained tiny tokenizer and text, for runtime tests."""

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


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer.json trained on the tiny text, with at most ``vocab`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    text = write_text(folder / "train.txt", 3000, seed=1).read_text().splitlines()
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))


def write_hf_model(folder: Path, arch: str = "llama", seed: int = 0, rope_scaling: dict | None = None,
                   layers: int = 2, vocab: int = 320, tie: bool | None = None, scale: float = 0.15):
    """Save a random Llama / Mistral / Qwen2 ForCausalLM (float32 safetensors) and a tokenizer; return it."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  eos_token_id=0, bos_token_id=0)
    if arch == "mistral":
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=bool(tie), sliding_window=None)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=bool(tie), rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        extra = {"rope_scaling": {**rope_scaling, "rope_theta": 10000.0}} if rope_scaling else {}
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True if tie is None else tie, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, vocab)
    return model.eval()
