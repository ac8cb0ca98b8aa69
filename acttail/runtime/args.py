"""``ModelArgs``: the decoder's shape and the options its architectures differ by, read from config.json.

Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3 (text) and Phi-3 run one block definition (``model.py``);
what the Gemma family adds to the Llama block is a set of options here, each off for Llama: RMSNorm scaled
by (1 + weight), GeGLU (gelu with the tanh approximation), the embedding scaled by sqrt(dim), attention
scaled by query_pre_attn_scalar**-0.5, norms after attention and after the MLP as well as before (Gemma
2/3), q/k RMSNorm per head (Gemma 3), tanh soft-capping of attention scores and of the logits (Gemma 2),
sliding-window layers (Gemma 2/3, Phi-3) and a rope base of their own for them (Gemma 3). Rope scaling:
linear, llama3 and Phi-3's LongRoPE (its short factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ActTailError
from ..layout import ARCHITECTURES, FAMILIES


# The transformers config classes' values for keys a Gemma config.json may leave out (a Gemma 3
# multimodal config often gives only a few keys of its text_config).
DEFAULTS = {
    "gemma": {"head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
              "max_position_embeddings": 8192, "rope_theta": 10000.0, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
               "max_position_embeddings": 8192, "rope_theta": 10000.0, "tie_word_embeddings": True,
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0},
    "gemma3": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
               "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
               "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6},
}
FULL, SLIDING = "full_attention", "sliding_attention"
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
MAX_POSITIONS = 1 << 20  # RoPE tables are built for the whole context: a config cannot make them huge


@dataclass
class ModelArgs:
    """The decoder's shape and the options of its architecture, read from config.json (``from_config``).

    Every option after ``qkv_bias`` is off for Llama, Mistral and Qwen2."""

    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_local_heads: int  # key/value heads (GQA)
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_base: float
    rope_scaling: dict | None
    max_seq_len: int
    tie_embeddings: bool
    qkv_bias: bool
    activation: str = "silu"  # of the gate: silu (SwiGLU) or gelu_tanh (GeGLU)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1 for Gemma
    embed_scale: float | None = None  # embeddings times this (Gemma: sqrt(dim))
    attn_scale: float | None = None  # score scale; None: head_dim**-0.5 (Gemma 2/3: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    qk_norm: bool = False  # RMSNorm of every q and k head before the rotation (Gemma 3)
    sandwich_norm: bool = False  # attention and MLP outputs normalised too, before the residual add (Gemma 2/3)
    sliding_window: int | None = None  # how many positions a sliding layer sees, its own included
    layer_types: tuple[str, ...] | None = None  # full_attention / sliding_attention per layer; None: all full
    local_rope_base: float | None = None  # rope base of the sliding layers when they have their own (Gemma 3)
    rotated: bool = False  # the stream changes basis before each layer but the first (``acttail.rotation``)

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of q, k and v."""
        kv = self.n_local_heads * self.head_dim
        return (self.n_head * self.head_dim, kv, kv)

    def in_features(self, kind: str) -> int:
        """Width of a projection's input: the attention output for o, the MLP hidden for down, else dim."""
        return {"o": self.n_head * self.head_dim, "down": self.intermediate_size}.get(kind, self.dim)

    def out_features(self, kind: str) -> int:
        """Width of a projection's output."""
        q, k, v = self.qkv_sizes
        return {"q": q, "k": k, "v": v, "gate": self.intermediate_size, "up": self.intermediate_size}.get(kind, self.dim)

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer's attention, or None for full causal attention."""
        return self.sliding_window if self.layer_types and self.layer_types[layer] == SLIDING else None

    def local_rope(self, layer: int) -> bool:
        """Does the layer use the sliding layers' own rope (Gemma 3's local base)?"""
        return self.local_rope_base is not None and self.window(layer) is not None

    @classmethod
    def from_config(cls, config: dict, architecture: str) -> "ModelArgs":
        if architecture not in FAMILIES:
            raise ActTailError(f"the runtime runs {', '.join(ARCHITECTURES)}; this model is {architecture}")
        family = FAMILIES[architecture]
        c = {**DEFAULTS.get(family, {}), **config}
        missing = [k for k in REQUIRED if k not in c]
        if missing:
            raise ActTailError(f"config.json has no {', '.join(missing)} (the runtime needs it)")
        if c.get("use_bidirectional_attention"):
            raise ActTailError("bidirectional attention (use_bidirectional_attention) is not supported")
        heads, dim = c["num_attention_heads"], c["hidden_size"]
        head_dim = c.get("head_dim") or dim // heads
        rope_base, scaling, local_base = _rope(c, family)
        max_len = min(c.get("max_position_embeddings", 2048), MAX_POSITIONS)
        if architecture == "MistralForCausalLM" and c.get("sliding_window"):
            max_len = min(max_len, c["sliding_window"])  # no sliding window here: stay inside it
        if scaling and scaling.get("rope_type") == "longrope":
            max_len = min(max_len, scaling["original_max_position_embeddings"])
            if len(scaling["short_factor"]) != head_dim // 2:
                raise ActTailError(f"LongRoPE short_factor has {len(scaling['short_factor'])} values, the head "
                                   f"dimension {head_dim} needs {head_dim // 2}")
        layer_types = _layer_types(c, family)
        gemma = family.startswith("gemma")
        return cls(
            vocab_size=c["vocab_size"],
            dim=dim,
            n_layer=c["num_hidden_layers"],
            n_head=heads,
            n_local_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_base=rope_base,
            rope_scaling=scaling,
            max_seq_len=max_len,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(c.get("attention_bias", False)),
            activation=_activation(c, family),
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=dim ** 0.5 if gemma else None,
            attn_scale=c["query_pre_attn_scalar"] ** -0.5 if family in ("gemma2", "gemma3") else None,
            attn_softcap=c.get("attn_logit_softcapping") if family == "gemma2" else None,
            final_softcap=c.get("final_logit_softcapping") if family in ("gemma2", "gemma3") else None,
            qk_norm=family == "gemma3",
            sandwich_norm=family in ("gemma2", "gemma3"),
            sliding_window=c.get("sliding_window") if layer_types else None,
            layer_types=layer_types,
            local_rope_base=local_base,
            rotated=bool(c.get("acttail_rotation")),
        )


