"""Text to token windows: the model folder's tokenizer, encoding a prefix of a text, non-overlapping windows.

The runtime takes text as a string (or token ids) and never fetches anything: naming ``wiki`` or ``c4``
is resolved by the command line (``acttail.text``) before the runtime sees the text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ActTailError


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers`` tokenizer from the model folder's tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ActTailError(f"{model_dir} has no tokenizer.json (needed to tokenize text)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise ActTailError(f"cannot read {path}: {e}") from None


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, from a ``tokenizers`` or a transformers tokenizer."""
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "pad_token_id"):  # tokenizers.Tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def text_tokens(tokenizer, text: str, n_tokens: int | None = None) -> torch.Tensor:
    """The first ``n_tokens`` token ids of ``text`` as a 1-D int64 tensor.

    Only a prefix of the text is encoded when that suffices (about 6 characters a token, doubled
    until enough tokens come out), so asking for 32k tokens of a large text stays quick.
    """
    if n_tokens is not None and n_tokens < 1:
        raise ActTailError(f"the number of tokens must be at least 1, got {n_tokens}")
    chars = len(text) if n_tokens is None else min(len(text), 6 * n_tokens + 1000)
    while True:
        ids = encode(tokenizer, text[:chars])
        if n_tokens is None or len(ids) > n_tokens or chars >= len(text):
            break
        chars = min(len(text), 2 * chars)
    if n_tokens is not None:
        ids = ids[:n_tokens]
    return torch.tensor(ids, dtype=torch.int64)


def windows(tokens: torch.Tensor, ctx: int, max_ctx: int, name: str = "the text") -> torch.Tensor:
    """[n, ctx] non-overlapping windows of the token stream; the remainder is dropped."""
    if ctx < 2:
        raise ActTailError(f"context must be at least 2 tokens, got {ctx}")
    if ctx > max_ctx:
        raise ActTailError(f"context {ctx} exceeds the model's maximum of {max_ctx} tokens")
    if len(tokens) < ctx:
        raise ActTailError(f"the {len(tokens)} tokens taken from {name} are shorter than one context of {ctx}: "
                           "ask for more tokens, a shorter context, or give a longer text")
    n = len(tokens) // ctx
    return tokens[: n * ctx].view(n, ctx)
