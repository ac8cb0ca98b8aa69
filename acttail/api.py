"""The Python API: one verb per stage, objects in and out (the command line adds only paths).

    import acttail
    analysis = acttail.analyze("path/to/model")             # Analysis: alpha etc. per projection
    plan = acttail.allocate(analysis, budget=0.5)            # Plan: one sparsity per projection
    plan = acttail.calibrate(model, plan, texts, tokenizer)  # thresholds fitted on text
    with acttail.apply(model, plan):                         # the model's projections sparsified
        result = acttail.evaluate(model, text, tokenizer)    # perplexity, KL, top-1 agreement

``model`` is a stock transformers causal LM (Llama, Mistral, Qwen2, ... as loaded by
``AutoModelForCausalLM``) or our decoder (``acttail.load``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .allocation import AllocationConfig, plan_from_analysis
from .analysis import Analysis, run_analysis
from .calibration import calibrate as calibrate_windows
from .compensation import DEFAULT_COMPENSATION, LR, STEPS
from .errors import ActTailError
from .evaluation import evaluate_windows
from .plan import Plan
from .runtime import open_model
from .runtime.applied import Applied, applied, apply_ours
from .runtime.hf import apply as apply_to_transformers, from_transformers, is_transformers_model
from .runtime.model import Transformer
from .runtime.tokens import bos_id, load_tokenizer, text_tokens, tokenizer_bos, windows


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """Our decoder for a model folder (config.json, safetensors, tokenizer.json), float32 on CPU by default;
    its tokenizer is ``model.tokenizer`` when the folder has one, and ``model.bos_id`` the BOS id each text
    starts with (None: none; ``tokens.bos_id``)."""
    ckpt, model = open_model(path, dtype, device)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    model.tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    model.bos_id = bos_id(folder) if model.tokenizer is not None else None
    model.fingerprint = ckpt.fingerprint
    return model


def analyze(model, fit: str = "ks", dtype: str = "float32", device: str = "cpu", backend: str = "acttail",
            force: bool = False, progress: bool = True) -> Analysis:
    """ESD metrics (alpha, xmin, KS distance, ...) of every projection of a checkpoint folder, a
    .safetensors file, or a model in memory (a transformers causal LM or ours). Results for files are cached
    per weights and settings."""
    if isinstance(model, torch.nn.Module):
        from .analysis import analyze_checkpoint, settings
        from .weights import ModuleWeights

        return Analysis.from_dict(analyze_checkpoint(ModuleWeights(model), settings(fit, dtype, device, backend),
                                                     progress))
    doc, _ = run_analysis(model, fit, dtype, device, backend, force, progress)
    return Analysis.from_dict(doc)


def allocate(analysis: Analysis, budget: float, config: AllocationConfig | None = None, **options) -> Plan:
    """A plan with one sparsity per projection whose weighted mean is ``budget``; ``options`` change fields
    of ``config`` (``AllocationConfig``: method, scope, epsilon, ...). The default method, greedy, needs the
    greedy paths of ``acttail greedy`` in the analysis; without them the allocation is uniform, with a warning."""
    cfg = (config or AllocationConfig()).updated(**{k: v for k, v in options.items() if k == "method"})
    method = _greedy_or_uniform(analysis, cfg.method, "allocating")
    options = {**options, "method": method} if method != cfg.method else options
    return plan_from_analysis(analysis, budget, config, **options)


def calibrate(model, plan: Plan, texts, tokenizer=None, tokens: int = 65536, ctx: int = 512,
              batch_size: int | None = None, progress: bool = True, score: str = "magnitude",
              compensation: str = DEFAULT_COMPENSATION, rank: int = 32, steps: int = STEPS, lr: float = LR) -> Plan:
    """The plan with each projection's threshold fitted so its sparsity holds in the sparse run on ``texts``
    (a string, a list of strings, or token ids), with the score weights and compensation of
    ``acttail.compensation`` (by default output biases learned end to end). Calibrate on other text than
    you evaluate on."""
    ours = _ours(model)
    wins = _windows(ours, texts, tokenizer, tokens, ctx)
    return calibrate_windows(ours, plan, wins, batch_size, progress, score=score, compensation=compensation,
                             rank=rank, steps=steps, lr=lr)


def tune(model, analysis: Analysis, texts, tokenizer=None, within: float = 0.05, tokens: int = 65536,
         held_tokens: int = 16384, ctx: int = 512, config: AllocationConfig | None = None, progress: bool = True,
         **calibrate_options) -> Plan:
    """The calibrated plan at the largest budget whose perplexity on held-out text stays within ``within``
    (0.05: +5%) of dense, by bisection (``acttail.tuning``): the first ``tokens`` of ``texts`` calibrate every
    probe, the next ``held_tokens`` judge it. ``calibrate_options`` as for ``calibrate`` (compensation, ...)."""
    from .tuning import tune as tune_windows

    cfg = config or AllocationConfig()
    cfg = cfg.updated(method=_greedy_or_uniform(analysis, cfg.method, "probing"))
    doc = analysis.to_dict() if hasattr(analysis, "to_dict") else analysis
    ours = _ours(model)
    wins = _windows(ours, texts, tokenizer, tokens + held_tokens, ctx)
    n_cal = max(1, tokens // ctx)
    if len(wins) <= n_cal:
        raise ActTailError(f"the text gives {len(wins)} windows of {ctx}: not enough for {tokens} calibration "
                           f"and {held_tokens} held-out tokens")
    return tune_windows(ours, doc, wins[:n_cal], wins[n_cal:], within, cfg, progress=progress, **calibrate_options)


def apply(model, plan: Plan, mode: str = "threshold", backend: str | None = None) -> Applied:
    """Sparsify ``model`` in place as ``plan`` says; returns a handle whose ``remove()`` (or the end of a
    ``with`` block) restores it. Inputs are zeroed as the plan says (every position of a longer input); on a
    transformers model with fp16/bf16 weights on CUDA (``backend="kernels"``, the default there) decode steps
    (one new token per sequence, batch <= 8) run through the Triton kernels."""
    if isinstance(model, Transformer):
        if applied(model) is not None:
            raise ActTailError("a plan is already applied to this model: remove() it first")
        return apply_ours(model, plan, mode)
    if not is_transformers_model(model):
        raise ActTailError(f"acttail.apply takes a transformers causal LM or an acttail model, not {type(model).__name__}")
    return apply_to_transformers(model, plan, mode, backend)


def decoder(model, plan: Plan | None = None, mode: str = "threshold", batch: int = 1, max_seq: int | None = None,
            dtype: torch.dtype = torch.float16, device: str = "cuda"):
    """The fast path: a ``Decoder`` (runtime/decoder.py) that runs ``plan``'s decode steps (None: dense)
    through the Triton kernels, one CUDA-graph replay per token; ``.generate(input_ids, max_new_tokens=...,
    do_sample=..., temperature=..., top_k=..., top_p=..., eos_token_id=..., streamer=...)`` as in
    transformers. From a transformers model with fp16/bf16 weights on the GPU it shares that model's weight
    storage; from ours (``acttail.load``) it copies the weights to ``dtype`` on ``device``. ``max_seq``: the
    KV cache's positions (default: the model's, at most 4096; ``generate`` grows it when asked for more)."""
    from .runtime.decoder import Decoder

    if isinstance(model, Transformer):
        seq = max_seq or min(model.args.max_seq_len, 4096)
        return Decoder.from_model(model, dtype=dtype, device=device, plan=plan, mode=mode, batch=batch, max_seq=seq)
    if not is_transformers_model(model):
        raise ActTailError(f"acttail.decoder takes a transformers causal LM or an acttail model, not {type(model).__name__}")
    return Decoder.from_transformers(model, plan=plan, mode=mode, batch=batch, max_seq=max_seq)


def evaluate(model, text, tokenizer=None, plan: Plan | None = None, tokens: int = 32768, ctx: int = 512,
             mode: str = "threshold", prefill: str = "all", batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``text`` (string or token ids) in windows of ``ctx``; with a plan (given
    here, or already applied) also the KL divergence to the dense model, the top-1 agreement with it and the
    achieved sparsity. Returns a dict of metrics."""
    wins = _windows(model, text, tokenizer, tokens, ctx)
    if isinstance(model, Transformer):
        return evaluate_windows(model, wins, plan, mode, prefill, batch_size, progress)
    from .runtime.perplexity import perplexity

    if prefill != "all":
        raise ActTailError("on a transformers model every position is sparsified (prefill='all')")
    handle = apply(model, plan, mode) if plan is not None else applied(model)
    try:
        if handle is not None:
            handle.reset_counts()
        out = perplexity(model, wins, batch_size, progress, compare=handle is not None)
        if handle is not None:
            out["achieved"] = handle.achieved()
    finally:
        if plan is not None:
            handle.remove()
    return out


