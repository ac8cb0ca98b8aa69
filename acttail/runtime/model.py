"""A Llama-family decoder in plain torch (Llama, Mistral, Qwen2), after gpt-fast's model.py.

Weights come from ``acttail.checkpoint.Checkpoint``; activations can be sparsified at the input of every
projection by a ``Sparsifier`` (see sparsify.py). Projections that share an input stay grouped
(``Attention.qkv``, ``FeedForward.gate_up``) so a fused kernel can take the group at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ActTailError
from ..layout import HF_MODULES
from .sparsify import Sparsifier

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
MAX_POSITIONS = 1 << 20  # RoPE tables are built for the whole context: a config cannot make them huge


@dataclass
class ModelArgs:
    """The decoder's shape, read from config.json."""

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

    @classmethod
    def from_config(cls, config: dict, architecture: str) -> "ModelArgs":
        if architecture not in ARCHITECTURES:
            raise ActTailError(f"the runtime runs {', '.join(ARCHITECTURES)}; this model is {architecture}")
        if config.get("hidden_act", "silu") != "silu":
            raise ActTailError(f"hidden_act {config['hidden_act']!r} is not supported (SwiGLU with silu only)")
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise ActTailError(f"config.json has no {', '.join(missing)} (the runtime needs it)")
        heads = config["num_attention_heads"]
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        max_len = min(config.get("max_position_embeddings", 2048), MAX_POSITIONS)
        if architecture == "MistralForCausalLM" and config.get("sliding_window"):
            max_len = min(max_len, config["sliding_window"])  # no sliding window here: stay inside it
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=heads,
            n_local_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_base=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=max_len,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
        )


def shape(vocab_size: int, dim: int, n_layer: int, n_head: int, n_kv: int, head_dim: int, inter: int,
          norm_eps: float = 1e-5, rope_base: float = 10000.0, max_seq_len: int = 4096) -> ModelArgs:
    """ModelArgs of a Llama-shaped decoder, for random-weight benchmarks and tests."""
    return ModelArgs(vocab_size, dim, n_layer, n_head, n_kv, head_dim, inter, norm_eps, rope_base, None,
                     max_seq_len, False, False)


LLAMA2_7B = shape(32000, 4096, 32, 32, 32, 128, 11008)
SMOLLM2_135M = shape(49152, 576, 30, 9, 3, 64, 1536, rope_base=100000.0)


# ---- RoPE ------------------------------------------------------------------------------------------

def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies of the rotary embedding, with the config's rope scaling (llama3, linear)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if not s:
        return inv_freq
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ActTailError(f"rope scaling type {kind!r} is not supported (default, linear and llama3 are)")


def rope_cache(args: ModelArgs, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin tables [length, head_dim] (HF's rotate-half layout: frequencies repeated twice)."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), rope_inv_freq(args))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by cos/sin [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- modules ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


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
        # q, k and v share one input: one weight [q+k+v, dim] (dense path: one matmul), split per kind.
        self.wqkv = nn.Linear(args.dim, sum(self.sizes), bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, sp: Sparsifier) -> Tensor:
        B, T, _ = x.shape
        q, k, v = sp.project(self.layer, ("q", "k", "v"), x, self.wqkv, self.sizes)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is None:  # one whole window: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            mask = torch.arange(k.shape[2], device=x.device) <= input_pos[:, None]  # [T, max_seq_len]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_head)
        return sp.project(self.layer, ("o",), y.transpose(1, 2).reshape(B, T, -1), self.wo)[0]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.inter = args.intermediate_size
        # gate and up share one input: one weight [2 * inter, dim], split per kind.
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor, sp: Sparsifier) -> Tensor:
        g, u = sp.project(self.layer, ("gate", "up"), x, self.w13, (self.inter, self.inter))
        return sp.project(self.layer, ("down",), F.silu(g) * u, self.w2)[0]


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args, layer)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, sp: Sparsifier) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, sp)
        return h + self.feed_forward(self.ffn_norm(h), sp)


