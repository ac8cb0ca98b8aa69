"""Text to token windows: the model folder's tokenizer, encoding a prefix of a text, non-overlapping windows,
and the one rule for BOS (``bos_id``): each window starts with it when the model's tokenizer asks for it.

The runtime takes text as a string (or token ids) and never fetches anything: naming ``wiki`` or ``c4``
is resolved by the command line (``acttail.text``) before the runtime sees the text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ActTailError
from ..files import MAX_CONFIG, MAX_TOKENIZER, read_bytes, read_json


def load_tokenizer(model_dir: str | Path):
    """The ``tokenizers`` tokenizer from the model folder's tokenizer.json (a regular file of bounded size)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not os.path.lexists(path):
        raise ActTailError(f"{model_dir} has no tokenizer.json (needed to tokenize text)")
    data = read_bytes(path, "tokenizer", MAX_TOKENIZER)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise ActTailError(f"cannot read {path}: {str(e)[:200]}") from None


def encode(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of ``text`` from a ``tokenizers`` or a transformers tokenizer, without special tokens (or
    with those its post-processor adds, when ``special``)."""
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "pad_token_id"):  # tokenizers.Tokenizer
        return tokenizer.encode(text, add_special_tokens=special).ids
    return list(tokenizer.encode(text, add_special_tokens=special))


def tokenizer_bos(tokenizer) -> int | None:
    """The id a tokenizer object puts before a text when it encodes with special tokens, or None."""
    plain, full = encode(tokenizer, "a"), encode(tokenizer, "a", special=True)
    return full[0] if len(full) > len(plain) and full[1:len(plain) + 1] == plain else None


def bos_id(model_dir: str | Path) -> int | None:
    """The BOS id that every text (every window) of this model starts with, or None: the one rule for BOS.

    As transformers tokenizes: tokenizer_config.json's ``add_bos_token`` decides when it is there (the
    token named by its ``bos_token``, else config.json's ``bos_token_id``); without it (or null), the BOS
    that tokenizer.json's post-processor puts first, if any; Gemma models (config.json's architectures)
    always start with BOS. A converted GGUF carries its ``tokenizer.ggml.add_bos_token`` in
    tokenizer_config.json. An ``add_bos_token`` that is not true, false or null is refused (transformers
    would take any non-empty string, "no" too, as true)."""
    folder = Path(model_dir)
    tok_config, config = _json(folder / "tokenizer_config.json"), _json(folder / "config.json")
    tokenizer = load_tokenizer(folder)
    add = tok_config.get("add_bos_token")
    if add is not None and not isinstance(add, bool):
        raise ActTailError(f"{folder / 'tokenizer_config.json'}: add_bos_token must be true or false, got "
                           f"{_shown(add)}")
    if add is None:
        probed = tokenizer_bos(tokenizer)
        if probed is not None:
            return probed
        archs = config.get("architectures")
        add = isinstance(archs, list) and any(isinstance(a, str) and a.startswith("Gemma") for a in archs)
    if not add:
        return None
    return _bos_token_id(folder, tokenizer, tok_config, config)


def _bos_token_id(folder: Path, tokenizer, tok_config: dict, config: dict) -> int:
    """The BOS id: of the token tokenizer_config.json names, else config.json's (or its text_config's)."""
    name = tok_config.get("bos_token")
    name = name.get("content") if isinstance(name, dict) else name
    found = tokenizer.token_to_id(name) if isinstance(name, str) else None
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    found = found if found is not None else config.get("bos_token_id", text_config.get("bos_token_id"))
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise ActTailError(f"{folder}: the tokenizer asks for BOS but names no BOS token id (tokenizer_config.json "
                           "bos_token, config.json bos_token_id)")
    return found


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json(path: Path) -> dict:
    """A JSON object from a file of the model folder (bounded), or {} when it is absent or not an object."""
    if not os.path.lexists(path):
        return {}
    doc = read_json(path, path.name, MAX_CONFIG)
    return doc if isinstance(doc, dict) else {}


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


_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)


def check_ids(ids, vocab_size: int, what: str = "the token ids", hint: str = "") -> torch.Tensor:
    """``ids`` (a tensor or a list) as int64, or one clear error: a tensor that is not of integers (a float
    tensor would be truncated, a bool one read as ids 0 and 1), or an id outside the model's vocabulary
    [0, vocab_size) (the embedding would fail on it); ``hint`` ends the message. What is no tensor of ids
    (ragged lists, None, strings, integers past 64 bits, a meta tensor) is one clear error too."""
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ActTailError(f"{what} must be a tensor, or a list of equal-length lists, of integers below the "
                           f"model's vocabulary of {vocab_size}: cannot read the {type(ids).__name__} given") from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ActTailError(f"{what} must be integers, not {str(ids.dtype).removeprefix('torch.')}")
    if ids.is_meta:
        raise ActTailError(f"{what} are a meta tensor, which holds no values")
    if ids.numel():
        wide = ids.double() if ids.dtype in _UNSIGNED_WIDE else ids  # torch has no min/max of these
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi >= vocab_size:
            raise ActTailError(f"{what} include id {lo if lo < 0 else hi}, outside the model's vocabulary of "
                               f"{vocab_size} (ids 0..{vocab_size - 1}){hint}")
    return ids.long()


def windows(tokens: torch.Tensor, ctx: int, max_ctx: int, name: str = "the text",
            bos: int | None = None) -> torch.Tensor:
    """[n, ctx] non-overlapping windows of the token stream; the remainder is dropped. With a ``bos`` id
    (``bos_id``) each window is BOS and the next ctx - 1 tokens, as the tokenizer encodes each window's text
    on its own; without, the stream cut into ctx-token pieces."""
    if ctx < 2:
        raise ActTailError(f"context must be at least 2 tokens, got {ctx}")
    if ctx > max_ctx:
        raise ActTailError(f"context {ctx} exceeds the model's maximum of {max_ctx} tokens")
    step = ctx if bos is None else ctx - 1
    if len(tokens) < step:
        raise ActTailError(f"the {len(tokens)} tokens taken from {name} are shorter than one context of {ctx}: "
                           "ask for more tokens, a shorter context, or give a longer text")
    n = len(tokens) // step
    wins = tokens[: n * step].view(n, step)
    return wins if bos is None else torch.cat([torch.full((n, 1), bos, dtype=wins.dtype), wins], dim=1)
