"""Model layout: the projections of a decoder layer, how they share inputs, what they are called, and the
architectures the package reads.

Every stage names a projection by its ``Key``, (layer, kind), written ``layers.3.up`` in every document.
Projections that read one input form a group (q/k/v read the attention norm's output, gate/up the MLP
norm's output); a block computes its groups in the order of ``GROUPS``, which is also the order
calibration fits them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

from .errors import ActTailError

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
GROUP_OF = {kind: group for group, kinds in GROUPS.items() for kind in kinds}
# Weight-only formats the decode kernels read besides fp16/bf16 (``kernels.quantize``): int8 per output
# channel, int4 in groups of 128 input rows, GGUF Q4_1's grid (a scale and a minimum per 32 input rows).
WEIGHT_FORMATS = ("int8", "int4", "q4_1")

# Module of each kind inside an HF decoder layer (Llama naming).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# Phi-3 fuses a group into one module: group -> module, and module -> the kinds it holds, in the order of its
# output rows.
HF_FUSED_MODULES = {"qkv": "self_attn.qkv_proj", "gate_up": "mlp.gate_up_proj"}
HF_FUSED = {module: GROUPS[group] for group, module in HF_FUSED_MODULES.items()}


@dataclass(frozen=True)
class Architecture:
    """What the checkpoint reader and the runtime need to know of one HF architecture."""

    model_type: str  # config.json's model_type, for a config that omits it
    family: str  # the runtime's family: which options of runtime.ModelArgs its block takes
    fused: bool = False  # q/k/v and gate/up stored as HF_FUSED modules (Phi-3), not HF_MODULES


# The architectures the package reads (config.json's ``architectures[0]``).
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", "llama"),
    "MistralForCausalLM": Architecture("mistral", "llama"),
    "Qwen2ForCausalLM": Architecture("qwen2", "llama"),
    "GemmaForCausalLM": Architecture("gemma", "gemma"),
    "Gemma2ForCausalLM": Architecture("gemma2", "gemma2"),
    "Gemma3ForCausalLM": Architecture("gemma3_text", "gemma3"),
    "Gemma3ForConditionalGeneration": Architecture("gemma3", "gemma3"),
    "Phi3ForCausalLM": Architecture("phi3", "phi3", fused=True),
}
FAMILIES = {name: arch.family for name, arch in ARCHITECTURES.items()}


class Key(NamedTuple):
    """A projection: (layer, kind), equal to that plain tuple in memory; ``str(key)`` is its name in
    every document, ``layers.3.up``."""

    layer: int
    kind: str

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> "Key":
        """The key named ``layers.N.KIND``; ValueError for anything else."""
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in KINDS:
            raise ValueError(f"not a projection key: {name!r} (expected layers.N.KIND)")
        return cls(int(parts[1]), parts[2])

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: by layer, then in the order a block computes its projections."""
        return (self.layer, KINDS.index(self.kind) if self.kind in KINDS else len(KINDS))


def key(layer: int, kind: str) -> str:
    """The projection's name in every document: ``layers.3.up`` (``str(Key(layer, kind))``)."""
    return str(Key(layer, kind))


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
