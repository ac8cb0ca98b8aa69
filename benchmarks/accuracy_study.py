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
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from acttail.allocation import plan_from_analysis
from acttail.analysis import run_analysis
from acttail.calibration import calibrate
from acttail.evaluation import evaluate_windows, result as eval_result
from acttail.files import cache_dir
from acttail.outputs import write_json, write_text
from acttail.plan import Plan
from acttail.runtime import open_model
from acttail.runtime.tokens import load_tokenizer, text_tokens, windows
from acttail.sensitivity import with_sensitivity
from acttail.text import read_text

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT = dict(fit="ks", method="alpha-map", scope="global", epsilon=0.3, direction="increasing")


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
        sens = [variant("acttail-sens", method="acttail-sens"),
                variant("sensitivity only (no alpha)", method="sensitivity", gamma=0.5, max_sparsity=0.95)]
        runs += [(n, o, b) for b in BUDGETS for n, o in sens]
        for scope in ("global", "layer", "per-kind"):
            for eps in (0.15, 0.3, 0.5):
                name = f"acttail direction=decreasing scope={scope} eps={eps}"
                if (scope, eps) == ("global", 0.3):
                    name = "acttail direction=decreasing"
                runs += [(name, {**DEFAULT, "direction": "decreasing", "scope": scope, "epsilon": eps}, b)
                         for b in BUDGETS]
        runs += [(f"acttail direction=decreasing fit={fit}", {**DEFAULT, "direction": "decreasing", "fit": fit}, 0.5)
                 for fit in ("peak", "median")]
    elif kind == "small":  # the larger model: the core, the measured-direction methods, a few ablations
        more = [variant("acttail-sens", method="acttail-sens"),
                variant("acttail direction=decreasing", direction="decreasing")]
        runs += [(n, o, b) for b in BUDGETS for n, o in more]
        runs += [(n, o, 0.5) for n, o in [
            variant("acttail scope=layer", scope="layer"), variant("acttail scope=per-kind", scope="per-kind"),
            variant("acttail eps=0.1", epsilon=0.1),
            variant("acttail direction=decreasing scope=layer eps=0.3", direction="decreasing", scope="layer"),
            variant("acttail direction=decreasing scope=per-kind eps=0.3", direction="decreasing", scope="per-kind")]]
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
    plan = plan_from_analysis(analysis, budget, analysis_path=f"analyze --fit {opts['fit']}", **options)
    raw = out / "plans" / f"{slug(name, budget)}.json"
    plan.save(raw)
    same = identical_run(out, plan)
    if same is not None:  # calibration and evaluation are deterministic in the sparsities: reuse
        r = {**same, "study": {**same["study"], "name": name, "options": opts, "reused_from": same["study"]["name"]}}
        write_json(result, r)
        return r
    t0 = time.time()
    ckpt, model = open_model(model_dir, device=args.device)
    calibrated = calibrate(model, plan, token_windows(model_dir, model, "c4", args.calib_tokens, args.ctx),
                           progress=not args.quiet, text="c4", compensation="none")  # thresholds only
    calibrated.save(raw)
    run = dict(calibrated.calibration, weighted_achieved=calibrated_mean(calibrated))
    t1 = time.time()
    r = run_eval(ckpt, model, model_dir, calibrated, raw, args)
    r["study"] = {"name": name, "options": opts, "budget": budget, "calibration": run,
                  "seconds": {"calibrate": t1 - t0, "eval": time.time() - t1}}
    write_json(result, r)
    return r


def token_windows(model_dir: Path, model, text: str, tokens: int, ctx: int):
    return windows(text_tokens(load_tokenizer(model_dir), read_text(text), tokens), ctx, model.args.max_seq_len)


def run_eval(ckpt, model, model_dir: Path, plan, plan_path, args) -> dict:
    """``acttail eval`` of a plan (or dense) on wiki, as a result document."""
    wins = token_windows(model_dir, model, "wiki", args.eval_tokens, args.ctx)
    metrics = evaluate_windows(model, wins, plan, progress=not args.quiet)
    settings = {"text": "wiki", "ctx": args.ctx, "tokens": int(wins.numel()), "windows": len(wins),
                "mode": "threshold" if plan else "dense", "prefill": "all" if plan else None, "dtype": "float32",
                "device": args.device, "batch_size": 8}
    ref = {"path": str(model_dir), "fingerprint": ckpt.fingerprint, "architecture": ckpt.architecture}
    return eval_result(ref, settings, metrics, plan, plan_path)


