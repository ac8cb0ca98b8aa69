"""Rotated activations (LaRoSa-style): a checkpoint whose residual stream runs in one PCA basis per layer, so the
inputs of q/k/v and gate/up are sparser at the same error.

    acttail rotate MODEL -o ROTATED          # then analyze / greedy / allocate / calibrate ROTATED as any model

For each layer l, R_l is the eigenvector basis (by decreasing variance) of the layer's normalised inputs
h / rms(h) at both its norms on the calibration text. The checkpoint keeps the model's function exactly (up to
float rounding): the norm weights g are folded into the projections that read them (W diag(g) R_l for q/k/v and
gate/up, whose norms become plain RMSNorm), o and down write into the layer's basis (R_l^T W), the embeddings
start in layer 0's (E R_0), the LM head reads the last layer's (W diag(g_final) R_{L-1}), and before each layer
l > 0 the stream changes basis, s <- s R_{l-1}^T R_l: a d x d matrix (``model.layers.l.basis.weight``) read per
layer and token. RMSNorm commutes with an orthogonal map, so nothing else changes.

Budgets count bytes: a plan for a rotated checkpoint pays each layer's basis change from that layer's
projections (``plan.rotation_overheads``), so it reads no more than a plan of the same budget on the original.

The checkpoint is an HF folder whose config.json says ``"model_type": "acttail_rotated"`` (the original in
``acttail_rotation``): transformers refuses to load it rather than silently dropping the basis changes; our
runtimes (reference, ``acttail.apply`` on our decoder, the CUDA-graph decoder) run it. Not for models whose norms
also follow attention and the MLP (Gemma 2/3: a norm weight after the residual branch does not commute with R).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from .config import CTX, Config
from .errors import ActTailError
from .layout import GROUPS, HF_FUSED_MODULES, HF_MODULES
from .runtime.model import NORMS

MODEL_TYPE = "acttail_rotated"  # config.json's model_type of a rotated checkpoint (transformers refuses it)
KIND = "layer"  # one basis per layer, shared by its attention and MLP inputs
READS = {NORMS["attention_norm"]: "qkv", NORMS["ffn_norm"]: "gate_up"}  # HF norm -> the group reading its output


@dataclass(frozen=True)
class RotationConfig(Config):
    """How the rotations are fitted (``acttail rotate``'s options): the covariance of each layer's normalised
    inputs on the first ``tokens`` tokens of the calibration text, in windows of ``ctx``, ``batch_size`` windows a
    forward pass."""

    tokens: int = 8192
    ctx: int = CTX
    batch_size: int = 8
    stage = "rotation"


def check_rotatable(model) -> None:
    """One clear error for a model the rotation cannot keep exact."""
    if model.args.sandwich_norm:
        raise ActTailError("rotation needs pre-norm blocks: this model also normalises what attention and the MLP "
                           "add to the residual stream (Gemma 2/3), which does not commute with a rotation")
    if getattr(model.args, "rotated", False):
        raise ActTailError("this checkpoint is already rotated (acttail rotate wrote it)")


def fit_rotations(model, wins: Tensor, batch_size: int = 8, progress: bool = True) -> list[Tensor]:
    """R_l [d, d] per layer (float32, orthogonal, on the CPU): eigenvectors by decreasing eigenvalue of the uncentred
    covariance of h / rms(h) at the layer's two norms, over every position of windows [n, ctx] run dense
    through ``model`` (our decoder)."""
    check_rotatable(model)
    d, n_layer = model.args.dim, model.args.n_layer
    cov = [torch.zeros(d, d, dtype=torch.float64) for _ in range(n_layer)]
    watch = _Watch(cov, model.ops)
    dev = model.output.weight.device
    model.ops, ops = watch, model.ops
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(wins), batch_size), desc="rotation", unit="batch", disable=not progress):
                model.hidden(wins[i: i + batch_size].to(dev))
    finally:
        model.ops = ops
    return [torch.linalg.eigh(c)[1].flip(1).float() for c in cov]


class _Watch:
    """Ops that add each norm input's normalised rows to its layer's covariance, then run ``base``."""

    def __init__(self, cov: list[Tensor], base):
        self.cov, self.base = cov, base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def norm_linear(self, layer, group, x, residual, norm, linear, sizes=None, act=None):
        s = (x if residual is None else x + residual).detach().double()
        s = s.reshape(-1, s.shape[-1])
        u = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + norm.eps)
        self.cov[layer] += (u.T @ u).cpu()
        return self.base.norm_linear(layer, group, x, residual, norm, linear, sizes, act)


def rotated_tensors(tensors: dict[str, Tensor], args, prefix: str, rotations: list[Tensor]) -> dict[str, Tensor]:
    """The checkpoint's tensors (HF names; ``prefix`` of its decoder layers, e.g. ``model.layers``) of the same
    function in the rotated bases: norms folded, projections rotated, a basis change before each layer > 0, an
    untied LM head. Each tensor keeps its dtype; the arithmetic is float32."""
    base = prefix[: -len("layers")]
    offset = args.norm_offset
    out = dict(tensors)

    dtype = tensors[f"{base}embed_tokens.weight"].dtype  # of the tensors the rotation adds

    def put(name: str, t: Tensor) -> None:
        out[name] = t.contiguous().to(tensors[name].dtype if name in tensors else dtype)

    def f32(name: str) -> Tensor:
        return tensors[name].float()

    def gain(name: str) -> Tensor:
        return f32(name) + offset

    def unit(name: str) -> None:  # a norm whose weight was folded: scale 1
        out[name] = torch.full_like(tensors[name], 1.0 - offset)

    embed, final = f32(f"{base}embed_tokens.weight"), f"{base}norm.weight"
    head = "lm_head.weight" if "lm_head.weight" in tensors and not args.tie_embeddings else f"{base}embed_tokens.weight"
    put("lm_head.weight", (f32(head) * gain(final)) @ rotations[-1])
    put(f"{base}embed_tokens.weight", embed @ rotations[0])
    unit(final)
    for i, r in enumerate(rotations):
        hf = f"{prefix}.{i}"
        fused = f"{hf}.{HF_FUSED_MODULES['qkv']}.weight" in tensors
        for norm, group in READS.items():
            g = gain(f"{hf}.{norm}.weight")
            modules = [HF_FUSED_MODULES[group]] if fused else [HF_MODULES[k] for k in GROUPS[group]]
            for m in modules:
                put(f"{hf}.{m}.weight", (f32(f"{hf}.{m}.weight") * g) @ r)
            unit(f"{hf}.{norm}.weight")
        for m in (HF_MODULES["o"], HF_MODULES["down"]):
            put(f"{hf}.{m}.weight", r.T @ f32(f"{hf}.{m}.weight"))
            if f"{hf}.{m}.bias" in tensors:
                put(f"{hf}.{m}.bias", f32(f"{hf}.{m}.bias") @ r)
        if i > 0:  # s R_{i-1} -> s R_i, as a linear's [out, in] weight
            put(f"{hf}.basis.weight", r.T @ rotations[i - 1])
    return out


def rotated_config(config: dict, source: dict) -> dict:
    """config.json of the rotated checkpoint: transformers cannot load it (its model_type), ours reads the
    original model type and what the rotation was fitted on from ``acttail_rotation``."""
    out = {**config, "model_type": MODEL_TYPE, "tie_word_embeddings": False}
    out["acttail_rotation"] = {"kind": KIND, "model_type": config.get("model_type"), **source}
    return out
