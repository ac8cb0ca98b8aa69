"""The accuracy study: perplexity on wiki of dense, uniform and acttail plans, thresholds calibrated on c4.

For each run: allocate a plan from the model's analysis (fit ks/peak/median), calibrate its thresholds
on c4 (layer by layer, upstream sparsity on), evaluate perplexity on wiki at ctx 512 with every position
sparsified (threshold mode), and record the sparsity each projection achieved on wiki. Every run's result
is kept as JSON under reports/accuracy/<model>/runs/ and reused when present, so the command can be
stopped and restarted; the tables (reports/accuracy/<model>.md) are rebuilt from those files each time.

    python benchmarks/accuracy_study.py --model smollm2 --grid full
    python benchmarks/accuracy_study.py --model qwen2.5-coder-0.5b --grid small
    python benchmarks/accuracy_study.py --model smollm2 --tables-only
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from acttail import allocate, plan as plan_io
from acttail.analyze import run_analysis
from acttail.calibrate import calibrate_plan
from acttail.files import cache_dir, write_json, write_text
from acttail.runtime.perplexity import evaluate
from acttail.sensitivity import with_sensitivity  # also registers the acttail-sens and sensitivity methods

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT = dict(fit="ks", method="acttail", scope="global", epsilon=0.3, direction="increasing")


def variant(name: str, **kw) -> tuple[str, dict]:
    return name, {**DEFAULT, **kw}


def grid(kind: str) -> list[tuple[str, dict, float]]:
    """(name, allocation options, budget) in the order they run: the core comparison first."""
    core = [variant("uniform", method="uniform"), variant("acttail")]
    runs = [(n, o, 0.5) for n, o in core]
    runs += [(n, o, b) for b in BUDGETS for n, o in core if b != 0.5]
    if kind == "full":
        ablations = [variant("acttail fit=peak", fit="peak"), variant("acttail fit=median", fit="median"),
                     variant("acttail scope=per-kind", scope="per-kind"), variant("acttail scope=layer", scope="layer"),
                     variant("acttail eps=0.1", epsilon=0.1), variant("acttail eps=0.6", epsilon=0.6),
                     variant("acttail direction=decreasing", direction="decreasing")]
        runs += [(n, o, 0.5) for n, o in ablations]
        sens = [variant("acttail-sens", method="acttail-sens", scope="per-kind", gamma=0.5, max_sparsity=0.95),
                variant("sensitivity only (no alpha)", method="sensitivity", gamma=0.5, max_sparsity=0.95)]
        runs += [(n, o, b) for b in BUDGETS for n, o in sens]
        runs += [(n, o, 0.5) for n, o in [
            variant("acttail-sens eps=0 (kind levels only)", method="acttail-sens", scope="per-kind", epsilon=0.0,
                    gamma=0.5, max_sparsity=0.95),
            variant("acttail-sens direction=decreasing", method="acttail-sens", scope="per-kind", gamma=0.5,
                    direction="decreasing", max_sparsity=0.95)]]
    elif kind == "small":
        runs = [(n, o, b) for n, o, b in runs if b in (0.3, 0.5, 0.7)]
    return runs


def slug(name: str, budget: float) -> str:
    return name.replace(" ", "_").replace("=", "-") + f"_b{int(round(budget * 100))}"


def run_one(model_dir: Path, out: Path, name: str, opts: dict, budget: float, args) -> dict:
    """Plan, calibrated plan and eval JSON for one run (each reused when already on disk)."""
    result = out / "runs" / f"{slug(name, budget)}.json"
    if result.is_file():
        return json.loads(result.read_text())
    analysis, _ = run_analysis(model_dir, fit=opts["fit"], progress=False)
    if opts["method"] in ("acttail-sens", "sensitivity"):
        analysis = with_sensitivity(analysis, json.loads((out / "sensitivity.json").read_text()))
    options = {k: v for k, v in opts.items() if k != "fit"}
    plan = allocate.plan_from_analysis(analysis, budget, analysis_path=f"analyze --fit {opts['fit']}", **options)
    raw = out / "plans" / f"{slug(name, budget)}.json"
    plan_io.save_plan(plan, raw)
    t0 = time.time()
    calibrated, run = calibrate_plan(model_dir, raw, "c4", args.calib_tokens, args.ctx, progress=not args.quiet,
                                     device=args.device)
    plan_io.save_plan(calibrated, raw)
    t1 = time.time()
    r = evaluate(model_dir, "wiki", raw, args.ctx, args.eval_tokens, progress=not args.quiet, device=args.device)
    r["study"] = {"name": name, "options": opts, "budget": budget, "calibration": run,
                  "seconds": {"calibrate": t1 - t0, "eval": time.time() - t1}}
    write_json(result, r)
    return r


def dense(model_dir: Path, out: Path, args) -> dict:
    result = out / "runs" / "dense.json"
    if not result.is_file():
        t0 = time.time()
        r = evaluate(model_dir, "wiki", None, args.ctx, args.eval_tokens, progress=not args.quiet, device=args.device)
        r["study"] = {"name": "dense", "seconds": {"eval": time.time() - t0}}
        write_json(result, r)
    return json.loads(result.read_text())


def measure_sensitivity(model_dir: Path, path: Path, args) -> None:
    """Loss increase on c4 when one projection alone is sparsified (top-k at 50% and 80%)."""
    from acttail.runtime import open_model
    from acttail.runtime.perplexity import load_tokenizer, text_tokens, windows
    from acttail.sensitivity import sensitivity

    ckpt, model = open_model(model_dir, device=args.device)
    wins = windows(text_tokens(load_tokenizer(model_dir), "c4", args.sens_tokens), args.ctx, model.args.max_seq_len)
    keys = [(p.layer, p.kind) for p in ckpt.projections()]
    t0 = time.time()
    r = sensitivity(model, wins, keys, levels=(0.5, 0.8), progress=not args.quiet)
    write_json(path, {"model": {"fingerprint": ckpt.fingerprint}, "text": "c4", "tokens": int(wins.numel()),
                      "mode": "topk", "dense_nll": r["dense_nll"], "seconds": time.time() - t0,
                      "projections": [{"key": f"layers.{l}.{k}", "layer": l, "kind": k,
                                       "dnll_50": d[0.5], "dnll_80": d[0.8]} for (l, k), d in r["dnll"].items()]})


# ---- tables ----------------------------------------------------------------------------------------

def table(model: str, results: list[dict], dense_r: dict) -> str:
    """Markdown: one row per run, perplexity, change vs uniform at the same budget, achieved sparsity."""
    uniform = {r["study"]["budget"]: r["perplexity"] for r in results if r["study"]["name"] == "uniform"}
    lines = [f"## {model}", "",
             f"Dense perplexity: **{dense_r['perplexity']:.3f}** (wiki, {dense_r['settings']['tokens']} tokens, "
             f"ctx {dense_r['settings']['ctx']}).", "",
             "| method | budget | ppl | vs uniform | achieved on c4 (max dev) | achieved on wiki (max dev) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["study"]["name"] != "uniform", r["study"]["name"], r["study"]["budget"])):
        s, a = r["study"], r["achieved"]
        base = uniform.get(s["budget"])
        rel = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base and s["name"] != "uniform" else ""
        cal = s["calibration"]["max_abs_deviation"]
        lines.append(f"| {s['name']} | {s['budget']:.0%} | {r['perplexity']:.3f} | {rel} | "
                     f"{s['budget']:.4f} ({cal:.4f}) | {a['weighted_achieved']:.4f} ({a['max_abs_deviation']:.4f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or qwen2.5-coder-0.5b (a folder in the cache)")
    p.add_argument("--grid", choices=("full", "core", "small"), default="full")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--sens-tokens", type=int, default=16384)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("reports/accuracy"))
    p.add_argument("--tables-only", action="store_true", help="only rebuild the tables from saved runs")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu (the reference) or cuda (same float32 code, faster)")
    p.add_argument("--sensitivity", action="store_true", help="also measure per-projection sensitivity on c4")
    args = p.parse_args()
    name = {"smollm2": "smollm2-135m"}.get(args.model, args.model)
    model_dir = cache_dir() / "models" / name
    out = args.out / name
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    needs = args.sensitivity or any(o["method"] in ("acttail-sens", "sensitivity") for _, o, _ in grid(args.grid))
    if needs and not args.tables_only and not (out / "sensitivity.json").is_file():
        measure_sensitivity(model_dir, out / "sensitivity.json", args)
    if not args.tables_only:
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] dense", flush=True)
        dense(model_dir, out, args)
        for run_name, opts, budget in grid(args.grid):
            print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {run_name} @ {budget:.0%}", flush=True)
            r = run_one(model_dir, out, run_name, opts, budget, args)
            print(f"    ppl {r['perplexity']:.3f}  wiki sparsity {r['achieved']['weighted_achieved']:.4f}", flush=True)
    results = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]
    dense_r = next(r for r in results if r["study"]["name"] == "dense")
    runs = [r for r in results if r["study"]["name"] != "dense"]
    head = (f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
            f"({torch.get_num_threads()} threads), torch {torch.__version__}.\n\n")
    write_text(args.out / f"{name}.md", head + table(name, runs, dense_r))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
