"""The sparse runtime: one decoder block (model.py) computing through an ops interface (ops.py: the torch
reference, with the plan's Sparsifier; kernel_ops.py: the Triton kernels for decode steps), the plan ->
kernel-launch mapping (launch.py), the fast GPU decoder (decoder.py: weight layout + CUDA graphs), plans on
transformers models (hf.py, applied.py), perplexity and generation.
"""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..errors import ActTailError
from .model import Transformer, load_model
from .sparsify import Sparsifier, settings

__all__ = ["Transformer", "Sparsifier", "check_device", "load_model", "open_model", "plan_sparsifier",
           "achieved_report"]


def check_device(device) -> torch.device:
    """The torch device for a --device value, or one clear error (unknown name, no CUDA GPU here)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ActTailError(f"unknown device {device!r} (use cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise ActTailError(f"unknown device {device!r} (use cpu or cuda[:N])")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ActTailError("--device cuda asked for, but torch sees no CUDA GPU here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ActTailError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    return dev


def open_model(path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               stream: bool = False) -> tuple[Checkpoint, Transformer]:
    """Open a model folder and build its decoder (float32 on CPU by default); ``stream`` keeps one decoder
    block in memory at a time (``load_model``)."""
    check_device(device)
    ckpt = Checkpoint.open(path)
    return ckpt, load_model(ckpt, dtype, device, stream)


def plan_sparsifier(plan, mode: str, where: str = "plan", dense_before: int = 0) -> Sparsifier:
    """The Sparsifier a ``Plan`` asks for: its thresholds (threshold mode) or its keep counts (topk mode)."""
    return Sparsifier(settings(plan, mode, where), dense_before=dense_before)


def achieved_report(plan, sp: Sparsifier) -> dict:
    """Measured sparsity per projection against the plan's target, and its parameter-weighted mean."""
    got = sp.achieved()
    rows = [{"key": e.key, "target": e.sparsity, "threshold": e.threshold, "achieved": got.get((e.layer, e.kind))}
            for e in plan.projections]
    measured = [(r, e.params) for r, e in zip(rows, plan.projections) if r["achieved"] is not None]
    total = sum(w for _, w in measured) or 1
    dev = [abs(r["achieved"] - r["target"]) for r, _ in measured]
    return {
        "weighted_target": sum(r["target"] * w for r, w in measured) / total,
        "weighted_achieved": sum(r["achieved"] * w for r, w in measured) / total,
        "max_abs_deviation": max(dev) if dev else None,
        "mean_abs_deviation": sum(dev) / len(dev) if dev else None,
        "projections": rows,
    }
