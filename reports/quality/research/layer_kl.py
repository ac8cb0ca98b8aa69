"""Probe (second session, CPU): TEAL's greedy inside each block, with the budget moved between blocks by
measured KL instead of every block at the same effective sparsity.

Each block's greedy path gives its output error err_l(e) at every effective sparsity e. The error is not
comparable across blocks (the residual stream grows with depth; the last blocks matter more), so each block's
errors are put in KL units: c_l = KL(dense || only block l sparse at its path step nearest 50%) / err_l(that
step), on 8 c4 windows. The plan then takes, per block, the step minimising c_l err_l(e) - lambda e, lambda
bisected so the mean effective sparsity meets the budget, then the usual solver scales to it exactly. The rest
is the study's protocol (thresholds on 64k c4 tokens, layer by layer; wiki 32k, every position sparsified).

    python reports/quality/research/layer_kl.py --model ~/.cache/acttail/models/smollm2-135m \
        --greedy reports/quality/smollm2-135m/greedy.json --budgets 0.4 0.5 --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from acttail.allocation import fit_budget, plan_from_analysis
from acttail.analysis import run_analysis
from acttail.calibration import calibrate, fit_thresholds
from acttail.evaluation import evaluate_windows
from acttail.layout import KINDS
from acttail.runtime import open_model
from acttail.runtime.sparsify import ProjectionSparsity, Sparsifier
from benchmarks.quality_study import windows_of


@torch.no_grad()
def block_kl(model, wins, paths, ref_logp, at=0.5) -> list[float]:
    """KL(dense || only block l sparse at its path step nearest ``at``), per block."""
    out = []
    for layer, path in enumerate(paths):
        step = min(path, key=lambda s: abs(s["effective"] - at))
        targets = {(layer, k): s for k, s in step["sparsity"].items() if s > 0}
        found = fit_thresholds(model, wins, targets, progress=False)
        model.sparsifier = Sparsifier({k: ProjectionSparsity(threshold=r["threshold"]) for k, r in found.items()},
                                      measure=False)
        logp = model(wins).float().log_softmax(-1)
        model.sparsifier = Sparsifier.dense()
        out.append(float(F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1).mean()))
        print(f"block {layer}: KL {out[-1]:.5f} at e={step['effective']:.3f} err {step['error']:.4f}", flush=True)
    return out


def allocate(paths, scale, budget) -> list[dict]:
    """Per block the step minimising scale_l err - lambda e (dense allowed), mean effective = budget."""
    def choose(lam):
        picks = []
        for path, c in zip(paths, scale):
            costs = [0.0] + [c * s["error"] - lam * s["effective"] for s in path]
            i = int(np.argmin(costs))
            picks.append(None if i == 0 else path[i - 1])
        return picks

    def mean_e(picks):
        return float(np.mean([0.0 if p is None else p["effective"] for p in picks]))

    lo, hi = 0.0, 1e6
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_e(choose(mid)) < budget else (lo, mid)
    return choose(hi)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--greedy", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, model = open_model(args.model)
    cal = windows_of(args.model, model, "c4", 65536, 512)
    wiki = windows_of(args.model, model, "wiki", 32768, 512)
    probe = cal[:8]
    greedy = json.loads(Path(args.greedy).read_text())
    paths = greedy["layers"]
    t0 = time.time()
    with torch.no_grad():
        ref = model(probe).float().log_softmax(-1)
    kl = block_kl(model, probe, paths, ref)
    scale = [k / min(path, key=lambda s: abs(s["effective"] - 0.5))["error"] for k, path in zip(kl, paths)]
    print(f"block KL measured in {time.time() - t0:.0f} s", flush=True)
    doc, _ = run_analysis(args.model, device="cpu", progress=False)
    for budget in args.budgets:
        picks = allocate(paths, scale, budget)
        plan = plan_from_analysis(doc, budget, method="uniform")
        raw = np.array([0.0 if picks[e.layer] is None else picks[e.layer]["sparsity"][e.kind] for e in plan.projections])
        params = np.array([e.in_features * e.out_features for e in plan.projections], dtype=float)
        for e, s in zip(plan.projections, fit_budget(raw + 1e-9, params, budget)):
            e.sparsity = float(s)
        t1 = time.time()
        plan = calibrate(model, plan, cal, progress=False, text="c4", compensation="none")
        m = evaluate_windows(model, wiki, plan, progress=False)
        row = {"row": "greedy inside blocks, KL between blocks", "budget": budget, "block_kl": kl,
               "block_effective": [0.0 if p is None else p["effective"] for p in picks],
               "wiki": {k: m[k] for k in ("perplexity", "kl", "top1_agreement")}, "seconds": time.time() - t1,
               "device": "CPU, torch " + torch.__version__}
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{budget:.0%}: wiki ppl {m['perplexity']:.3f} KL {m['kl']:.4f} top1 {m['top1_agreement']:.4f} "
              f"blocks {np.round(row['block_effective'], 2).tolist()}", flush=True)


if __name__ == "__main__":
    main()
