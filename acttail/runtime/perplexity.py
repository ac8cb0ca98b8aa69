"""Perplexity over non-overlapping windows, and how far a sparse run strays from the dense one.

Within each window of ``ctx`` tokens every position predicts the next token, so a window gives ctx - 1
predictions. With ``compare=True`` each batch also runs dense, and the sparse run is scored against it
per predicted position: the KL divergence KL(dense || sparse) of the next-token distributions (nats,
mean over positions) and the top-1 agreement (how often both pick the same next token). Those see
what perplexity averages away: a plan that keeps perplexity but changes which token wins.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ActTailError
from .applied import applied
from .hf import hf_position_logits, is_transformers_model
from .sparsify import Sparsifier

SLICE = 1024  # positions whose [SLICE, vocab] logits are formed at a time


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, batch_size: int = 8, progress: bool = True, compare: bool = False) -> dict:
    """Mean next-token NLL and perplexity of ``model`` over windows [n, ctx]; NaN logits are an error.

    ``model`` is our decoder (its ``sparsifier`` applies) or a transformers causal LM (an applied plan,
    ``acttail.apply``, applies). With ``compare``, also ``kl`` (mean KL(dense || sparse) in nats) and
    ``top1_agreement`` against the same model run dense."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    hf = is_transformers_model(model)
    slices = _hf_slices if hf else _our_slices
    planned = applied(model) is not None if hf else bool(model.sparsifier.settings)
    device = next(model.parameters()).device
    if not hf and model.stream is not None:  # streamed: every window through one block at a time
        finals = _layer_major(model, wins, batch_size, device, compare, progress)
        slices = lambda model, batch, dense: _head_slices(model, finals[dense].pop(0))  # noqa: E731
    bar = tqdm(total=len(wins) * wins.shape[1], unit="tok", desc="perplexity", disable=not progress)
    for i in range(0, len(wins), batch_size):
        batch = wins[i: i + batch_size].to(device)
        targets = batch[:, 1:].flatten()
        refs = slices(model, batch, dense=True) if compare else None
        for j, logits in zip(range(0, len(targets), SLICE), slices(model, batch, dense=False)):
            _check_finite(logits, i, planned)
            nll += float(F.cross_entropy(logits, targets[j: j + SLICE], reduction="sum"))
            if compare:
                ref = next(refs)
                _check_finite(ref, i, False)
                kl += float(F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"))
                agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        count += batch[:, 1:].numel()
        bar.update(batch.numel())
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    bar.close()
    out = {"nll": nll / count, "perplexity": math.exp(nll / count), "predictions": count}
    if compare:
        out.update(kl=kl / count, top1_agreement=agree / count)
    return out


def _our_slices(model, batch: torch.Tensor, dense: bool):
    """Float32 logits of every predicting position, SLICE positions at a time (the LM head in slices)."""
    with model.sparsified(Sparsifier.dense()) if dense else nullcontext():
        h = model.norm(model.hidden(batch))[:, :-1].flatten(0, 1)
    yield from _head_slices(model, h)


def _layer_major(model, wins, batch_size, device, compare, progress) -> dict[bool, list[torch.Tensor]]:
    """Final-norm states of every predicting position, per batch, computed block by block over all windows
    (a streamed model reads each block once): {dense: [h per batch]} for the sparse run and, with compare,
    the dense one."""
    runs = {False: model.sparsifier, **({True: Sparsifier.dense()} if compare else {})}
    hs = {d: [model.embed(wins[i: i + batch_size].to(device)) for i in range(0, len(wins), batch_size)]
          for d in runs}
    for layer in tqdm(range(model.args.n_layer), desc="layers", unit="layer", disable=not progress):
        for dense, sp in runs.items():
            with model.sparsified(sp):
                hs[dense] = [model.hidden(None, layers=range(layer, layer + 1), h=h) for h in hs[dense]]
    return {d: [model.norm(h)[:, :-1].flatten(0, 1) for h in hl] for d, hl in hs.items()}


def _head_slices(model, h: torch.Tensor):
    for j in range(0, len(h), SLICE):
        yield model.logits(h[j: j + SLICE]).float()


def _hf_slices(model, batch: torch.Tensor, dense: bool):
    logits = hf_position_logits(model, batch, dense)
    for j in range(0, len(logits), SLICE):
        yield logits[j: j + SLICE].float()


def _check_finite(logits: torch.Tensor, window: int, planned: bool) -> None:
    if not torch.isfinite(logits).all():
        cause = "with the plan's sparsity" if planned else "dense, without a plan"
        raise ActTailError(f"the model produced NaN or infinite logits (window {window}, {cause})")
