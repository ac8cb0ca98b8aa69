"""What calibration adds to a plan beside thresholds: score weights that rank inputs, and compensation that
restores what the dropped inputs contributed.

Scores (``--score``): ``magnitude`` ranks inputs by |x| (TEAL); ``weight`` by |x_i| ||W[:, i]|| (WINA: an
input's reach is its column's norm); ``attribution`` by |x_i| E|dL/dx_i| (Song et al. 2024: what the loss
on calibration text says the input is worth).

Compensation (``--compensation``):
- ``learned``: one output bias per projection, trained end to end so the sparse model's next-token
  distribution matches the dense model's (KL(dense || sparse) on calibration text, Adam, the masks fixed by
  the thresholds), as SPON does (Xu et al. 2026). It costs one read of out_features values per token.
- ``lowrank``: W x ~ W x_kept + U_r (V_r^T x_dropped) with the top-r singular directions of W (R-Sparse):
  input-dependent, at r (in + out) values read per token.
Every added byte counts against the budget (``PlanEntry.overhead``).

Measured (reports/quality/): learned biases remove most of what sparsity costs on SmolLM2 at every budget;
low rank loses at equal bytes on these small matrices; neither score beats magnitude.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .errors import ActTailError
from .layout import GROUP_OF, GROUPS
from .runtime.sparsify import ProjectionSparsity, Sparsifier
from .weights import projection_weights

SCORES = ("magnitude", "weight", "attribution")
COMPENSATIONS = ("none", "learned", "lowrank")
BATCH = 8  # windows per step of SPON training (Adam with a cosine schedule; steps and lr: CalibrationConfig)


# ---- scores -----------------------------------------------------------------------------------------


def score_weights(model, score: str, wins: Tensor, batch_size: int = 4) -> dict[tuple[int, str], Tensor]:
    """Per-channel score weights s (ranking by |x_i| s_i) for every projection; {} for magnitude."""
    if score == "magnitude":
        return {}
    if score == "weight":
        return {key: w.float().norm(dim=0) for key, w in projection_weights(model).items()}
    return _attribution(model, wins, batch_size)


def _attribution(model, wins: Tensor, batch_size: int) -> dict[tuple[int, str], Tensor]:
    """E|dNLL/dx_i| at each group input of the dense model, normalised to mean 1 per projection."""
    sums, count = {}, 0

    def observe(layer, kinds, x):
        if x.requires_grad:
            group = GROUP_OF[kinds[0]]
            x.register_hook(lambda g, key=(layer, group): sums.__setitem__(
                key, sums.get(key, 0) + g.detach().abs().flatten(0, -2).sum(0)))

    dev = model.output.weight.device
    with model.sparsified(Sparsifier(observer=observe)):
        for i in range(0, len(wins), batch_size):
            batch = wins[i: i + batch_size].to(dev)
            with torch.enable_grad():
                h = model.embed(batch).detach().requires_grad_(True)
                logits = model.logits(model.norm(model.hidden(None, h=h)))
                F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()).backward()
            count += batch.numel()
    out = {}
    for (layer, group), total in sums.items():
        mean = total / count
        for kind in GROUPS[group]:
            out[layer, kind] = (mean / mean.mean().clamp_min(1e-30)).float()
    return out


# ---- low rank ---------------------------------------------------------------------------------------


def lowrank_factors(model, rank: int | dict) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
    """(U_r S_r [out, r], V_r^T [r, in]) of every projection: its best rank-r approximation. ``rank``: one
    for all, or {(layer, kind): r} (a projection with r = 0 or absent gets none)."""
    out = {}
    for key, w in projection_weights(model).items():
        r = min(rank if isinstance(rank, int) else rank.get(key, 0), *w.shape)
        if r <= 0:
            continue
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        out[key] = ((u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous())
    return out


# ---- learned biases (SPON) --------------------------------------------------------------------------


def learn_biases(model, settings: dict, wins: Tensor, steps: int, lr: float, batch: int = BATCH,
                 seed: int = 0, progress: bool = True) -> tuple[dict[tuple[int, str], Tensor], dict]:
    """Output biases for the sparsified projections, trained end to end: minimise KL(dense || sparse) of
    the next-token distributions on random batches of ``wins``, the model frozen and each projection's
    mask fixed by its setting (the gradient reaches the biases through the kept inputs). Returns the biases
    and a record of the run (steps, lr, KL at the start and the end)."""
    dev = model.output.weight.device
    params = {key: torch.zeros(model.args.out_features(key[1]), device=dev, requires_grad=True) for key in settings}
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    sp = Sparsifier({key: ProjectionSparsity(threshold=s.threshold, keep=s.keep, score=s.score, bias=params[key],
                                             lowrank=s.lowrank) for key, s in settings.items()}, measure=False)
    losses, t0 = [], time.time()
    bar = tqdm(range(steps), desc="learn biases", unit="step", disable=not progress)
    for _ in bar:
        b = wins[torch.randint(0, len(wins), (min(batch, len(wins)),), generator=g)].to(dev)
        with torch.no_grad(), model.sparsified(Sparsifier.dense()):
            ref = model(b).float().log_softmax(-1)
        with torch.enable_grad(), model.sparsified(sp):
            out = model(b).float().log_softmax(-1)
            loss = F.kl_div(out, ref, log_target=True, reduction="none").sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
    head, tail = losses[: max(1, steps // 10)], losses[-max(1, steps // 10):]
    record = {"steps": steps, "lr": lr, "batch": batch, "kl_first_steps": sum(head) / len(head),
              "kl_last_steps": sum(tail) / len(tail), "seconds": time.time() - t0}
    if not all(math.isfinite(x) for x in losses):
        raise ActTailError("learning the biases diverged (non-finite KL): try a smaller --lr")
    return {key: p.detach() for key, p in params.items()}, record

