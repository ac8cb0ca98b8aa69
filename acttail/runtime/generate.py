"""Generation with a static KV cache, after gpt-fast's generate.py: prefill, then one token at a time.

Prefill policy (what a plan does to the prompt), ``prefill=``:
- ``all``: every prompt position is sparsified, like every decoded token (what perplexity measures);
- ``half``: the first half of the prompt stays dense, the rest is sparsified (TEAL's choice: it
  sparsifies decode and half of prefill, since early tokens shape every later one);
- ``none``: the whole prompt is dense; only decoded tokens are sparsified.
Decoded tokens are always sparsified.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..errors import ActTailError
from .sparsify import Sparsifier, check_plan, dense_prefix, settings
from .tokens import check_ids, encode


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Greedy when temperature is 0, else a draw from softmax(logits / temperature); NaN or infinite
    logits are an error (an empty or arbitrary continuation would hide a broken model or plan)."""
    from ..errors import ActTailError

    if not torch.isfinite(logits).all():
        raise ActTailError("the model produced NaN or infinite logits while generating")
    if temperature < 0 or not math.isfinite(temperature):
        raise ActTailError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()  # shifted by the maximum first, so a tiny temperature cannot overflow
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
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
             eos_id: int | None = None) -> list[int]:
    """New token ids after ``prompt`` (1-D ids) from the model's current sparsifier (its ``dense_before``
    sets the prefill policy); stops at ``eos_id`` or after ``max_new_tokens``. Ids outside the vocabulary, or
    not integers, are refused (``tokens.check_ids``)."""
    prompt = check_ids(prompt, model.args.vocab_size, "the prompt's token ids").flatten()
    if len(prompt) < 1:
        raise ActTailError("the prompt is empty")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    T = len(prompt)
    model.setup_caches(1, T + max_new_tokens)
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
    return out


BACKENDS = ("reference", "kernels")


def generate_text(model, tokenizer, prompt: str, plan, max_new_tokens: int, temperature: float, seed: int | None,
                  mode: str, prefill_policy: str | None, *, backend: str, dtype: str, device: str,
                  eos_id: int | None = None, bos_id: int | None = None, weights: str | None = None) -> tuple[str, dict]:
    """The prompt's continuation as text, from the dense or planned-sparse ``model``, and what the run measured;
    the prompt starts with ``bos_id`` when given (``tokens.bos_id``: the model's tokenizer asks for it). The
    settings are ``acttail.generate``'s (``GenerateConfig`` holds their defaults and picks the backend).

    backend ``reference``: the float32 torch model where it lies; ``kernels``: the Triton decode path
    (``runtime.decoder.Decoder``: fp16/bf16 input-major weights, dense prefill, CUDA graph per decoded token,
    greedy) on ``device``, its decode steps over int8 / int4 / q4_1 copies of the projection weights with ``weights``.
    On the CPU the kernels run only under TRITON_INTERPRET=1 (slowly)."""
    if max_new_tokens < 1:
        raise ActTailError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if backend not in BACKENDS:
        raise ActTailError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    check_backend_run(backend, device, temperature, prefill_policy, weights)
    if plan is not None:
        check_plan(plan, model.args)
    ids = ([bos_id] if bos_id is not None else []) + encode(tokenizer, prompt)
    if not ids:
        raise ActTailError("the prompt is empty after tokenization")
    check_ids(ids, model.args.vocab_size, "the prompt's token ids", ": is the tokenizer this model's?")
    sets = settings(plan, mode) if plan is not None else {}
    if backend == "kernels":
        out, info = _generate_kernels(model, plan, mode, ids, max_new_tokens, device, dtype, weights)
        if eos_id is not None and eos_id in out:
            out = out[:out.index(eos_id) + 1]
    else:
        t0 = time.perf_counter()
        with model.sparsified(Sparsifier(sets, dense_before=dense_prefix(len(ids), prefill_policy or "half"))):
            out = generate(model, torch.tensor(ids), max_new_tokens, temperature, seed, eos_id)
        sec = time.perf_counter() - t0
        info = {"backend": "reference", "device": device, "new_tokens": len(out), "seconds": sec,
                "tokens_per_s": len(out) / sec}
    return tokenizer.decode(out), info


def check_backend_run(backend, device, temperature, prefill_policy, weights=None):
    """One clear error for what ``backend`` cannot do, before any model is loaded: the kernel backend's limits;
    quantized ``weights`` on the reference backend."""
    import os

    if backend != "kernels":
        if weights is not None:
            raise ActTailError(f"--weights {weights} runs on the kernel backend (--backend kernels)")
        return
    if temperature > 0:
        raise ActTailError("the kernel backend decodes greedily: use --temperature 0 (or --backend reference)")
    if prefill_policy not in (None, "none"):
        raise ActTailError(f"the kernel backend prefills the prompt densely: --prefill {prefill_policy} needs "
                           "--backend reference")
    if not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ActTailError("the kernel backend needs --device cuda (on the CPU it runs only under "
                           "TRITON_INTERPRET=1, for checking)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ActTailError("the kernel backend needs triton: pip install 'acttail[triton]'") from None


def _generate_kernels(model, plan, mode, ids, max_new_tokens, device, dtype, weights=None):
    """Greedy tokens from the Triton decode path, with the decode rate measured around the graph replays."""
    from .decoder import Decoder

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ActTailError(f"--dtype must be float16 or bfloat16, got {dtype!r}")
    n = len(ids) + max_new_tokens
    if n > model.args.max_seq_len:
        raise ActTailError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the model's "
                           f"{model.args.max_seq_len} positions")
    dec = Decoder.from_model(model, dtype=dtypes[dtype], device=device, plan=plan, mode=mode, max_seq=n, weights=weights)
    T = len(ids)
    out = dec.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)[0, T:].tolist()
    t = dec.timing
    info = {"backend": "kernels", "device": str(dec.device), "dtype": dtype, "weights": weights, "new_tokens": len(out),
            "prefill_s": t["prefill_s"], "capture_s": t["capture_s"], "decode_s": t["decode_s"],
            "decode_tokens_per_s": (len(out) - 1) / t["decode_s"] if len(out) > 1 else None,
            "sparse_groups": dec.ops.sparse_groups(1), "groups": 4 * dec.model.args.n_layer}
    return out, info
