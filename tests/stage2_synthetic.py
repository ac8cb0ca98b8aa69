"""Synthetic analysis rows and plans for the stage-2 tests (allocation, plans, exporters)."""

from __future__ import annotations

import random

KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def shapes(hidden=576, inter=1536, kv=192):
    """(out_features, in_features) per kind, SmolLM2-135M-like by default."""
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


def rows(num_layers=30, seed=0, null_every=0, **shape_kw):
    """Analysis projection rows with random alphas in [2, 6]; every ``null_every``-th alpha is null."""
    rng = random.Random(seed)
    out = []
    for layer in range(num_layers):
        for kind, (o, i) in shapes(**shape_kw).items():
            n = len(out)
            alpha = None if null_every and n % null_every == null_every - 1 else rng.uniform(2.0, 6.0)
            out.append({"key": f"layers.{layer}.{kind}", "layer": layer, "kind": kind, "out_features": o,
                        "in_features": i, "params": o * i, "n_evals": min(o, i), "alpha": alpha,
                        "stable_rank": rng.uniform(5, 50), "warnings": [] if alpha is not None else ["fit failed"]})
    return out


def analysis(num_layers=30, seed=0, null_every=0, fingerprint="synthetic-fp", **shape_kw):
    """A complete analysis.json document around ``rows``."""
    return {
        "format": "acttail-analysis", "version": 1, "tool_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00",
        "model": {"path": "/synthetic/model", "fingerprint": fingerprint, "architecture": "LlamaForCausalLM",
                  "model_type": "llama", "num_layers": num_layers},
        "settings": {"fit": "ks", "dtype": "float64", "device": "cpu", "eval_floor": 1e-5, "backend": "acttail"},
        "projections": rows(num_layers, seed, null_every, **shape_kw),
        "summary": {},
    }
