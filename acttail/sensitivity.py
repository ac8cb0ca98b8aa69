"""Per-projection sensitivity: how much the loss on calibration text rises when one projection alone is
sparsified (top-k at a given level, every other projection dense).

This is what decides whether a projection can take more sparsity than the budget; the study compares it
with alpha to see whether (and in which direction) the alpha map points the right way. Measured on the
calibration text (c4), never on the evaluation text.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .runtime.perplexity import perplexity
from .runtime.sparsify import Sparsifier


@torch.no_grad()
def sensitivity(model, wins: torch.Tensor, keys: list[tuple[int, str]], levels=(0.5, 0.8), batch_size: int = 8,
                progress: bool = True) -> dict:
    """{"dense_nll": nll, "dnll": {(layer, kind): {level: nll(sparse p) - dense_nll}}} on windows ``wins``."""
    model.sparsifier = Sparsifier.dense()
    base = perplexity(model, wins, batch_size, progress=False)["nll"]
    out = {}
    bar = tqdm(total=len(keys) * len(levels), desc="sensitivity", disable=not progress)
    for key in keys:
        out[key] = {}
        for level in levels:
            model.sparsifier = Sparsifier("topk", sparsities={key: level}, measure=False)
            out[key][level] = perplexity(model, wins, batch_size, progress=False)["nll"] - base
            bar.update()
    bar.close()
    model.sparsifier = Sparsifier.dense()
    return {"dense_nll": base, "dnll": out}
