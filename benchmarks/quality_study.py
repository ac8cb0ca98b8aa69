"""The quality study (issue 10): how much sparsity each score x compensation x allocation keeps at equal bytes.

For one model: the ESD analysis and TEAL's greedy paths, then for every row and budget a plan allocated,
calibrated on c4 (64k tokens, windows of 512) and evaluated on wiki (32k tokens, every position sparsified;
perplexity, KL to dense, top-1 agreement), on wiki with the first half of each window dense, in top-k mode,
and on technical text (neither calibrated nor tuned on). The budget is the fraction of projection bytes not
read, net of what compensation adds, measured on wiki. One JSON line per run in OUT/results.jsonl
(resumable: finished runs are skipped); `--tables` writes the markdown tables from those lines.

    python benchmarks/quality_study.py --model DIR --name smollm2-135m --out OUT --device cuda
    python benchmarks/quality_study.py --model ROTATED --name smollm2-135m-rotated ...  # `acttail rotate`'s folder
    python benchmarks/quality_study.py --tables reports/quality        # tables from reports/quality/*/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
# name -> (allocation options, score, compensation, budgets, extra evaluations)
ROWS = {
    "TEAL (uniform, magnitude, none)": (dict(method="uniform"), "magnitude", "none", BUDGETS, True),
    "greedy": (dict(method="greedy"), "magnitude", "none", BUDGETS, True),
    "uniform + learned": (dict(method="uniform"), "magnitude", "learned", (0.5,), False),
    "greedy + learned (default)": (dict(method="greedy"), "magnitude", "learned", BUDGETS, True),
    "alpha-map increasing + learned": (dict(method="alpha-map", direction="increasing"), "magnitude", "learned",
                                       (0.5,), False),
    "alpha-map decreasing + learned": (dict(method="alpha-map", direction="decreasing"), "magnitude", "learned",
                                       (0.5,), False),
    "greedy + lowrank r16": (dict(method="greedy"), "magnitude", "lowrank", (0.5,), False),
    "greedy + weight score + learned": (dict(method="greedy"), "weight", "learned", (0.5,), False),
    "greedy + alpha split r<=32 (lowrank)": (dict(method="greedy", rank_split=32), "magnitude", "lowrank", (0.3, 0.5),
                                             False),
}


def windows_of(model_dir, model, text: str, tokens: int, ctx: int = 512, skip: int = 0):
    from acttail.runtime.tokens import bos_id, load_tokenizer, text_tokens, windows
    from acttail.text import read_text

    ids = text_tokens(load_tokenizer(model_dir), read_text(text), tokens + skip)[skip:]
    return windows(ids, ctx, model.args.max_seq_len, text, bos_id(model_dir))


def run(args) -> None:
    from acttail.allocation import plan_from_analysis
    from acttail.analysis import run_analysis
    from acttail.calibration import calibrate
    from acttail.evaluation import evaluate_windows
    from acttail.outputs import write_json
    from acttail.greedy import measure
    from acttail.runtime import open_model

    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["row"], r["budget"]) for r in _lines(results)}
    ckpt, model = open_model(args.model, device=args.device)
    cal = windows_of(args.model, model, "c4", args.calib_tokens, args.ctx)
    texts = {"wiki": windows_of(args.model, model, "wiki", args.eval_tokens, args.ctx),
             "technical": windows_of(args.model, model, "technical", args.other_tokens, args.ctx)}
    if not (out / "dense.json").is_file():
        write_json(out / "dense.json", {t: evaluate_windows(model, w, progress=False) for t, w in texts.items()})
    doc, _ = run_analysis(args.model, device="cpu", progress=False)  # the ESD does not depend on the device
    greedy_rows = any(ROWS[r][0].get("method") == "greedy" for r in args.rows)
    if greedy_rows and not (out / "greedy.json").is_file():
        t0 = time.time()
        g = measure(model, cal[: args.greedy_tokens // cal.shape[1]], ckpt.fingerprint, "c4",
                    base_step=args.greedy_step, progress=False)
        write_json(out / "greedy.json", g)
        print(f"greedy paths in {time.time() - t0:.0f} s", flush=True)
    if greedy_rows:
        doc["greedy"] = json.loads((out / "greedy.json").read_text())
    for name, (opts, score, comp, budgets, extra) in ROWS.items():
        for b in args.budgets or budgets:
            if (name, b) in done or name not in args.rows or (comp == "learned" and b not in args.learned_budgets):
                continue
            if time.time() - t_start > args.deadline:
                print("deadline reached; rerun to continue", flush=True)
                return
            t0 = time.time()
            plan = plan_from_analysis(doc, b, **opts)
            plan = calibrate(model, plan, cal, progress=False, text="c4", score=score, compensation=comp,
                             rank=16, steps=args.steps, lr=args.lr)
            t1 = time.time()
            row = {"row": name, "budget": b, "score": score, "compensation": comp, "allocation": opts,
                   "calibration": plan.calibration, "seconds": {"calibrate": t1 - t0}}
            row["wiki"] = _metrics(model, texts["wiki"], plan)
            if extra and not args.wiki_only:
                row["wiki_half_dense"] = _metrics(model, texts["wiki"], plan, prefill="half")
                row["wiki_topk"] = _metrics(model, texts["wiki"], plan, mode="topk")
                row["technical"] = _metrics(model, texts["technical"], plan)
            row["seconds"]["eval"] = time.time() - t1
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            w = row["wiki"]
            print(f"{name:<34} {b:.0%}: wiki ppl {w['perplexity']:8.3f} KL {w['kl']:.4f} top1 "
                  f"{w['top1_agreement']:.4f} saving {w['saving']:.4f} ({t1 - t0:.0f}+{time.time() - t1:.0f} s)",
                  flush=True)


def _metrics(model, wins, plan, mode="threshold", prefill="all") -> dict:
    """Eval metrics plus the measured saving: achieved sparsity minus what compensation adds, byte-weighted."""
    from acttail.evaluation import evaluate_windows

    m = evaluate_windows(model, wins, plan, mode, prefill, progress=False)
    entries = {e.key: e for e in plan.projections}
    rows = m.pop("achieved")["projections"]
    total = sum(e.params for e in entries.values())
    m["saving"] = sum((r["achieved"] - entries[r["key"]].overhead) * entries[r["key"]].params for r in rows) / total
    return m


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


# ---- tables -------------------------------------------------------------------------------------------


def budget_within(points: list[tuple[float, float]], dense: float, slack: float) -> float | None:
    """Largest saving whose perplexity stays within (1 + slack) x dense, by log-linear interpolation between
    measured points (saving, ppl); None when even the lowest budget is over."""
    pts = sorted(points)
    limit = math.log(dense * (1 + slack))
    best = None
    for (s0, p0), (s1, p1) in zip(pts, pts[1:]):
        if math.log(p0) <= limit:
            best = s0
            if math.log(p1) > limit:
                return s0 + (s1 - s0) * (limit - math.log(p0)) / (math.log(p1) - math.log(p0))
            best = s1
    if pts and math.log(pts[-1][1]) <= limit:
        best = pts[-1][0]
    return best


def speedup_at(saving: float | None, e2e: list[tuple[float, float]]) -> float | None:
    """Decode speed-up of the 7B-shape GPU benchmark at this saving (linear between measured sparsities)."""
    if saving is None or not e2e:
        return None
    pts = sorted(e2e)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= saving <= s1:
            return v0 + (v1 - v0) * (saving - s0) / (s1 - s0)
    return None


def tables(root: Path) -> None:
    e2e_path = root / "e2e.json"  # benchmarks.gpu_e2e's output: uniform sparsity with use_sparse dispatch
    e2e = [(0.0, 1.0)] + [(r["target_mean_sparsity"], r["speedup"]) for r in json.loads(e2e_path.read_text())["rows"]
                          if r["model"].startswith("Llama-2-7B") and r["variant"].endswith("use_sparse dispatch")
                          and r.get("step", "current") == "current"] if e2e_path.is_file() else []
    for folder in sorted(p for p in root.iterdir() if (p / "results.jsonl").is_file()):
        dense = json.loads((folder / "dense.json").read_text())
        rows = _lines(folder / "results.jsonl")
        lines = [f"# {folder.name}: quality at equal bytes", "",
                 f"Dense: wiki {dense['wiki']['perplexity']:.3f}, technical {dense['technical']['perplexity']:.3f}. "
                 "Budget = measured fraction of projection bytes not read on wiki, net of compensation bytes. "
                 "Each cell: perplexity (change vs dense) / KL to dense / top-1 agreement.", ""]
        names = list(dict.fromkeys(r["row"] for r in rows))
        lines += ["| row | " + " | ".join(f"{b:.0%}" for b in BUDGETS) + " | +5% of dense at | +10% at | decode "
                  "speed-up there (7B shape) |", "|---" * (len(BUDGETS) + 4) + "|"]
        for name in names:
            by_b = {r["budget"]: r for r in rows if r["row"] == name}
            cells = []
            for b in BUDGETS:
                w = by_b.get(b, {}).get("wiki")
                cells.append("" if w is None else f"{w['perplexity']:.2f} ({w['perplexity'] / dense['wiki']['perplexity'] - 1:+.0%})"
                             f" / {w['kl']:.3f} / {w['top1_agreement']:.3f} @{w['saving']:.3f}")
            pts = [(r["wiki"]["saving"], r["wiki"]["perplexity"]) for r in by_b.values()]
            five, ten = (budget_within(pts, dense["wiki"]["perplexity"], s) for s in (0.05, 0.10))
            sp = speedup_at(five, e2e)
            tail = (f" | {_pct(five)} | {_pct(ten)} | " + ("" if sp is None else f"{sp:.2f}x")) if len(pts) > 1 \
                else " | (one budget) | | "
            lines.append(f"| {name} | " + " | ".join(cells) + tail + " |")
        for key, label in (("wiki_half_dense", "wiki, first half of each window dense (decode after a dense prefill)"),
                           ("wiki_topk", "wiki, top-k mode"), ("technical", "technical (neither calibrated nor tuned on)")):
            base = dense["technical"]["perplexity"] if key == "technical" else dense["wiki"]["perplexity"]
            lines += ["", f"## {label}", "", "| row | " + " | ".join(f"{b:.0%}" for b in BUDGETS) + " |",
                      "|---" * (len(BUDGETS) + 1) + "|"]
            for name in names:
                by_b = {r["budget"]: r for r in rows if r["row"] == name and key in r}
                if by_b:
                    lines.append(f"| {name} | " + " | ".join(
                        f"{by_b[b][key]['perplexity']:.2f} ({by_b[b][key]['perplexity'] / base - 1:+.0%}) "
                        f"@{by_b[b][key]['saving']:.3f}" if b in by_b
                        else "" for b in BUDGETS) + " |")
        (folder.parent / f"{folder.name}.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {folder.parent / (folder.name + '.md')}")


def _pct(x) -> str:
    return "below the lowest" if x is None else f"{x:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--name")
    ap.add_argument("--out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200, help="training steps of learned biases")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of learned compensation")
    ap.add_argument("--greedy-step", type=float, default=0.025, help="base step of TEAL's greedy paths")
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--other-tokens", type=int, default=16384)
    ap.add_argument("--greedy-tokens", type=int, default=8192)
    ap.add_argument("--learned-budgets", type=float, nargs="+", default=list(BUDGETS),
                    help="budgets at which rows with learned compensation run (each trains biases)")
    ap.add_argument("--budgets", type=float, nargs="+", help="run these budgets instead of each row's own")
    ap.add_argument("--wiki-only", action="store_true", help="evaluate on wiki alone (no half-dense, top-k, technical)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; stop starting new runs after this")
    ap.add_argument("--tables", help="write the markdown tables of this folder's runs instead")
    args = ap.parse_args()
    if args.tables:
        tables(Path(args.tables))
    else:
        run(args)


if __name__ == "__main__":
    main()
