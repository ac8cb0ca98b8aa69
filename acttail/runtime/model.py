"""A decoder in plain torch after gpt-fast's model.py: one block definition for Llama, Mistral, Qwen2, Gemma,
Gemma 2, Gemma 3 (text) and Phi-3, the options they differ by in ``ModelArgs`` (args.py).

The block computes its projections, norms and attention through an ops object (``ops.py``): ``TorchOps``
is the reference (projections through a ``Sparsifier``, sparsify.py, that zeroes what the plan says, counts
it and lets calibration watch every input), ``KernelOps`` runs decode steps through the Triton kernels. As
in vLLM, a block returns its output and the residual stream separately and the add happens in the next
norm, so the kernel ops can fuse residual add + RMSNorm + projection into one launch. Projections that share
an input stay grouped (``Attention.wqkv``, ``FeedForward.w13``) so a fused kernel can take the group at once.

Weights come from ``acttail.checkpoint.Checkpoint`` (``load_model``), one block at a time when streamed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import decoder_prefix
from ..errors import ActTailError
from ..layout import HF_FUSED_MODULES, HF_MODULES
from .args import ModelArgs
from .ops import TorchOps
from .sparsify import Sparsifier


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
    """Grouped-query attention of one layer: q/k/v from one weight [q+k+v, dim] (``wqkv``), the output
    projection ``wo``; ``forward`` is the attention between them (the ops decide how it runs)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.sizes = args.qkv_sizes
        self.scale, self.softcap, self.window = args.attn_scale, args.attn_softcap, args.window(layer)
        self.wqkv = nn.Linear(args.dim, sum(self.sizes), bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset) if args.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(self, qkv: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor | None) -> Tensor:
        """[B, T, n_head * head_dim] from qkv [B, T, q+k+v]; ``rope`` the full cos/sin tables, read at
        input_pos (None: positions 0..T-1 of one whole window, no cache)."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = q.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # Gemma 3: every head normalised before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t[:T] if input_pos is None else t[input_pos] for t in rope)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # as transformers rounds them (a no-op in float32)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is None:  # one whole window from position 0
            mask = None if self.window is None or T <= self.window else \
                attention_mask(torch.arange(T, device=qkv.device), T, self.window)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            mask = attention_mask(input_pos, k.shape[2], self.window)  # [T, max_seq_len]
        y = attention(q, k, v, mask, self.scale, self.softcap)
        return y.transpose(1, 2).reshape(B, T, -1)


class FeedForward(nn.Module):
    """The gated MLP: gate and up from one weight [2 * inter, dim] (``w13``), act(gate) * up, then ``w2``."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.inter = args.intermediate_size
        self.activation = args.activation
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args, layer)
        norm = partial(RMSNorm, args.dim, args.norm_eps, args.norm_offset)
        self.attention_norm = norm()
        self.ffn_norm = norm()
        # Gemma 2/3 also normalise what attention and the MLP add to the residual stream
        self.post_attention_norm = norm() if args.sandwich_norm else None
        self.post_ffn_norm = norm() if args.sandwich_norm else None
        # a rotated checkpoint (acttail.rotation): the stream into this layer changes to its basis first
        self.basis = nn.Linear(args.dim, args.dim, bias=False) if args.rotated and layer > 0 else None

    def forward(self, x: Tensor, residual: Tensor | None, rope, input_pos: Tensor | None,
                ops: TorchOps) -> tuple[Tensor, Tensor]:
        """(what the block adds, the residual stream it was added to): the stream after the block is their
        sum, formed by the next norm (the first block gets the embeddings as x and no residual)."""
        att, ffn = self.attention, self.feed_forward
        qkv, residual = ops.norm_linear(att.layer, "qkv", x, residual, self.attention_norm, att.wqkv, att.sizes)
        y = ops.attention(att, qkv, rope, input_pos)
        o = ops.norm(self.post_attention_norm, ops.linear(att.layer, "o", y, att.wo))
        h, residual = ops.norm_linear(ffn.layer, "gate_up", o, residual, self.ffn_norm, ffn.w13,
                                      (ffn.inter, ffn.inter), act=ffn.activation)
        return ops.norm(self.post_ffn_norm, ops.linear(ffn.layer, "down", h, ffn.w2)), residual