def _activation(c: dict, family: str) -> str:
    """The gate activation: silu, or gelu with the tanh approximation (transformers' gelu_pytorch_tanh)."""
    if family in ("gemma2", "gemma3"):
        name = c.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        name = c.get("hidden_act", "silu")
        if family == "gemma" and name == "gelu":
            name = "gelu_pytorch_tanh"  # as transformers' GemmaConfig reads it
    if name not in ("silu", "gelu_pytorch_tanh"):
        raise ActTailError(f"hidden activation {name!r} is not supported (silu and gelu_pytorch_tanh are)")
    return "silu" if name == "silu" else "gelu_tanh"


def _layer_types(c: dict, family: str) -> tuple[str, ...] | None:
    """full_attention / sliding_attention per layer, as transformers reads the config (layer_types, else the
    family's pattern); None when every layer attends to all earlier positions."""
    n = c["num_hidden_layers"]
    if not c.get("sliding_window") or family not in ("gemma2", "gemma3", "phi3"):
        return None
    if c.get("layer_types"):
        types = tuple(c["layer_types"])
    elif family == "gemma2":  # every other layer, from the first
        types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))
    elif family == "gemma3":  # five local layers, then a global one
        pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
        types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
    else:  # Phi-3: the window applies to every layer
        types = (SLIDING,) * n
    if len(types) != n or not set(types) <= {FULL, SLIDING}:
        raise ActTailError(f"layer_types must give full_attention or sliding_attention for each of {n} layers")
    return types


def _rope(c: dict, family: str) -> tuple[float, dict | None, float | None]:
    """(base, scaling) of the rotary embedding, and the base of the sliding layers when it is their own.

    Reads the classic keys (rope_theta, rope_scaling, rope_local_base_freq) and transformers 5's
    rope_parameters, per layer type for Gemma 3. Phi-3's LongRoPE becomes its short factors (``_longrope``)."""
    params = c.get("rope_parameters") or {}
    if family == "phi3":
        partial_rotary = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
        if partial_rotary != 1.0:
            raise ActTailError(f"partial rotary embeddings (partial_rotary_factor {partial_rotary}) are not "
                               "supported")
    local_base = None
    if isinstance(params.get(FULL), dict):  # transformers 5, Gemma 3: one set of parameters per layer type
        full, local = params[FULL], params.get(SLIDING) or {}
        if local.get("rope_type", "default") != "default":
            raise ActTailError(f"rope scaling of sliding layers ({local['rope_type']!r}) is not supported")
        base = full.get("rope_theta", c.get("rope_theta", 10000.0))
        scaling = full if full.get("rope_type", "default") != "default" else None
        local_base = local.get("rope_theta", c.get("rope_local_base_freq"))
    else:
        base = c.get("rope_theta", params.get("rope_theta", 10000.0))
        scaling = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
        if family == "gemma3":
            local_base = c.get("rope_local_base_freq")
    kind = scaling and scaling.get("rope_type", scaling.get("type"))
    if kind == "longrope" or (family == "phi3" and kind in ("su", "yarn")):  # Phi3Config: all three are LongRoPE
        scaling = _longrope(c, scaling)
    return float(base), scaling, local_base


def _longrope(c: dict, s: dict) -> dict:
    """Phi-3's LongRoPE for contexts up to original_max_position_embeddings: the short factors, and cos/sin
    scaled by the attention factor, as transformers computes them (past that length it switches every
    position to the long factors; the runtime's context stops there)."""
    orig = s.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
    if not orig or "short_factor" not in s:
        raise ActTailError("LongRoPE scaling needs short_factor and original_max_position_embeddings")
    factor = s.get("factor") or c.get("max_position_embeddings", orig) / orig
    attention = s.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
    return {"rope_type": "longrope", "short_factor": list(s["short_factor"]), "attention_factor": attention,
            "original_max_position_embeddings": int(orig)}


def shape(vocab_size: int, dim: int, n_layer: int, n_head: int, n_kv: int, head_dim: int, inter: int,
          norm_eps: float = 1e-5, rope_base: float = 10000.0, max_seq_len: int = 4096) -> ModelArgs:
    """ModelArgs of a Llama-shaped decoder, for random-weight benchmarks and tests."""
    return ModelArgs(vocab_size, dim, n_layer, n_head, n_kv, head_dim, inter, norm_eps, rope_base, None,
                     max_seq_len, False, False)


LLAMA2_7B = shape(32000, 4096, 32, 32, 32, 128, 11008)
SMOLLM2_135M = shape(49152, 576, 30, 9, 3, 64, 1536, rope_base=100000.0)