def calibrated_mean(plan: Plan) -> float:
    """Parameter-weighted sparsity achieved on the calibration text (from the calibrated plan)."""
    es = plan.projections
    return sum(e.calibration["achieved_sparsity"] * e.params for e in es) / sum(e.params for e in es)


def identical_run(out: Path, plan: Plan) -> dict | None:
    """A finished run whose plan had exactly these sparsities (e.g. a method that fell back to uniform)."""
    want = [e.sparsity for e in plan.projections]
    for f in sorted((out / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("achieved") and r["study"].get("budget") == plan.budget and "reused_from" not in r["study"]:
            if [p["target"] for p in r["achieved"]["projections"]] == want:
                return r
    return None


def dense(model_dir: Path, out: Path, args) -> dict:
    result = out / "runs" / "dense.json"
    if not result.is_file():
        t0 = time.time()
        ckpt, model = open_model(model_dir, device=args.device)
        r = run_eval(ckpt, model, model_dir, None, None, args)
        r["study"] = {"name": "dense", "seconds": {"eval": time.time() - t0}}
        write_json(result, r)
    return json.loads(result.read_text())


def measure_sensitivity(model_dir: Path, path: Path, args) -> None:
    """Loss increase on c4 when one projection alone is sparsified (top-k at 50% and 80%)."""
    from acttail.sensitivity import measure

    ckpt, model = open_model(model_dir, device=args.device)
    wins = token_windows(model_dir, model, "c4", args.sens_tokens, args.ctx)
    write_json(path, measure(model, wins, ckpt.fingerprint, "c4", (0.5, 0.8), not args.quiet))


# ---- tables ----------------------------------------------------------------------------------------

def table(model: str, results: list[dict], dense_r: dict) -> str:
    """Markdown: perplexity per method and budget with the change vs uniform; then sparsity drift."""
    by = {}
    for r in results:
        by.setdefault(r["study"]["name"], {})[r["study"]["budget"]] = r
    uniform = {b: r["perplexity"] for b, r in by.get("uniform", {}).items()}
    names = sorted(by, key=lambda n: (n != "uniform", n != "acttail", n != "acttail-sens", n))
    budgets = sorted({b for rs in by.values() for b in rs})
    st = dense_r["settings"]
    lines = [f"## {model}", "",
             f"Dense perplexity **{dense_r['perplexity']:.3f}** on {st['tokens']} tokens of wiki at ctx {st['ctx']} "
             f"({st['windows']} windows, every position sparsified in the plan runs; device {st['device']}).",
             "Each cell: perplexity (change vs uniform at the same budget).", "",
             "| method | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for n in names:
        cells = []
        for b in budgets:
            r = by[n].get(b)
            if r is None:
                cells.append("")
                continue
            rel = "" if n == "uniform" or b not in uniform else f" ({100 * (r['perplexity'] / uniform[b] - 1):+.1f}%)"
            same = " =" if r["study"].get("reused_from") else ""
            cells.append(f"{r['perplexity']:.2f}{rel}{same}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "`=`: the plan's sparsities are identical to another run's (the method fell back to that "
              "allocation), so its measured result is shown.", "",
              "Sparsity achieved (parameter-weighted mean; in brackets the largest |achieved - target| of any "
              "projection) on the c4 calibration text and on the wiki evaluation text:", "",
              "| method | budget | c4 (calibration) | wiki (held out) |", "|---|---:|---:|---:|"]
    for n in names:
        for b in budgets:
            r = by[n].get(b)
            if r is None or r["study"].get("reused_from"):
                continue
            a, cal = r["achieved"], r["study"]["calibration"]
            lines.append(f"| {n} | {b:.0%} | {cal['weighted_achieved']:.4f} ({cal['max_abs_deviation']:.4f}) | "
                         f"{a['weighted_achieved']:.4f} ({a['max_abs_deviation']:.4f}) |")
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
    devices = sorted({r["settings"]["device"] for r in results})
    head = (f"Tables rebuilt {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {len(results)} saved runs "
            f"(measured with device {', '.join(devices)}; float32, TF32 off). Regenerate: see README.md.\n\n")
    write_text(args.out / f"{name}.md", head + table(name, runs, dense_r))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