class Transformer(nn.Module):
    """The decoder: embeddings, blocks, final norm, LM head. ``ops`` computes the blocks (the reference
    ``TorchOps`` by default); ``sparsified(sp)`` runs them with a ``Sparsifier`` for a while.

    ``tokenizer``, ``bos_id`` and ``fingerprint`` describe the checkpoint ``acttail.load`` opened (None for a
    model built otherwise)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.ops = TorchOps()
        self.tokenizer = self.bos_id = self.fingerprint = None
        self.set_rope()
        self.stream = None  # streamed from a checkpoint: layer -> its weights (see load_model)
        self._resident = None  # the streamed layer in memory now

    @property
    def sparsifier(self) -> Sparsifier:
        """The Sparsifier the reference ops project with now."""
        return self.ops.sparsifier

    @contextmanager
    def sparsified(self, sparsifier: Sparsifier):
        """Run the blocks with ``sparsifier`` inside the block, in this thread (others keep theirs: ``ops.using``);
        whatever was there before comes back after."""
        with self.ops.using(sparsifier):
            yield sparsifier

    def set_rope(self) -> None:
        """(Re)make the rope tables in float32 on the model's device: the global ones, and the sliding
        layers' when they have their own (kept float32 whatever the weights' dtype)."""
        dev = self.output.weight.device
        dev = None if dev.type == "meta" else dev
        tables = {"": rope_cache(self.args, self.args.max_seq_len)}
        if self.args.local_rope_base is not None:
            tables["_local"] = rope_cache(self.args, self.args.max_seq_len, local=True)
        for suffix, (cos, sin) in tables.items():
            self.register_buffer(f"rope_cos{suffix}", cos.to(dev), persistent=False)
            self.register_buffer(f"rope_sin{suffix}", sin.to(dev), persistent=False)

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

    def rope(self, layer: int) -> tuple[Tensor, Tensor]:
        """The cos, sin tables of a layer (Gemma 3's sliding layers have their own)."""
        if self.args.local_rope(layer):
            return self.rope_cos_local, self.rope_sin_local
        return self.rope_cos, self.rope_sin

    def blocks(self, x: Tensor, input_pos: Tensor | None = None,
               layers: range | None = None) -> tuple[Tensor, Tensor | None]:
        """(block output, residual) after ``layers`` (all by default) from the residual stream x [B, T, dim]."""
        T = x.shape[1]
        if input_pos is None and T > self.args.max_seq_len:
            raise ActTailError(f"{T} tokens exceed the model's maximum context of {self.args.max_seq_len}")
        self.ops.set_positions(input_pos if input_pos is not None else torch.arange(T, device=x.device))
        residual = None
        for i in layers if layers is not None else range(self.args.n_layer):
            block = self.block(i)
            if block.basis is not None:  # the stream, in the previous layer's basis, into this one's
                x, residual = block.basis(x if residual is None else x + residual), None
            x, residual = block(x, residual, self.rope(i), input_pos, self.ops)
        return x, residual

    def hidden(self, idx: Tensor | None, input_pos: Tensor | None = None, layers: range | None = None,
               h: Tensor | None = None) -> Tensor:
        """Residual stream after ``layers`` (all by default), from tokens ``idx`` or a given stream ``h``."""
        x, residual = self.blocks(self.embed(idx) if h is None else h, input_pos, layers)
        return x if residual is None else x + residual

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
        x, residual = self.blocks(self.embed(idx), input_pos)
        return self.logits(self.ops.add_norm(self.norm, x, residual))


# ---- loading ---------------------------------------------------------------------------------------

# Our norm -> the HF module it is loaded from (Gemma 2/3 have four norms per layer, the others two).
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
SANDWICH_NORMS = {"attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                  "ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm"}


def _layer_weights(get, names: set, args: ModelArgs, hf: str, ours: str) -> dict[str, Tensor]:
    """Our weights of one decoder layer from the HF tensors under ``hf`` (``model.layers.3``). Phi-3's
    fused qkv_proj and gate_up_proj are already in our layout."""
    m = {k: f"{hf}.{name}" for k, name in HF_MODULES.items()}
    qkv, gate_up = (f"{hf}.{HF_FUSED_MODULES[group]}" for group in ("qkv", "gate_up"))
    sd = {}
    if f"{qkv}.weight" in names:  # Phi-3
        sd[f"{ours}.attention.wqkv.weight"] = get(f"{qkv}.weight")
        sd[f"{ours}.feed_forward.w13.weight"] = get(f"{gate_up}.weight")
        if args.qkv_bias:
            sd[f"{ours}.attention.wqkv.bias"] = get(f"{qkv}.bias")
    else:
        sd[f"{ours}.attention.wqkv.weight"] = torch.cat([get(f"{m[k]}.weight") for k in "qkv"])
        sd[f"{ours}.feed_forward.w13.weight"] = torch.cat([get(f"{m['gate']}.weight"), get(f"{m['up']}.weight")])
        if args.qkv_bias:
            sd[f"{ours}.attention.wqkv.bias"] = torch.cat([get(f"{m[k]}.bias") for k in "qkv"])
    sd[f"{ours}.attention.wo.weight"] = get(f"{m['o']}.weight")
    sd[f"{ours}.feed_forward.w2.weight"] = get(f"{m['down']}.weight")
    for our_norm, hf_norm in (SANDWICH_NORMS if args.sandwich_norm else NORMS).items():
        sd[f"{ours}.{our_norm}.weight"] = get(f"{hf}.{hf_norm}.weight")
    if args.rotated and ours != "layers.0":
        sd[f"{ours}.basis.weight"] = get(f"{hf}.basis.weight")
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
    if head is None and not args.tie_embeddings:
        raise ActTailError(f"{ckpt.path}: config.json says tie_word_embeddings is false, but the weights hold no "
                           "lm_head.weight (transformers would start it at random)")
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
    if not stream:
        return model.to(device).eval().requires_grad_(False)
    blocks, model.layers = model.layers, nn.ModuleList()
    model.to(device).eval().requires_grad_(False)
    model.layers = blocks.eval()
    model.stream = lambda i: {k.removeprefix(f"layers.{i}."): t for k, t in layer(i).items()}
    return model
