"""Alpha in the ActTail paper's own setting (issue 20): top-k mode (each token keeps its largest |x| entries
per projection, no thresholds, no calibration), no compensation, high budgets, the alpha map in both
directions against uniform and TEAL's greedy allocation, at equal bytes. CPU, the reference runtime.

    python benchmarks/topk_alpha_study.py MODEL ANALYSIS --out OUT [--budgets 0.5 0.7 0.8] [--tokens 16384]

MODEL: a model folder; ANALYSIS: its analysis with TEAL's greedy paths (``acttail greedy``; e.g. `make demo`'s
out/smollm2-135m/analysis-greedy.json). Evaluated on the first ``--tokens`` wiki tokens (ctx 512, every
position sparsified); KL and top-1 against the dense model. Writes OUT/topk-alpha.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import acttail

ROWS = {  # label -> allocation options
    "uniform (TEAL's recipe in top-k mode)": dict(method="uniform"),
    "alpha map, increasing (the paper's direction: higher alpha, more sparsity)": dict(method="alpha-map",
                                                                                          direction="increasing"),
    "alpha map, decreasing (higher alpha, less sparsity)": dict(method="alpha-map", direction="decreasing"),
    "TEAL's greedy allocation": dict(method="greedy"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("analysis")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    wiki = Path.home() / ".cache/acttail/text/wiki.txt"
    model = acttail.load(args.model)
    t0 = time.time()
    dense = acttail.evaluate(model, wiki, tokens=args.tokens, progress=False)["perplexity"]
    rows = []
    for budget in args.budgets:
        for label, options in ROWS.items():
            plan = acttail.allocate(args.analysis, budget, **options)
            r = acttail.evaluate(model, wiki, plan=plan, mode="topk", tokens=args.tokens, progress=False)
            rows.append(dict(budget=budget, row=label, perplexity=r["perplexity"], kl=r["kl"],
                             top1=r["top1_agreement"], achieved=r["achieved"]["weighted_achieved"]))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=f"cpu, {torch.get_num_threads()} threads",
                command="python " + " ".join(sys.argv), seconds=round(time.time() - t0), dense_perplexity=dense)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "topk-alpha.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Top-k mode, no compensation: alpha map against uniform and the greedy ({meta['date']}, "
             f"{meta['device']}, {meta['seconds']} s)", "", f"`{meta['command']}`", "",
             f"wiki, {args.tokens} tokens, ctx 512; dense perplexity {dense:.2f}. Cells: perplexity (KL to dense, "
             "top-1 agreement).", "",
             "| allocation | " + " | ".join(f"{b:.0%}" for b in args.budgets) + " |",
             "|---|" + "---|" * len(args.budgets)]
    for label in ROWS:
        cells = [next(r for r in rows if r["row"] == label and r["budget"] == b) for b in args.budgets]
        lines.append(f"| {label} | " + " | ".join(f"{c['perplexity']:.2f} ({c['kl']:.2f}, {c['top1']:.2f})"
                                                   for c in cells) + " |")
    (out / "topk-alpha.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
