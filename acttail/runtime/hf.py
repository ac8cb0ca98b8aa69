"""Plans on stock transformers models: ``apply`` (sparsify their projections in place, removable) and
``from_transformers`` (our decoder built from their weights, for calibration).

``apply`` wraps the forward of every q/k/v/o/gate/up/down ``nn.Linear`` of each decoder layer (Phi-3's
fused ``qkv_proj`` / ``gate_up_proj`` too: each part gets its own sparsified copy of the input). On the CPU,
or for float32 weights, the input is zeroed as the plan says and the projection runs as before. On CUDA
with fp16/bf16 weights, a decode step (one new token per sequence, batch <= 8) runs through the Triton
sparse kernels (the weights are kept input-major for them, with the module's weight a transposed view of
that storage, so the dense prefill still reads the same bytes); longer inputs run dense.
"""

from __future__ import annotations

import types
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ActTailError
from ..weights import decoder_layers, projection_modules
from .sparsify import compensation_term, settings, sparse_linear, sparsify

class Applied:
    """A plan applied to a model's projections; ``remove()`` restores them, ``enabled`` switches it off
    for a while (e.g. for a dense reference run). ``achieved()`` is the measured sparsity per projection."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.enabled = True
        self.measure = True
        self.zeros: dict = defaultdict(int)
        self.total: dict = defaultdict(int)
        self._restore: list = []

    def achieved(self) -> dict:
        return {k: self.zeros[k] / self.total[k] for k in self.total if self.total[k]}

    def reset_counts(self) -> None:
        self.zeros.clear()
        self.total.clear()

    def remove(self) -> None:
        """Give every projection its own forward (and contiguous weights) back."""
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        if getattr(self.model, "_acttail_applied", None) is self:
            del self.model._acttail_applied

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply(model: nn.Module, plan, mode: str = "threshold") -> Applied:
    """Sparsify ``model``'s projections as ``plan`` says (threshold or topk mode); returns the handle."""
    if getattr(model, "_acttail_applied", None) is not None:
        raise ActTailError("a plan is already applied to this model: remove() it first")
    sets = settings(plan, mode)
    modules = projection_modules(model)
    _check_shapes(model, plan, modules)
    handle = Applied(model)
    kernels = _use_kernels(model)
    for linear, parts in modules.items():
        found = [(kind, rows, sets.get((layer, kind)), (layer, kind)) for kind, layer, rows in parts]
        if not any(s for _, _, s, _ in found):
            continue
        launch = _kernel_launch(linear, found) if kernels else None
        if launch is not None:
            _input_major(linear, handle)
        forward = _sparse_forward(handle, found, launch)
        linear.forward = types.MethodType(forward, linear)
        handle._restore.append(lambda m=linear: m.__dict__.pop("forward", None))
    model._acttail_applied = handle
    return handle


def _check_shapes(model, plan, modules) -> None:
    """The plan must describe this model: same layer count and the same shape for every projection."""
    layers = len(decoder_layers(model))
    if plan.model["num_layers"] != layers:
        raise ActTailError(f"the plan is for {plan.model['num_layers']} layers, the model has {layers}")
    shapes = {}
    for linear, parts in modules.items():
        for kind, layer, rows in parts:
            out = linear.out_features if rows == slice(None) else rows.stop - rows.start
            shapes[(layer, kind)] = (linear.in_features, out)
    for e in plan.projections:
        got = shapes.get((e.layer, e.kind))
        if got != (e.in_features, e.out_features):
            raise ActTailError(f"{e.key} is {got} (in, out) in the model but {(e.in_features, e.out_features)} "
                               "in the plan")


def _use_kernels(model) -> bool:
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _input_major(linear: nn.Linear, handle: Applied) -> None:
    """Store the weight input-major ([in, out] contiguous) for the kernels; the module keeps a [out, in] view."""
    wt = linear.weight.data.t().contiguous()
    linear.weight.data = wt.t()
    linear._acttail_wt = wt

    def undo(m=linear):
        m.weight.data = m.weight.data.contiguous()
        del m._acttail_wt

    handle._restore.append(undo)


