"""A decoder in plain torch after gpt-fast's model.py: Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3 (text) and
Phi-3, one block definition with the options these architectures differ by (``ModelArgs``).

Weights come from ``acttail.checkpoint.Checkpoint``; activations can be sparsified at the input of every
projection by a ``Sparsifier`` (see sparsify.py). Projections that share an input stay grouped
(``Attention.qkv``, ``FeedForward.gate_up``) so a fused kernel can take the group at once.

What the Gemma family adds to the Llama block (each an option, off for Llama): RMSNorm scaled by
(1 + weight), GeGLU (gelu with the tanh approximation), the embedding scaled by sqrt(dim), attention scaled
by query_pre_attn_scalar**-0.5, norms after attention and after the MLP as well as before (Gemma 2/3),
q/k RMSNorm per head (Gemma 3), tanh soft-capping of attention scores and of the logits (Gemma 2),
sliding-window layers (Gemma 2/3, Phi-3) and a rope base of their own for them (Gemma 3). Phi-3 fuses
q/k/v and gate/up in its checkpoint, which is our layout already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import decoder_prefix
from ..errors import ActTailError
from ..layout import ARCHITECTURES, FAMILIES, HF_MODULES
from .sparsify import Sparsifier

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
    if family == "phi3" and kind in ("longrope", "su", "yarn"):  # transformers' Phi3Config: all three are LongRoPE
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


# ---- RoPE ------------------------------------------------------------------------------------------

def rope_inv_freq(args: ModelArgs, local: bool = False) -> Tensor:
    """Inverse frequencies of the rotary embedding, with the config's rope scaling (llama3, linear,
    longrope); ``local``: the sliding layers' own base, unscaled (Gemma 3)."""
    d = args.head_dim
    base = args.local_rope_base if local else args.rope_base
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    inv_freq = 1.0 / (base ** exponents)
    s = None if local else args.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "longrope":
        return 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * base ** exponents)
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ActTailError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 and longrope are)")


