"""Model layout: the projections of a decoder layer, how they share inputs, and what they are called.

Every stage names a projection by its ``key``, ``layers.{layer}.{kind}``. Projections that read one input
form a group (q/k/v read the attention norm's output, gate/up the MLP norm's output); a block computes its
groups in the order of ``GROUPS``, which is also the order calibration fits them in.
"""

from __future__ import annotations

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
GROUP_OF = {kind: group for group, kinds in GROUPS.items() for kind in kinds}

# Module of each kind inside an HF decoder layer (Llama naming; Phi-3 fuses qkv and gate/up).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def key(layer: int, kind: str) -> str:
    """The projection's name in every document: ``layers.3.up``."""
    return f"layers.{layer}.{kind}"


def parse_key(name: str) -> tuple[int, str]:
    """(layer, kind) of a key; ValueError for anything else."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in KINDS:
        raise ValueError(f"not a projection key: {name!r} (expected layers.N.KIND)")
    return int(parts[1]), parts[2]


def order(layer: int, kind: str) -> tuple[int, int]:
    """Sort key: by layer, then in the order a block computes its projections."""
    return (layer, KINDS.index(kind) if kind in KINDS else len(KINDS))
