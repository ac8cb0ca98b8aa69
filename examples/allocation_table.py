"""Write the allocation report: sparsity per projection kind, uniform vs acttail, at a few budgets.

    acttail analyze ~/.cache/acttail/models/smollm2-135m -o /tmp/smol_analysis.json
    python examples/allocation_table.py /tmp/smol_analysis.json -o reports/smollm2-135m/allocation.md

Every number comes from ``acttail.allocate`` (the Python API) run on the given analysis; nothing is typed in.
"""

from __future__ import annotations

import argparse
import os
import statistics

import acttail
from acttail.outputs import write_text
from acttail.layout import KINDS

VARIANTS = [  # (label, allocate options)
    ("uniform", dict(method="uniform")),
    ("acttail global", dict(method="acttail", scope="global")),
    ("acttail per-kind", dict(method="acttail", scope="per-kind")),
    ("acttail layer", dict(method="acttail", scope="layer")),
]


def kind_table(analysis: acttail.Analysis, budget: float, metric: str) -> list[str]:
    """One markdown table: a row per kind, mean/min/max sparsity per variant."""
    plans = [(label, acttail.allocate(analysis, budget, metric=metric, **opts)) for label, opts in VARIANTS]
    summaries = [(label, p.summary()) for label, p in plans]
    rows = analysis.projections
    total = sum(r["params"] for r in rows)
    head = (f"| kind | params | {metric} median (min-max) | "
            + " | ".join(f"{label} mean (min-max)" for label, _ in summaries) + " |")
    lines = [head, "|" + "---|" * (3 + len(summaries))]
    for kind in [k for k in KINDS if any(r["kind"] == k for r in rows)]:
        vals = [r[metric] for r in rows if r["kind"] == kind and r.get(metric) is not None]
        share = sum(r["params"] for r in rows if r["kind"] == kind) / total
        cells = [f"{kind}", f"{share:.1%}", f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"]
        for _, s in summaries:
            k = s["per_kind"][kind]
            cells.append(f"{k['mean']:.3f} ({k['min']:.3f}-{k['max']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["all", "100%", ""]
    for (_, s), (_, p) in zip(summaries, plans):
        o = s["overall"]
        at_max = sum(e.sparsity >= p.method["max_sparsity"] for e in p.projections)
        cells.append(f"**{s['weighted_sparsity']:.6f}** ({o['min']:.3f}-{o['max']:.3f}), {at_max} at max")
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(analysis: acttail.Analysis, analysis_path: str, budgets: list[float], metric: str) -> str:
    m, st = analysis.model, analysis.settings
    nulls = sum(r.get(metric) is None for r in analysis.projections)
    meth = acttail.allocate(analysis, budgets[0], metric=metric, method="acttail").method  # its defaults, as recorded
    eps, lo, hi = meth["epsilon"], meth["min_sparsity"], meth["max_sparsity"]
    out = [
        f"# Allocation: {os.path.basename(m['path'].rstrip('/'))}",
        "",
        f"Model `{_home(m['path'])}` ({m['architecture']}, {m['num_layers']} layers, "
        f"fingerprint `{m['fingerprint']}`), "
        f"{len(analysis.projections)} projections, {nulls} with no {metric} value (failed fit). "
        f"Analysis: fit `{st.get('fit')}`, dtype `{st.get('dtype')}`, backend `{st.get('backend')}`.",
        "",
        "Sparsity of the inputs of each projection kind: parameter-weighted mean (min-max over the layers). "
        f"`acttail` maps lower {metric} to lower sparsity with epsilon {eps} (ratios in [{1 - eps:g}, {1 + eps:g}]); "
        f"`global` normalises {metric} over all projections, `per-kind` within each kind, `layer` uses one mean "
        f"per decoder layer. Bounds [{lo:g}, {hi:g}]. The last row is the measured weighted mean of the whole plan "
        f"and the number of projections clipped at {hi:g}.",
        "",
        "Regenerate:",
        "",
        "```",
        f"acttail analyze {_home(m['path'])} -o {analysis_path}",
        f"python examples/allocation_table.py {analysis_path} -o reports/smollm2-135m/allocation.md",
        "```",
    ]
    for budget in budgets:
        out += ["", f"## Budget {budget:.0%}", ""] + kind_table(analysis, budget, metric)
    return "\n".join(out) + "\n"


def _home(path: str) -> str:
    """``path`` with the home folder written as ~ (the command works for every user)."""
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path.startswith(home + "/") else path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("analysis", help="analysis.json from `acttail analyze`")
    p.add_argument("-o", "--output", required=True, help="markdown file to write")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument("--metric", default="alpha")
    args = p.parse_args(argv)
    write_text(args.output, report(acttail.Analysis.load(args.analysis), args.analysis, args.budgets, args.metric))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