def rope_cache(args: ModelArgs, length: int, local: bool = False) -> tuple[Tensor, Tensor]:
    """cos and sin tables [length, head_dim] (HF's rotate-half layout: frequencies repeated twice), times
    LongRoPE's attention factor where there is one."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), rope_inv_freq(args, local))
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    factor = 1.0 if local or not args.rope_scaling else args.rope_scaling.get("attention_factor", 1.0)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by cos/sin [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- attention -------------------------------------------------------------------------------------

def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None,
              softcap: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v over the keys ``mask`` allows (None: causal, q and k from one window).

    q [B, H, T, D], k and v [B, KV, S, D] with KV dividing H; scale None is head_dim**-0.5. With ``softcap``
    the scores become cap * tanh(scores / cap) before the mask (Gemma 2), computed as transformers' eager
    attention does; without, torch's scaled_dot_product_attention."""
    gqa = k.shape[1] != q.shape[1]
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    s = torch.tanh(s / softcap) * softcap
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def attention_mask(q_pos: Tensor, n_keys: int, window: int | None) -> Tensor:
    """[T, n_keys] bool: key position j is visible from query position i when j <= i, and i - j < window
    for a sliding layer (the window counts the query's own position)."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    mask = k_pos <= q_pos[:, None]
    if window is not None:
        mask &= k_pos > q_pos[:, None] - window
    return mask


# ---- modules ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm; with an ``offset`` (Gemma: 1) it scales by (offset + weight) in float32, as Gemma does."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    """Static key/value cache [B, n_kv_heads, max_seq_len, head_dim] for prefill + decode."""

    def __init__(self, batch: int, length: int, heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.sizes = args.qkv_sizes
        self.scale, self.softcap, self.window = args.attn_scale, args.attn_softcap, args.window(layer)
        # q, k and v share one input: one weight [q+k+v, dim] (dense path: one matmul), split per kind.
        self.wqkv = nn.Linear(args.dim, sum(self.sizes), bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset) if args.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, sp: Sparsifier) -> Tensor:
        B, T, _ = x.shape
        q, k, v = sp.project(self.layer, ("q", "k", "v"), x, self.wqkv, self.sizes)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # Gemma 3: every head normalised before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is None:  # one whole window from position 0
            mask = None if self.window is None or T <= self.window else \
                attention_mask(torch.arange(T, device=x.device), T, self.window)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            mask = attention_mask(input_pos, k.shape[2], self.window)  # [T, max_seq_len]
        y = attention(q, k, v, mask, self.scale, self.softcap)
        return sp.project(self.layer, ("o",), y.transpose(1, 2).reshape(B, T, -1), self.wo)[0]


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.inter = args.intermediate_size
        self.act = ACTIVATIONS[args.activation]
        # gate and up share one input: one weight [2 * inter, dim], split per kind.
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor, sp: Sparsifier) -> Tensor:
        g, u = sp.project(self.layer, ("gate", "up"), x, self.w13, (self.inter, self.inter))
        return sp.project(self.layer, ("down",), self.act(g) * u, self.w2)[0]


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args, layer)
        norm = partial(RMSNorm, args.dim, args.norm_eps, args.norm_offset)
        self.attention_norm = norm()
        self.ffn_norm = norm()
        # Gemma 2/3 also normalise what attention and the MLP add to the residual stream
        self.post_attention_norm = norm() if args.sandwich_norm else nn.Identity()
        self.post_ffn_norm = norm() if args.sandwich_norm else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, sp: Sparsifier) -> Tensor:
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), cos, sin, input_pos, sp))
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h), sp))


class Transformer(nn.Module):
    """The decoder: embeddings, blocks, final norm, LM head. ``sparsifier`` decides what is zeroed."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.sparsifier = Sparsifier.dense()
        self.set_rope()
        self.stream = None  # streamed from a checkpoint: layer -> its weights (see load_model)
        self._resident = None  # the streamed layer in memory now

    def set_rope(self) -> None:
        """(Re)make the rope tables: the global ones, and the sliding layers' when they have their own."""
        tables = {"": rope_cache(self.args, self.args.max_seq_len)}
        if self.args.local_rope_base is not None:
            tables["_local"] = rope_cache(self.args, self.args.max_seq_len, local=True)
        for suffix, (cos, sin) in tables.items():
            self.register_buffer(f"rope_cos{suffix}", cos, persistent=False)
            self.register_buffer(f"rope_sin{suffix}", sin, persistent=False)

    def setup_caches(self, batch: int, length: int) -> None:
        """Allocate static KV caches for generation (length <= max_seq_len)."""
        if length > self.args.max_seq_len:
            raise ActTailError(f"{length} tokens exceed the model's maximum context of {self.args.max_seq_len}")
        w = self.output.weight
        for block in self.layers:
            cache = KVCache(batch, length, self.args.n_local_heads, self.args.head_dim, w.dtype)
            block.attention.kv_cache = cache.to(w.device)

    def clear_caches(self) -> None:
        for block in self.layers:
            block.attention.kv_cache = None

    def embed(self, idx: Tensor) -> Tensor:
        """Token embeddings [B, T, dim], times embed_scale (Gemma) rounded to their dtype as transformers does."""
        x = self.tok_embeddings(idx)
        if self.args.embed_scale is not None:
            x = x * torch.tensor(self.args.embed_scale).to(x.dtype)
        return x

    def rope(self, layer: int, input_pos: Tensor | None, T: int) -> tuple[Tensor, Tensor]:
        """cos, sin of a layer at positions input_pos (None: 0..T-1)."""
        cos, sin = (self.rope_cos_local, self.rope_sin_local) if self.args.local_rope(layer) else \
            (self.rope_cos, self.rope_sin)
        return (cos[:T], sin[:T]) if input_pos is None else (cos[input_pos], sin[input_pos])

    def hidden(self, idx: Tensor | None, input_pos: Tensor | None = None, layers: range | None = None,
               h: Tensor | None = None) -> Tensor:
        """Residual stream after ``layers`` (all by default), from tokens ``idx`` or a given stream ``h``."""
        T = idx.shape[1] if h is None else h.shape[1]
        if input_pos is None and T > self.args.max_seq_len:
            raise ActTailError(f"{T} tokens exceed the model's maximum context of {self.args.max_seq_len}")
        x = self.embed(idx) if h is None else h
        self.sparsifier.set_positions(input_pos if input_pos is not None else torch.arange(T, device=x.device))
        for i in layers if layers is not None else range(self.args.n_layer):
            cos, sin = self.rope(i, input_pos, T)
            x = self.block(i)(x, cos, sin, input_pos, self.sparsifier)
        return x

    def block(self, i: int) -> "TransformerBlock":
        """Decoder block i, its weights read from the checkpoint first when the model is streamed (the
        previous streamed block leaves memory): at most one block's weights are resident."""
        if self.stream is not None and self._resident != i:
            dev = self.output.weight.device
            if self._resident is not None:
                self.layers[self._resident].to("meta")
            self.layers[i].load_state_dict(self.stream(i), assign=True)
            self.layers[i].to(dev).requires_grad_(False)
            self._resident = i
        return self.layers[i]

    def logits(self, h: Tensor) -> Tensor:
        """LM-head logits of normalised final states h, soft-capped where the model says (Gemma 2)."""
        y = self.output(h)
        cap = self.args.final_softcap
        return y if cap is None else torch.tanh(y / cap) * cap

    def forward(self, idx: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] for tokens idx [B, T] at positions input_pos (None: 0..T-1, no cache)."""
        return self.logits(self.norm(self.hidden(idx, input_pos)))


# ---- loading ---------------------------------------------------------------------------------------

# Our norm -> the HF module it is loaded from (Gemma 2/3 have four norms per layer, the others two).
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
SANDWICH_NORMS = {"attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}


def _layer_weights(get, names: set, args: ModelArgs, hf: str, ours: str) -> dict[str, Tensor]:
    """Our weights of one decoder layer from the HF tensors under ``hf`` (``model.layers.3``). Phi-3's
    fused qkv_proj and gate_up_proj are already in our layout."""
    m = {k: f"{hf}.{name}" for k, name in HF_MODULES.items()}
    sd = {}
    if f"{hf}.self_attn.qkv_proj.weight" in names:  # Phi-3
        sd[f"{ours}.attention.wqkv.weight"] = get(f"{hf}.self_attn.qkv_proj.weight")
        sd[f"{ours}.feed_forward.w13.weight"] = get(f"{hf}.mlp.gate_up_proj.weight")
        if args.qkv_bias:
            sd[f"{ours}.attention.wqkv.bias"] = get(f"{hf}.self_attn.qkv_proj.bias")
    else:
        sd[f"{ours}.attention.wqkv.weight"] = torch.cat([get(f"{m[k]}.weight") for k in "qkv"])
        sd[f"{ours}.feed_forward.w13.weight"] = torch.cat([get(f"{m['gate']}.weight"), get(f"{m['up']}.weight")])
        if args.qkv_bias:
            sd[f"{ours}.attention.wqkv.bias"] = torch.cat([get(f"{m[k]}.bias") for k in "qkv"])
    sd[f"{ours}.attention.wo.weight"] = get(f"{m['o']}.weight")
    sd[f"{ours}.feed_forward.w2.weight"] = get(f"{m['down']}.weight")
    for our_norm, hf_norm in (SANDWICH_NORMS if args.sandwich_norm else NORMS).items():
        sd[f"{ours}.{our_norm}.weight"] = get(f"{hf}.{hf_norm}.weight")
    if args.qk_norm:
        sd[f"{ours}.attention.q_norm.weight"] = get(f"{hf}.self_attn.q_norm.weight")
        sd[f"{ours}.attention.k_norm.weight"] = get(f"{hf}.self_attn.k_norm.weight")
    return sd


def check_shapes(model: Transformer, sd: dict[str, Tensor], where) -> None:
    """One clear error if a weight's shape is not the one config.json implies."""
    expected = model.state_dict()
    for name, t in sd.items():
        want = expected[name].shape
        if t.shape != want:
            raise ActTailError(f"{where}: config.json does not match the weights: {name} is {list(t.shape)}, "
                               f"config.json implies {list(want)} (hidden_size, intermediate_size, heads, "
                               "head_dim, vocab_size)")


