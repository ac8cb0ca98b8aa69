"""The projection weights of a model in memory, seen as a checkpoint: what ``acttail.analyze`` reads when it
is handed a transformers causal LM or our decoder instead of a folder.

It answers what the analysis asks of a ``Checkpoint``: the projections (layer, kind, shape), each one's
weight on demand, the architecture and a fingerprint. The fingerprint is the sha256 of every projection
weight's bytes (as stored, in layer and kind order) with their shapes: it sees every weight it vouches
for, but differs from the fingerprint of the checkpoint file the model was loaded from, so plans made
from a module are for that module (``acttail.apply`` checks shapes, not fingerprints).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .checkpoint import Projection
from .errors import ActTailError
from .layout import HF_FUSED, HF_MODULES, KINDS


class ModuleWeights:
    """A transformers causal LM (``model.model.layers``) or our ``Transformer`` as a weight source."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._weights = projection_weights(model)  # (layer, kind) -> tensor [out, in]
        self.num_layers = 1 + max(layer for layer, _ in self._weights)
        cfg = getattr(model, "config", None)
        self.architecture = ((getattr(cfg, "architectures", None) or [None])[0] or type(model).__name__)
        self.model_type = getattr(cfg, "model_type", None)
        self.rotation = "layer" if getattr(getattr(model, "args", None), "rotated", False) else None
        self.path = getattr(cfg, "_name_or_path", None) or type(model).__name__
        self.fingerprint = self._fingerprint()

    def projections(self) -> list[Projection]:
        return [Projection(layer, kind, *self._weights[layer, kind].shape)
                for layer in range(self.num_layers) for kind in KINDS]

    def load(self, proj: Projection) -> torch.Tensor:
        return self._weights[proj.layer, proj.kind].detach()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.projections():
            w = self.load(p).contiguous().cpu()
            h.update(f"{p.key}:{tuple(w.shape)}:{w.dtype};".encode())
            h.update(w.view(torch.uint8).numpy().tobytes() if w.dtype != torch.bfloat16 else
                     w.view(torch.int16).numpy().tobytes())
        return "sha256:" + h.hexdigest()[:32]


def decoder_layers(model: nn.Module):
    """The decoder layers of a transformers causal LM (``model.model.layers``), or one clear error."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) or getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise ActTailError(f"{type(model).__name__}: no decoder layers found at model.model.layers")
    return layers


def projection_modules(model: nn.Module) -> dict[nn.Linear, list[tuple[str, int, slice]]]:
    """Each projection Linear of a transformers causal LM -> the (kind, layer, output rows) it computes
    (several for Phi-3's fused qkv_proj and gate_up_proj)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for kind, name in HF_MODULES.items():
            try:
                out[layer.get_submodule(name)] = [(kind, i, slice(None))]
            except AttributeError:
                pass
        for name, kinds in HF_FUSED.items():
            try:
                linear = layer.get_submodule(name)
            except AttributeError:
                continue
            rows, start = [], 0
            for k, width in zip(kinds, _fused_sizes(kinds, cfg)):
                rows.append((k, i, slice(start, start + width)))
                start += width
            out[linear] = rows
    return out


def projection_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """Each projection's weight [out, in] of a transformers causal LM or our decoder (views, no copies)."""
    layers = getattr(model, "layers", None)
    if layers is not None and hasattr(layers[0], "attention") and hasattr(layers[0].attention, "wqkv"):
        return _ours(layers)
    out = {(layer, kind): linear.weight[rows] for linear, parts in projection_modules(model).items()
           for kind, layer, rows in parts}
    n = len(decoder_layers(model))
    missing = [(i, k) for i in range(n) for k in KINDS if (i, k) not in out]
    if missing:
        raise ActTailError(f"{type(model).__name__}: no weight for layers.{missing[0][0]}.{missing[0][1]}")
    return out


def _fused_sizes(kinds, cfg) -> list[int]:
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    sizes = {"q": heads * hd, "k": kv * hd, "v": kv * hd, "gate": cfg.intermediate_size, "up": cfg.intermediate_size}
    return [sizes[k] for k in kinds]


def _ours(layers) -> dict[tuple[int, str], torch.Tensor]:
    """Our decoder keeps q/k/v and gate/up fused: split them back per kind."""
    out = {}
    for i, block in enumerate(layers):
        att, ffn = block.attention, block.feed_forward
        out.update({(i, k): w for k, w in zip(("q", "k", "v"), att.wqkv.weight.split(list(att.sizes)))})
        out[i, "o"] = att.wo.weight
        out.update({(i, k): w for k, w in zip(("gate", "up"), ffn.w13.weight.split(ffn.inter))})
        out[i, "down"] = ffn.w2.weight
    return out
