"""Tokenized text and perplexity over non-overlapping windows.

Perplexity at context ``ctx``: the first ``tokens`` tokens of the text are cut into windows of ``ctx``
tokens (no overlap, no BOS added); within each window every position predicts the next token, so a
window gives ctx - 1 predictions. With a plan, every position of every window is sparsified (the
prefill policy ``all``): that is what the accuracy study measures.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ActTailError
from ..text import read_text


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


def text_tokens(tokenizer, path: str | Path, n_tokens: int | None = None) -> torch.Tensor:
    """The first ``n_tokens`` token ids of a text (a file, or ``wiki`` / ``c4``), as a 1-D int64 tensor.

    Only a prefix of the text is encoded when that suffices (about 6 characters a token, doubled
    until enough tokens come out), so asking for 32k tokens of a large file stays quick.
    """
    if n_tokens is not None and n_tokens < 1:
        raise ActTailError(f"the number of tokens must be at least 1, got {n_tokens}")
    text = read_text(path)
    chars = len(text) if n_tokens is None else min(len(text), 6 * n_tokens + 1000)
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False).ids
        if n_tokens is None or len(ids) > n_tokens or chars >= len(text):
            break
        chars = min(len(text), 2 * chars)
    if n_tokens is not None:
        ids = ids[:n_tokens]
    return torch.tensor(ids, dtype=torch.int64)


def windows(tokens: torch.Tensor, ctx: int, max_ctx: int, path: str | Path = "text") -> torch.Tensor:
    """[n, ctx] non-overlapping windows of the token stream; the remainder is dropped."""
    if ctx < 2:
        raise ActTailError(f"context must be at least 2 tokens, got {ctx}")
    if ctx > max_ctx:
        raise ActTailError(f"context {ctx} exceeds the model's maximum of {max_ctx} tokens")
    if len(tokens) < ctx:
        raise ActTailError(f"the {len(tokens)} tokens taken from {path} are shorter than one context of {ctx}: "
                           "ask for more tokens, a shorter context, or give a longer text")
    n = len(tokens) // ctx
    return tokens[: n * ctx].view(n, ctx)


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, batch_size: int = 8, progress: bool = True) -> dict:
    """Mean next-token NLL and perplexity of ``model`` over windows [n, ctx]; NaN logits are an error."""
    nll, count = 0.0, 0
    bar = tqdm(total=len(wins) * wins.shape[1], unit="tok", desc="perplexity", disable=not progress)
    for i in range(0, len(wins), batch_size):
        batch = wins[i : i + batch_size].to(model.output.weight.device)
        h = model.norm(model.hidden(batch))[:, :-1].flatten(0, 1)
        targets = batch[:, 1:].flatten()
        for j in range(0, len(h), 1024):  # the LM head in slices: [1024, vocab] logits at a time
            logits = model.output(h[j : j + 1024]).float()
            if not torch.isfinite(logits).all():
                cause = "with the plan's sparsity" if model.sparsifier.active else "dense, without a plan"
                raise ActTailError(f"the model produced NaN or infinite logits (window {i}, {cause})")
            nll += float(F.cross_entropy(logits, targets[j : j + 1024], reduction="sum"))
        count += batch[:, 1:].numel()
        bar.update(batch.numel())
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    bar.close()
    return {"nll": nll / count, "perplexity": math.exp(nll / count), "predictions": count}


def evaluate(model_path, text, plan_path=None, ctx: int = 512, tokens: int = 32768, mode: str = "threshold",
             prefill: str = "all", batch_size: int = 8, progress: bool = True, device: str = "cpu") -> dict:
    """Perplexity of a dense or planned-sparse run on ``text``; the eval result (JSON-ready dict).

    ``prefill="half"`` keeps the first half of each window dense (TEAL's policy; see generate.py) and
    still scores every position; ``all`` sparsifies every position (the default, what the study uses).
    """
    from datetime import datetime, timezone

    from .. import __version__, plan as plan_io
    from . import achieved_report, open_model, plan_sparsifier
    from .generate import dense_prefix

    ckpt, model = open_model(model_path, device=device)
    plan = plan_io.load_plan(plan_path, expect_fingerprint=ckpt.fingerprint) if plan_path else None
    tok = load_tokenizer(ckpt.path if ckpt.path.is_dir() else ckpt.path.parent)
    wins = windows(text_tokens(tok, text, tokens), ctx, model.args.max_seq_len, text)
    if plan is not None:
        model.sparsifier = plan_sparsifier(plan, mode, f"plan {plan_path}", dense_prefix(ctx, prefill))
    result = perplexity(model, wins, batch_size, progress)
    out = {
        "format": "acttail-eval", "version": 1, "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": str(model_path), "fingerprint": ckpt.fingerprint, "architecture": ckpt.architecture},
        "settings": {"text": str(text), "ctx": ctx, "tokens": int(wins.numel()), "windows": len(wins),
                     "mode": mode if plan else "dense", "prefill": prefill if plan else None,
                     "dtype": "float32", "device": device, "batch_size": batch_size},
        "perplexity": result["perplexity"], "nll": result["nll"], "predictions": result["predictions"],
        "plan": None, "achieved": None,
    }
    if plan is not None:
        summary = plan_io.plan_summary(plan)
        out["plan"] = {"path": str(plan_path), "budget": plan["budget"], "method": plan["method"],
                       "weighted_sparsity": summary["weighted_sparsity"], "calibration": plan.get("calibration")}
        out["achieved"] = achieved_report(plan, model.sparsifier)
    return out