def _kernel_launch(linear: nn.Linear, parts) -> dict | None:
    """What a decode step of this Linear passes the kernel, fixed once: the output widths, the thresholds on
    the device (threshold mode) or the keep counts (topk mode). None where the kernel cannot serve: per-channel
    score weights (the kernel ranks by |x|)."""
    from ..kernels import new_locks

    if any(s is not None and s.score is not None for _, _, s, _ in parts):
        return None
    splits = [rows.stop - rows.start if rows != slice(None) else linear.out_features for _, rows, _, _ in parts]
    bias = _epilogue_bias(linear, parts, splits)
    locks = new_locks(linear.weight.device, linear.out_features // 16 + 3)  # this Linear's own ticket counters
    keeps = [s.keep if s is not None else None for _, _, s, _ in parts]
    if any(k is not None for k in keeps):
        return {"splits": splits, "keeps": [k if k is not None else 1 << 30 for k in keeps], "t": None, "bias": bias,
                "locks": locks}
    ts = [s.threshold if s is not None and s.threshold is not None else -1.0 for _, _, s, _ in parts]
    return {"splits": splits, "keeps": None, "t": torch.tensor(ts, dtype=torch.float32, device=linear.weight.device),
            "bias": bias, "locks": locks}


def _epilogue_bias(linear: nn.Linear, parts, splits) -> torch.Tensor | None:
    """The Linear's own bias plus the learned biases as one fp32 vector the kernel adds in its epilogue;
    None when there is none, or when a low-rank term needs the separate compensation path."""
    if any(s is not None and s.lowrank is not None for _, _, s, _ in parts):
        return None
    if linear.bias is None and not any(s is not None and s.bias is not None for _, _, s, _ in parts):
        return None
    dev = linear.weight.device
    own = linear.bias.float() if linear.bias is not None else torch.zeros(sum(splits), device=dev)
    learned = torch.cat([s.bias.to(dev, torch.float32) if s is not None and s.bias is not None
                         else torch.zeros(w, device=dev) for (_, _, s, _), w in zip(parts, splits)])
    return (own + learned).contiguous()


def _sparse_forward(handle: Applied, parts, launch: dict | None):
    """The forward of one Linear computing ``parts`` [(kind, output rows, setting, key)]; one-token steps go
    to the kernel when ``launch`` is given."""

    def forward(self, x):
        if not handle.enabled:
            return F.linear(x, self.weight, self.bias)
        if launch is not None and _is_decode(x):
            return _kernel_linear(self, x, parts, launch)
        outs = []
        for kind, rows, s, key in parts:
            w = self.weight[rows]
            b = self.bias[rows] if self.bias is not None else None
            if s is None:
                outs.append(F.linear(x, w, b))
                continue
            xs = sparsify(x, s)
            if handle.measure:
                handle.zeros[key] += int((xs == 0).sum())
                handle.total[key] += xs.numel()
            outs.append(sparse_linear(x, xs, w, b, s))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    return forward


def _is_decode(x: torch.Tensor) -> bool:
    """One new token per sequence, at most MAX_BATCH sequences: the shape the kernels serve."""
    from ..kernels import MAX_BATCH

    tokens = x.shape[:-1]
    return x.dim() >= 2 and (x.dim() == 2 or tokens[-1] == 1) and int(torch.tensor(tokens).prod()) <= MAX_BATCH


def _kernel_linear(linear, x, parts, launch):
    from ..kernels import sparse_linear as kernel_linear, topk_thresholds

    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    t = launch["t"] if launch["keeps"] is None else topk_thresholds(x2, launch["keeps"])
    if launch.get("bias") is not None:  # biases in the kernel's epilogue
        y = kernel_linear(x2, linear._acttail_wt, t, splits=launch["splits"], bias=launch["bias"],
                          locks=launch["locks"])
        return y.reshape(*x.shape[:-1], y.shape[-1])
    y = kernel_linear(x2, linear._acttail_wt, t, splits=launch["splits"], locks=launch["locks"]).float()
    if linear.bias is not None:
        y = y + linear.bias.float()
    col = 0
    for (_, _, s, _), width, tp in zip(parts, launch["splits"], t):
        if s is not None:
            y[:, col:col + width] += compensation_term(x2, tp, s.bias, s.lowrank)
        col += width
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


# ---- our decoder from a transformers model -------------------------------------------------------------


class _StateDict:
    """A checkpoint-like view of a transformers model's weights (what ``load_model`` reads)."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.config = cfg.to_dict()
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.config.update(text.to_dict())
        self.architecture = (cfg.architectures or [type(model).__name__])[0]
        self.path = getattr(cfg, "_name_or_path", "") or type(model).__name__
        sd = model.state_dict()
        self._tensors = {n: t for n, t in sd.items()}
        self.tensor_names = list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise ActTailError(f"{self.path}: the model has no tensor {name!r}")
        return self._tensors[name]


def from_transformers(model: nn.Module, dtype: torch.dtype = torch.float32):
    """Our decoder (``runtime.model.Transformer``) with the weights of a stock transformers causal LM."""
    from .model import load_model

    dev = next(model.parameters()).device
    return load_model(_StateDict(model), dtype, str(dev))


def is_transformers_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings")


def hf_position_logits(model, batch: torch.Tensor, dense: bool) -> torch.Tensor:
    """Logits [B * (T - 1), vocab] of every predicting position of a transformers model, with the applied
    plan switched off when ``dense``."""
    handle = getattr(model, "_acttail_applied", None)
    kept = handle.enabled if handle is not None else None
    if handle is not None:
        handle.enabled = not dense
        handle.measure = not dense
    try:
        logits = model(input_ids=batch).logits
    finally:
        if handle is not None:
            handle.enabled = kept
            handle.measure = True
    return logits[:, :-1].flatten(0, 1)