# ---- helpers ----------------------------------------------------------------------------------------


def _greedy_or_uniform(analysis, method: str, doing: str) -> str:
    """The method to use: greedy needs the greedy paths of ``acttail greedy`` in the analysis; without them,
    uniform with a warning."""
    doc = analysis.to_dict() if hasattr(analysis, "to_dict") else analysis
    if method == "greedy" and not doc.get("greedy"):
        import warnings

        warnings.warn(f"the analysis has no greedy paths (acttail greedy measures them): {doing} uniformly")
        return "uniform"
    return method


def _ours(model) -> Transformer:
    if isinstance(model, Transformer):
        return model
    if is_transformers_model(model):
        return from_transformers(model)
    raise ActTailError(f"expected a transformers causal LM or an acttail model, not {type(model).__name__}")


def _windows(model, texts, tokenizer, tokens: int, ctx: int) -> torch.Tensor:
    """[n, ctx] token windows from a string, strings or token ids (taken as they are). Text windows start
    with BOS when the tokenizer asks for it: ``model.bos_id`` for the tokenizer ``acttail.load`` gave the
    model, else whether ``tokenizer`` puts one first."""
    bos = None
    if torch.is_tensor(texts):
        ids = texts.flatten()[:tokens].long()
    else:
        if tokenizer is None:
            tokenizer, bos = getattr(model, "tokenizer", None), getattr(model, "bos_id", None)
        else:
            bos = tokenizer_bos(tokenizer)
        if tokenizer is None:
            raise ActTailError("text needs a tokenizer: pass tokenizer=... (or token ids)")
        text = texts if isinstance(texts, str) else "\n\n".join(texts)
        ids = text_tokens(tokenizer, text, tokens)
    max_ctx = model.args.max_seq_len if isinstance(model, Transformer) else \
        getattr(model.config, "max_position_embeddings", ctx)
    return windows(ids, ctx, max_ctx, bos=bos)
