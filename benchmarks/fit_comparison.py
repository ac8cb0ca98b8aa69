"""Compare the three power-law fits on one model: how many alphas fall above 8 and below 2, per kind means.

    python benchmarks/fit_comparison.py ~/.cache/acttail/models/smollm2-135m -o reports/smollm2-135m/fits.md

WeightWatcher's plain KS fit can put xmin among the few largest eigenvalues ("fingers"), giving alphas of
10-30 from tails of 9-30 eigenvalues; the allocation should choose a fit on this evidence.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np

from acttail.analysis import run_analysis
from acttail.layout import KINDS
from acttail.outputs import write_text


def table(model: str) -> str:
    docs = {fit: run_analysis(model, fit=fit, progress=False)[0] for fit in ("ks", "peak", "median")}
    name = Path(model).name
    lines = [f"# Power-law fits on {name}", "",
             f"Generated {date.today()} by `python benchmarks/fit_comparison.py "
             f"{str(model).replace(str(Path.home()), '~')} -o <this file>`.", "",
             "| fit | alpha > 8 | alpha < 2 | median alpha | median n_tail | median KS distance | "
             + " | ".join(f"mean alpha {k}" for k in KINDS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(KINDS)]
    for fit, doc in docs.items():
        rows = [r for r in doc["projections"] if r["alpha"] is not None]
        a = np.array([r["alpha"] for r in rows])
        per_kind = [np.mean([r["alpha"] for r in rows if r["kind"] == k]) for k in KINDS]
        lines.append(f"| {fit} | {int((a > 8).sum())} | {int((a < 2).sum())} | {np.median(a):.2f} | "
                     f"{np.median([r['n_tail'] for r in rows]):.0f} | "
                     f"{np.median([r['ks_distance'] for r in rows]):.3f} | "
                     + " | ".join(f"{m:.2f}" for m in per_kind) + " |")
    n = len(docs["ks"]["projections"])
    lines += ["", f"{n} projections. `ks`: xmin over all eigenvalues by minimum KS distance (WeightWatcher's "
              "default); `peak`: xmin within +-5% of the log-histogram peak (AlphaPruning's alpha_peak); "
              "`median`: xmin = median eigenvalue."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    text = table(args.model)
    print(text)
    if args.output:
        write_text(args.output, text)


if __name__ == "__main__":
    main()