def load_model(ckpt, dtype: torch.dtype = torch.float32, device: str = "cpu", stream: bool = False) -> Transformer:
    """Build the decoder for an opened ``Checkpoint`` and load its weights (float32 on CPU by default).

    ``stream``: keep only the embeddings, the final norm and the LM head in memory and read each decoder
    block from the checkpoint when it runs (``Transformer.block``), so a model larger than the device's
    memory calibrates and evaluates layer by layer (memory: one block plus the activations)."""
    args = ModelArgs.from_config(ckpt.config, ckpt.architecture)
    with torch.device("meta"):
        model = Transformer(args)

    def get(name: str) -> Tensor:
        t = ckpt.tensor(name).to(dtype)
        if not torch.isfinite(t).all():  # the model could only produce NaN logits
            raise ActTailError(f"{ckpt.path}: the weights {name} hold NaN or infinite values")
        return t

    names = set(ckpt.tensor_names)
    prefix = getattr(ckpt, "prefix", None) or decoder_prefix(names) or "model.layers"
    base = prefix[: -len("layers")]  # "model.", or Gemma 3 multimodal's "model.language_model."
    sd = {"tok_embeddings.weight": get(f"{base}embed_tokens.weight"), "norm.weight": get(f"{base}norm.weight")}
    head = next((n for n in ("lm_head.weight", base.removesuffix("model.") + "lm_head.weight") if n in names), None)
    sd["output.weight"] = get(head) if head and not args.tie_embeddings else sd["tok_embeddings.weight"]
    def layer(i: int) -> dict[str, Tensor]:
        one = _layer_weights(get, names, args, f"{prefix}.{i}", f"layers.{i}")
        check_shapes(model, one, ckpt.path)
        return one

    if not stream:
        for i in range(args.n_layer):
            sd.update(layer(i))
    check_shapes(model, sd, ckpt.path)
    model.load_state_dict(sd, strict=False, assign=True)
    model.set_rope()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and not (stream and n.startswith("layers."))]
    if missing:
        raise ActTailError(f"{ckpt.path}: the runtime found no weights for {', '.join(missing[:3])}")
    model.sparsifier = Sparsifier.dense()
    if not stream:
        return model.to(device).eval().requires_grad_(False)
    blocks, model.layers = model.layers, nn.ModuleList()
    model.to(device).eval().requires_grad_(False)
    model.layers = blocks.eval()
    model.stream = lambda i: {k.removeprefix(f"layers.{i}."): t for k, t in layer(i).items()}
    return model
