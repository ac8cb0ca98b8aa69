"""GPU decode path: a compact decoder whose projections run the sparse Triton kernels, built from the same
``ModelArgs`` as the CPU reference (Llama, Mistral, Qwen2, Gemma 1/2/3, Phi-3).

Same weights and thresholds as the CPU reference (``acttail.runtime.model``), kept input-major (W.T
contiguous) in fp16/bf16 so a skipped activation skips a contiguous weight row. Prefill runs dense matmuls;
each decode step is one token, static KV cache, and can be captured once in a CUDA graph and replayed
(the next token and the position are updated on the device, no host round trip per token).

Per projection group (qkv, o, gate/up, down) the step uses the sparse kernel when any of its projections
has a threshold (or a top-k keep count), else dense cuBLAS on the same input-major weights. Where a qkv or
gate/up group runs sparse, the block's residual add and RMSNorm run inside its launch (``fuse``). Attention
is one Triton launch over the filled part of the cache with RoPE and the cache write fused in front, its
positions split over programs and merged deterministically (flash-decoding; ``attention = "sdpa"``
switches back to torch's), and on Hopper every Triton launch uses programmatic dependent launch.

Gemma's options run here too: the (1 + weight) norms are folded into plain RMSNorm weights, the extra
norms (after attention and the MLP, q/k per head) are the same add_rmsnorm kernel without a residual, the
gate/up kernel takes GeGLU as a constexpr, and decode attention takes the score scale, the soft-cap and
the sliding window (it reads only the window's part of the cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from acttail.kernels import new_locks, sparse_glu, sparse_linear, topk_thresholds, use_sparse
from acttail.kernels.decode_ops import add_rmsnorm, decode_attention, rope_attention, rope_cache_write, silu_mul

from ..errors import ActTailError
from ..layout import GROUPS
from .model import ACTIVATIONS, ModelArgs, RMSNorm, attention, attention_mask, rope_cache
from .sparsify import compensation_term, settings

WEIGHT = {"qkv": "wqkv", "o": "wo", "gate_up": "w13", "down": "w2"}
NORMS = ("attention_norm", "ffn_norm", "post_attention_norm", "post_ffn_norm")  # those the block has
QK_NORMS = ("q_norm", "k_norm")


class CudaDecoder:
    """Weights per layer: wqkv [dim, q+k+v], wo [q, dim], w13 [dim, 2*inter] = [gate | up], w2 [inter, dim];
    norm weights (attention_norm, ffn_norm; post_attention_norm, post_ffn_norm, q_norm, k_norm where the
    model has them) with any (1 + weight) offset folded in."""

    def __init__(self, args: ModelArgs, weights: dict, max_seq: int):
        self.args, self.w, self.max_seq = args, weights, max_seq
        dev, dtype = weights["tok_embeddings"].device, weights["tok_embeddings"].dtype
        self.device, self.dtype = dev, dtype
        self.cos, self.sin = (r.float().contiguous().to(dev) for r in rope_cache(args, max_seq))
        if args.local_rope_base is not None:  # Gemma 3's sliding layers
            self.cos_local, self.sin_local = (r.float().contiguous().to(dev) for r in rope_cache(args, max_seq, True))
        self.embed_scale = None if args.embed_scale is None else torch.tensor(args.embed_scale).to(dtype).to(dev)
        shape = (args.n_layer, args.n_local_heads, max_seq, args.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=dev)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=dev)
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)  # static decode inputs (graph replay)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.generated = torch.zeros(max_seq + 1, dtype=torch.long, device=dev)
        self.attention = "kernel"  # or "sdpa": torch's attention with a mask over the whole cache
        self.fuse = True  # residual add + RMSNorm into the sparse projections, RoPE into attention (False: apart)
        self.attn_splits = None  # programs per key/value head in decode attention (None: fill the SMs once)
        # its own ticket counters: decoders on other streams of the same GPU never share them
        self.locks = new_locks(dev, max(sum(args.qkv_sizes), 2 * args.intermediate_size, args.dim) // 16 + 3)
        self.set_sparsity()
        self.graph = None

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def random(cls, args: ModelArgs, dtype=torch.float16, device="cuda", max_seq=512, seed=0):
        """Random weights of the model's shapes made on the device (speed does not depend on the values)."""
        g = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, scale):
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

        d, q, inter = args.dim, args.n_head * args.head_dim, args.intermediate_size
        w = {"tok_embeddings": rnd(args.vocab_size, d, scale=1.0),
             "norm": torch.ones(d, dtype=dtype, device=device),
             "output": rnd(args.vocab_size, d, scale=d ** -0.5)}
        for i in range(args.n_layer):
            w[f"{i}.wqkv"] = rnd(d, sum(args.qkv_sizes), scale=d ** -0.5)
            w[f"{i}.wo"] = rnd(q, d, scale=q ** -0.5)
            w[f"{i}.w13"] = rnd(d, 2 * inter, scale=d ** -0.5)
            w[f"{i}.w2"] = rnd(inter, d, scale=inter ** -0.5)
            for norm in NORMS if args.sandwich_norm else NORMS[:2]:
                w[f"{i}.{norm}"] = torch.ones(d, dtype=dtype, device=device)
            for norm in QK_NORMS if args.qk_norm else ():
                w[f"{i}.{norm}"] = torch.ones(args.head_dim, dtype=dtype, device=device)
        return cls(args, w, max_seq)

    @classmethod
    def from_model(cls, model, dtype=torch.float16, device="cuda", max_seq=None):
        """The CPU reference ``Transformer``'s weights, input-major, in dtype on device (with Qwen2's qkv bias)."""
        cv = lambda t: t.detach().to(device=device, dtype=dtype).contiguous()  # noqa: E731
        norm = lambda m: cv(m.weight.detach().float() + m.offset)  # noqa: E731  (offset + weight), rounded once
        w = {"tok_embeddings": cv(model.tok_embeddings.weight), "norm": norm(model.norm),
             "output": cv(model.output.weight)}
        for i, blk in enumerate(model.layers):
            w[f"{i}.wqkv"] = cv(blk.attention.wqkv.weight.t())
            if blk.attention.wqkv.bias is not None:  # Qwen2
                w[f"{i}.bqkv"] = cv(blk.attention.wqkv.bias)
            w[f"{i}.wo"] = cv(blk.attention.wo.weight.t())
            w[f"{i}.w13"] = cv(blk.feed_forward.w13.weight.t())
            w[f"{i}.w2"] = cv(blk.feed_forward.w2.weight.t())
            modules = {**{n: getattr(blk, n) for n in NORMS}, "q_norm": blk.attention.q_norm,
                       "k_norm": blk.attention.k_norm}
            w.update({f"{i}.{n}": norm(m) for n, m in modules.items() if isinstance(m, RMSNorm)})
        return cls(model.args, w, max_seq or model.args.max_seq_len)

    def set_sparsity(self, thresholds: dict | None = None, keeps: dict | None = None, planned: dict | None = None,
                     compensation: dict | None = None):
        """thresholds: {(layer, kind): t} (threshold mode) or keeps: {(layer, kind): n} (top-k mode).

        A group with no entry stays dense; a missing member of a sparse group keeps every row. With planned
        sparsities {(layer, kind): s}, a group whose mean planned sparsity is too low for the sparse kernel to
        pay (``use_sparse``) runs dense. ``compensation`` {(layer, kind): ProjectionSparsity} brings learned
        output biases and low-rank factors, applied where the group runs sparse (as the reference applies them
        on sparsified positions). Biases alone run in the sparse kernel's epilogue (one fp32 vector per group,
        read once per column); low-rank terms run beside it."""
        self.t, self.keeps, self.comp, self.bias = {}, {}, {}, {}
        for i in range(self.args.n_layer):
            for g, kinds in GROUPS.items():
                if planned is not None:
                    s = sum(planned.get((i, k), 0.0) for k in kinds) / len(kinds)
                    w = self.w[f"{i}.{WEIGHT[g]}"]
                    if not use_sparse(s, 1, w.numel() * w.element_size()):
                        continue
                if thresholds and any((i, k) in thresholds for k in kinds):
                    vals = [thresholds.get((i, k)) for k in kinds]
                    self.t[i, g] = torch.tensor([-1.0 if v is None else float(v) for v in vals],
                                                dtype=torch.float32, device=self.device)
                if keeps and any((i, k) in keeps for k in kinds):
                    self.keeps[i, g] = [int(keeps.get((i, k), 1 << 30)) for k in kinds]
                parts = [(compensation or {}).get((i, k)) for k in kinds]
                if ((i, g) in self.t or (i, g) in self.keeps) and any(c is not None and c.compensated for c in parts):
                    comp = [self._on_device(c) for c in parts]
                    if any(lowrank is not None for _, lowrank in comp):
                        self.comp[i, g] = comp
                    else:  # biases only: the kernel adds them in its epilogue
                        self.bias[i, g] = torch.cat([b if b is not None else torch.zeros(
                            self.args.out_features(k), device=self.device) for (b, _), k in zip(comp, kinds)])
        self.graph = None

    def _on_device(self, c):
        """(bias, (U, V)) of one projection, fp32 on the device (None where it has none)."""
        if c is None:
            return None, None
        bias = c.bias.to(self.device, torch.float32) if c.bias is not None else None
        lowrank = tuple(t.to(self.device, torch.float32) for t in c.lowrank) if c.lowrank is not None else None
        return bias, lowrank

    def set_plan(self, plan, mode: str = "threshold"):
        """Sparsity from an acttail ``Plan`` through the runtime settings every backend shares
        (``sparsify.settings``: thresholds, or keep counts round((1 - s) * in) in topk mode); a group whose
        planned sparsity the kernel cannot pay for runs dense (``use_sparse``)."""
        sets = settings(plan, mode)
        if any(s.score is not None for s in sets.values()):
            raise ActTailError(f"the kernel backend ranks inputs by |x|: a plan with {plan.score} score weights runs "
                               "on the reference backend (--backend reference)")
        self.set_sparsity(thresholds={k: s.threshold for k, s in sets.items() if s.threshold is not None},
                          keeps={k: s.keep for k, s in sets.items() if s.keep is not None},
                          planned=plan.sparsities(), compensation=sets)

    # ---- one decode step ---------------------------------------------------------------------------

    def _project(self, i, group, x, w, record, **fused):
        """The projection group on x: the sparse kernel where it has thresholds (or keep counts), else cuBLAS.
        ``fused``: the kernel's norm / residual arguments (``_norm_project``: thresholds alone, no low-rank)."""
        if record is not None:
            record(i, group, x)
        if (i, group) in self.keeps:
            t = topk_thresholds(x, self.keeps[i, group])
        else:
            t = self.t.get((i, group))
        if t is None:  # dense cuBLAS on the same input-major weights
            y = x @ w
            if group == "gate_up" and self.args.activation == "silu":  # silu(gate) * up in one launch
                return silu_mul(y, self.args.intermediate_size)
            if group == "gate_up":
                g, u = y.split(self.args.intermediate_size, dim=-1)
                return ACTIVATIONS[self.args.activation](g) * u
            return y
        comp, bias = self.comp.get((i, group)), self.bias.get((i, group))
        if group == "gate_up" and comp is None:
            return sparse_glu(x, w, t, act=self.args.activation, bias=bias, locks=self.locks, **fused)
        splits = {"qkv": self.args.qkv_sizes, "gate_up": (self.args.intermediate_size,) * 2}.get(group)
        y = sparse_linear(x, w, t, splits=splits, bias=bias, locks=self.locks, **fused)
        if comp is not None:
            y = self._compensate(x, y, t, comp, splits or (y.shape[-1],))  # fp32
        if group == "gate_up":  # act(gate) * up in fp32, rounded once, as the fused kernel does
            g, u = y.float().split(self.args.intermediate_size, dim=-1)
            return (ACTIVATIONS[self.args.activation](g) * u).to(x.dtype)
        return y.to(x.dtype)

    def _compensate(self, x, y, t, comp, splits):
        """y plus each projection's learned bias and low-rank term U (V x_dropped), x_dropped the inputs its
        threshold (t [P], or per token [P, B]) zeroed; in fp32 (the caller rounds once)."""
        outs, col = [], 0
        for p, ((bias, lowrank), width) in enumerate(zip(comp, splits)):
            outs.append(y[:, col:col + width].float() + compensation_term(x, t[p], bias, lowrank))
            col += width
        return torch.cat(outs, dim=-1)

    def _embed(self, tokens):
        x = self.w["tok_embeddings"][tokens]
        return x if self.embed_scale is None else x * self.embed_scale

    def _rope(self, i):
        """cos, sin tables of layer i (Gemma 3's sliding layers have their own)."""
        return (self.cos_local, self.sin_local) if self.args.local_rope(i) else (self.cos, self.sin)

    def _post(self, i, name, y):
        """Gemma 2/3: what attention or the MLP adds to the residual stream is normalised first."""
        return add_rmsnorm(y, None, self.w[f"{i}.{name}"], self.args.norm_eps) if self.args.sandwich_norm else y

    def _head_norm(self, i, name, t):
        """Gemma 3's RMSNorm of every q or k head, t [rows, head_dim] contiguous."""
        return add_rmsnorm(t, None, self.w[f"{i}.{name}"], self.args.norm_eps)

    def _logits(self, h):
        y = F.linear(h, self.w["output"])
        cap = self.args.final_softcap
        return y if cap is None else (torch.tanh(y.float() / cap) * cap).to(y.dtype)

    def _attend(self, i, qkv, pos):
        """One token's attention in layer i: RoPE of q and k, the new key and value into the cache, attention
        over the cache; [1, n_head * D]. One launch (``rope_attention``) unless fusion is off or attention
        is torch's."""
        d = self.args
        kc, vc = self.k_cache[i], self.v_cache[i]
        cos, sin = self._rope(i)
        bias = self.w.get(f"{i}.bqkv")
        if self.fuse and self.attention == "kernel":
            return rope_attention(qkv, cos, sin, pos, kc, vc, d.n_head, d.n_local_heads, d.head_dim, bias=bias,
                                  scale=d.attn_scale, softcap=d.attn_softcap, window=d.window(i),
                                  splits=self.attn_splits, locks=self.locks)
        q = rope_cache_write(qkv, cos, sin, pos, kc, vc, d.n_head, d.n_local_heads, d.head_dim, bias=bias)
        if self.attention == "sdpa":
            mask = attention_mask(pos, self.max_seq, d.window(i))
            return attention(q[None, :, None], kc[None], vc[None], mask, d.attn_scale, d.attn_softcap).reshape(1, -1)
        return decode_attention(q, kc, vc, pos, scale=d.attn_scale, softcap=d.attn_softcap, window=d.window(i),
                                splits=self.attn_splits, locks=self.locks)

    def _norm_project(self, i, group, x, r, norm, record):
        """The block's residual add (x + r) and RMSNorm, then the projection group: (output, residual stream).

        One launch where the group runs the sparse kernel on thresholds (and biases) alone: the kernel
        normalises in front and writes x + r (``sparse_linear``'s norm=); else ``add_rmsnorm`` (x += r in
        place) and the projection. Recording inputs, top-k and low-rank terms need the normalised input."""
        key, nw, wt = (i, group), self.w[f"{i}.{norm}"], self.w[f"{i}.{WEIGHT[group]}"]
        fused = self.fuse and record is None and key in self.t and key not in self.keeps and key not in self.comp
        if not fused:
            h = add_rmsnorm(x, r, nw, self.args.norm_eps)
            return self._project(i, group, h, wt, record), x
        xo = None if r is None else torch.empty_like(x)
        y = self._project(i, group, x, wt, None, norm=(nw, self.args.norm_eps), residual=r, residual_out=xo)
        return y, x if xo is None else xo

    def forward_token(self, tok, pos, record=None):
        """Logits [1, vocab] for one token at position pos (both [1] device tensors); updates the cache."""
        d, w = self.args, self.w
        x = self._embed(tok)  # [1, dim]: the residual stream
        r = None
        for i in range(d.n_layer):
            qkv, x = self._norm_project(i, "qkv", x, r, "attention_norm", record)
            if d.qk_norm:
                nq, nk, _ = d.qkv_sizes
                q, k = qkv[0, :nq].view(d.n_head, d.head_dim), qkv[0, nq:nq + nk].view(d.n_local_heads, d.head_dim)
                q.copy_(self._head_norm(i, "q_norm", q))
                k.copy_(self._head_norm(i, "k_norm", k))
            a = self._attend(i, qkv, pos)
            o = self._project(i, "o", a, w[f"{i}.wo"], record)
            hg, x = self._norm_project(i, "gate_up", x, self._post(i, "post_attention_norm", o), "ffn_norm", record)
            r = self._post(i, "post_ffn_norm", self._project(i, "down", hg, w[f"{i}.w2"], record))
        h = add_rmsnorm(x, r, w["norm"], d.norm_eps)
        return self._logits(h)

    def _step(self):
        logits = self.forward_token(self.tok, self.pos)
        nxt = logits.argmax(-1)
        self.tok.copy_(nxt)
        self.generated.index_copy_(0, self.pos + 1, nxt)
        self.pos.add_(1)

    # ---- prefill and generation --------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Dense prefill of a prompt [T] from position 0: fills the caches, returns the last logits [1, V]."""
        d, w = self.args, self.w
        T, D = tokens.shape[0], d.head_dim
        x = self._embed(tokens)  # [T, dim]

        def rope(t, cos, sin):  # [H, T, D]
            cos, sin = cos[:T].to(self.dtype).float(), sin[:T].to(self.dtype).float()
            t1, t2 = t.chunk(2, dim=-1)
            return (t.float() * cos + torch.cat([-t2, t1], -1).float() * sin).to(t.dtype)

        r = None
        for i in range(d.n_layer):
            h = add_rmsnorm(x, r, w[f"{i}.attention_norm"], d.norm_eps)
            qkv = h @ w[f"{i}.wqkv"]
            if f"{i}.bqkv" in w:
                qkv = (qkv.float() + w[f"{i}.bqkv"].float()).to(qkv.dtype)
            q, k, v = qkv.split(d.qkv_sizes, dim=-1)
            if d.qk_norm:
                q = self._head_norm(i, "q_norm", q.reshape(-1, D).contiguous())
                k = self._head_norm(i, "k_norm", k.reshape(-1, D).contiguous())
            q = rope(q.reshape(T, d.n_head, D).transpose(0, 1), *self._rope(i))
            k = rope(k.reshape(T, d.n_local_heads, D).transpose(0, 1), *self._rope(i))
            v = v.view(T, d.n_local_heads, D).transpose(0, 1)
            self.k_cache[i, :, :T] = k
            self.v_cache[i, :, :T] = v
            window = d.window(i)
            mask = None if window is None or T <= window else \
                attention_mask(torch.arange(T, device=self.device), T, window)
            a = attention(q[None], k[None], v[None], mask, d.attn_scale, d.attn_softcap)
            o = a[0].transpose(0, 1).reshape(T, -1) @ w[f"{i}.wo"]
            h = add_rmsnorm(x, self._post(i, "post_attention_norm", o), w[f"{i}.ffn_norm"], d.norm_eps)
            g, u = (h @ w[f"{i}.w13"]).split(d.intermediate_size, dim=-1)
            r = self._post(i, "post_ffn_norm", (ACTIVATIONS[d.activation](g) * u) @ w[f"{i}.w2"])
        h = add_rmsnorm(x, r, w["norm"], d.norm_eps)
        logits = self._logits(h[-1:])
        self.tok.copy_(logits.argmax(-1))
        self.pos.fill_(T)
        self.generated[T] = self.tok[0]
        return logits

    def capture(self):
        """Capture one decode step in a CUDA graph (warm-up first, outside capture)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        saved = (self.tok.clone(), self.pos.clone(), self.k_cache.clone(), self.v_cache.clone())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._step()
        self.tok.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.k_cache.copy_(saved[2])
        self.v_cache.copy_(saved[3])

    @torch.no_grad()
    def decode(self, n: int, use_graph: bool = True) -> None:
        """n greedy decode steps after a prefill; tokens land in self.generated."""
        if use_graph and self.graph is None:
            self.capture()
        for _ in range(n):
            if use_graph:
                self.graph.replay()
            else:
                self._step()

    def generate(self, prompt: torch.Tensor, n: int, use_graph: bool = True) -> list[int]:
        """Greedy: prompt [T] tokens -> the n tokens that follow."""
        if prompt.shape[0] + n > self.max_seq:
            raise ValueError(f"{prompt.shape[0]} + {n} tokens exceed the cache of {self.max_seq}")
        self.prefill(prompt.to(self.device))
        self.decode(n - 1, use_graph)
        T = prompt.shape[0]
        return self.generated[T:T + n].tolist()