class Transformer(nn.Module):
    """The decoder: embeddings, blocks, final norm, LM head. ``sparsifier`` decides what is zeroed."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.sparsifier = Sparsifier.dense()
        cos, sin = rope_cache(args, args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

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

    def hidden(self, idx: Tensor, input_pos: Tensor | None = None, layers: range | None = None,
               h: Tensor | None = None) -> Tensor:
        """Residual stream after ``layers`` (all by default), from tokens ``idx`` or a given stream ``h``."""
        T = idx.shape[1] if h is None else h.shape[1]
        if input_pos is None:
            if T > self.args.max_seq_len:
                raise ActTailError(f"{T} tokens exceed the model's maximum context of {self.args.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        x = self.tok_embeddings(idx) if h is None else h
        self.sparsifier.set_positions(input_pos if input_pos is not None else torch.arange(T, device=x.device))
        for i in layers if layers is not None else range(self.args.n_layer):
            x = self.layers[i](x, cos, sin, input_pos, self.sparsifier)
        return x

    def forward(self, idx: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] for tokens idx [B, T] at positions input_pos (None: 0..T-1, no cache)."""
        return self.output(self.norm(self.hidden(idx, input_pos)))


# ---- loading ---------------------------------------------------------------------------------------

def _hf_names(i: int) -> dict[str, str]:
    return {k: f"model.layers.{i}.{m}" for k, m in HF_MODULES.items()}


def check_shapes(model: Transformer, sd: dict[str, Tensor], where) -> None:
    """One clear error if a weight's shape is not the one config.json implies."""
    expected = model.state_dict()
    for name, t in sd.items():
        want = expected[name].shape
        if t.shape != want:
            raise ActTailError(f"{where}: config.json does not match the weights: {name} is {list(t.shape)}, "
                               f"config.json implies {list(want)} (hidden_size, intermediate_size, heads, "
                               "head_dim, vocab_size)")


def load_model(ckpt, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """Build the decoder for an opened ``Checkpoint`` and load its weights (float32 on CPU by default)."""
    args = ModelArgs.from_config(ckpt.config, ckpt.architecture)
    with torch.device("meta"):
        model = Transformer(args)

    def get(name: str) -> Tensor:
        t = ckpt.tensor(name).to(dtype)
        if not torch.isfinite(t).all():  # the model could only produce NaN logits
            raise ActTailError(f"{ckpt.path}: the weights {name} hold NaN or infinite values")
        return t

    sd = {"tok_embeddings.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    names = set(ckpt.tensor_names)
    if "lm_head.weight" in names and not args.tie_embeddings:
        sd["output.weight"] = get("lm_head.weight")
    else:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    for i in range(args.n_layer):
        n, p = _hf_names(i), f"layers.{i}"
        sd[f"{p}.attention.wqkv.weight"] = torch.cat([get(f"{n[k]}.weight") for k in "qkv"])
        if args.qkv_bias:
            sd[f"{p}.attention.wqkv.bias"] = torch.cat([get(f"{n[k]}.bias") for k in "qkv"])
        sd[f"{p}.attention.wo.weight"] = get(f"{n['o']}.weight")
        sd[f"{p}.feed_forward.w13.weight"] = torch.cat([get(f"{n['gate']}.weight"), get(f"{n['up']}.weight")])
        sd[f"{p}.feed_forward.w2.weight"] = get(f"{n['down']}.weight")
        sd[f"{p}.attention_norm.weight"] = get(f"model.layers.{i}.input_layernorm.weight")
        sd[f"{p}.ffn_norm.weight"] = get(f"model.layers.{i}.post_attention_layernorm.weight")
    check_shapes(model, sd, ckpt.path)
    model.load_state_dict(sd, strict=False, assign=True)
    cos, sin = rope_cache(args, args.max_seq_len)
    model.rope_cos, model.rope_sin = cos, sin
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ActTailError(f"{ckpt.path}: the runtime found no weights for {', '.join(missing[:3])}")
    model.sparsifier = Sparsifier.dense()
    return model.to(device).eval().requires_grad_(False)
