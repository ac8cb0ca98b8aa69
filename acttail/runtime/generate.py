"""Generation with a static KV cache, after gpt-fast's generate.py: prefill, then one token at a time.

Prefill policy (what a plan does to the prompt), ``prefill=``:
- ``all``: every prompt position is sparsified, like every decoded token (what perplexity measures);
- ``half``: the first half of the prompt stays dense, the rest is sparsified (TEAL's choice: it
  sparsifies decode and half of prefill, since early tokens shape every later one);
- ``none``: the whole prompt is dense; only decoded tokens are sparsified.
Decoded tokens are always sparsified.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREFILL = ("all", "half", "none")


def dense_prefix(prompt_len: int, prefill: str) -> int:
    """How many leading positions stay dense under a prefill policy."""
    if prefill not in PREFILL:
        raise ValueError(f"unknown prefill policy {prefill!r}")
    return {"all": 0, "half": prompt_len // 2, "none": prompt_len}[prefill]


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Greedy when temperature is 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, prompt: Tensor, temperature: float, generator) -> Tensor:
    """Run the prompt [1, T] through the model, filling the caches; return the first new token [1]."""
    logits = model(prompt, torch.arange(prompt.shape[1], device=prompt.device))
    return sample(logits[:, -1], temperature, generator)


def decode_one_token(model, token: Tensor, pos: int, temperature: float, generator) -> Tensor:
    logits = model(token.view(1, 1), torch.tensor([pos], device=token.device))
    return sample(logits[:, -1], temperature, generator)


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
             prefill_policy: str = "half", eos_id: int | None = None) -> list[int]:
    """New token ids after ``prompt`` (1-D ids); stops at ``eos_id`` or after ``max_new_tokens``."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    T = len(prompt)
    model.setup_caches(1, T + max_new_tokens)
    model.sparsifier.dense_before = dense_prefix(T, prefill_policy)
    try:
        token = prefill(model, prompt.view(1, -1).to(model.output.weight.device), temperature, generator)
        out = [int(token)]
        for pos in range(T, T + max_new_tokens - 1):
            if eos_id is not None and out[-1] == eos_id:
                break
            token = decode_one_token(model, token, pos, temperature, generator)
            out.append(int(token))
    finally:
        model.clear_caches()
        model.sparsifier.dense_before = 0
    return out


def generate_text(model_path, prompt: str, plan_path=None, max_new_tokens: int = 64, temperature: float = 0.0,
                  seed: int | None = None, mode: str = "threshold", prefill_policy: str = "half") -> str:
    """The prompt's continuation as text, from the dense or planned-sparse model."""
    from .. import plan as plan_io
    from ..errors import ActTailError
    from . import open_model, plan_sparsifier
    from .perplexity import load_tokenizer

    if max_new_tokens < 1:
        raise ActTailError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    ckpt, model = open_model(model_path)
    tok = load_tokenizer(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent)
    if plan_path:
        plan = plan_io.load_plan(plan_path, expect_fingerprint=ckpt.fingerprint)
        model.sparsifier = plan_sparsifier(plan, mode, f"plan {plan_path}")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ActTailError("the prompt is empty after tokenization")
    eos = ckpt.config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    out = generate(model, torch.tensor(ids), max_new_tokens, temperature, seed, prefill_policy, eos)
    return tok.decode(out)
