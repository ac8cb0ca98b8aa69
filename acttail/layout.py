"""Model layout: the projections of a decoder layer, how they share inputs, and what they are called.

Every stage names a projection by its ``key``, ``layers.{layer}.{kind}``. Projections that read one input
form a group (q/k/v read the attention norm's output, gate/up the MLP norm's output); a block computes its
groups in the order of ``GROUPS``, which is also the order calibration fits them in.
"""

from __future__ import annotations

from itertools import islice

from .errors import ActTailError

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


def check_projections(rows: list[dict], num_layers: int, where: str) -> None:
    """Every projection of a model (num_layers x KINDS) exactly once in a document's rows, each key agreeing
    with its layer and kind and params = in_features x out_features: one clear error naming the field.
    (What a schema cannot say; a missing projection would silently run dense.)"""
    seen = set()
    for i, r in enumerate(rows):
        at = f"{where}: field $.projections[{i}]"
        if r["key"] != key(r["layer"], r["kind"]):
            raise ActTailError(f"{at}.key: {r['key']!r} does not match its layer and kind")
        if r["key"] in seen:
            raise ActTailError(f"{at}.key: {r['key']!r} appears twice")
        if r["layer"] >= num_layers:
            raise ActTailError(f"{at}.layer: {r['layer']} >= num_layers {num_layers}")
        if r["params"] != r["in_features"] * r["out_features"]:
            raise ActTailError(f"{at}.params: not in_features x out_features")
        seen.add(r["key"])
    if len(seen) < num_layers * len(KINDS):  # keys are unique and inside the model: some are missing
        missing = (key(i, k) for i in range(num_layers) for k in KINDS if key(i, k) not in seen)
        raise ActTailError(f"{where}: field $.projections: {num_layers * len(KINDS) - len(seen)} of the model's "
                           f"{num_layers} x {len(KINDS)} projections missing, e.g. {', '.join(islice(missing, 3))}")
