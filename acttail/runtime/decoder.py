"""The fast path: a plan's decode steps through the Triton kernels, one CUDA-graph replay per token.

    fast = acttail.decoder(model, plan)                 # a transformers causal LM or ours; fp16/bf16 on a GPU
    ids = fast.generate(input_ids, max_new_tokens=128)  # greedy; do_sample / temperature / top_k / top_p too

A ``Decoder`` is our ``Transformer`` (the one block, ``model.py``) with its projection weights stored
input-major (``input_major``: [in, out] contiguous, the module's weight a transposed view of that storage,
so a skipped activation skips one contiguous row), ``KernelOps`` holding the plan's launches, a static KV
cache for ``batch`` sequences, and the decode step (forward, sampling, the position advanced on the
device) captured once in a CUDA graph per sampling setting. The prompt runs through the same block, dense,
padded to the next power of two (at least 16): up to ``PREFILL_GRAPH_MAX`` tokens that is one CUDA-graph
replay per length bucket (an eager prefill of a 7B model is ~1,500 host-bound launches); the padding
positions write the cache past the prompt, where each decode step writes its own position before reading it.

Built from a transformers model (``from_transformers``) it takes over that model's weights where the layout
allows: the embeddings, norms and LM head are the same tensors; o and down are transposed into new
storage, q/k/v and gate/up concatenated, and the transformers model's own weights are then re-pointed at
views of that storage (it runs as before, on the same bytes). Peak memory during the conversion: the
projection weights twice; after it, once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ActTailError
from ..layout import GROUPS, WEIGHT_FORMATS
from .args import ModelArgs
from .kernel_ops import KernelOps
from .launch import launch_for
from .model import Transformer
from .sparsify import MODE, check_plan, settings
from .tokens import check_ids

DTYPES = (torch.float16, torch.bfloat16)
PREFILL_GRAPH_MAX = 256  # prompts up to this many tokens prefill in a CUDA graph (one per batch, length bucket)


def input_major(model: Transformer) -> None:
    """Store every projection weight of ``model`` input-major, in place (the modules keep [out, in] views)."""
    for linear in _projections(model):
        w = linear.weight
        if not w.t().is_contiguous():
            w.data = w.data.t().contiguous().t()


def _projections(model: Transformer):
    for block in model.layers:
        yield from (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2)


def plan_launches(model: Transformer, sets: dict, planned: dict | None, config: dict | None = None,
                  weights: str | None = None) -> dict:
    """{(layer, group): Launch} of runtime settings ``sets`` (``sparsify.settings``) on our decoder's groups;
    ``planned`` {(layer, kind): sparsity} for the dispatch rule (None: every sparsified group runs sparse);
    ``config``: kernel launch settings over ``kernels.pick_config``'s; ``weights``: every group's launch reads
    a quantized copy of its weights (``layout.WEIGHT_FORMATS``; see ``launch.Launch``)."""
    out = {}
    for i, block in enumerate(model.layers):
        att, ffn = block.attention, block.feed_forward
        units = (("qkv", att.wqkv, att.sizes, None), ("o", att.wo, (att.wo.out_features,), None),
                 ("gate_up", ffn.w13, (ffn.inter, ffn.inter), ffn.activation), ("down", ffn.w2, (ffn.w2.out_features,), None))
        for group, linear, widths, act in units:
            launch = launch_for(i, GROUPS[group], linear.weight.t(), widths, sets, planned, linear.bias, act, config,
                                weights)
            if launch is not None:
                out[i, group] = launch
    return out


class Decoder:
    """Batch-``batch`` decoding of ``model`` (ours, fp16/bf16, on a CUDA device; on the CPU only under
    TRITON_INTERPRET=1, without graphs, for checking) with ``plan`` (None: dense) in ``mode``.

    ``weights`` "int8" (per output channel), "int4" (groups of ``kernels.INT4_GROUP`` input rows) or "q4_1"
    (GGUF Q4_1's grid): decode steps read quantized copies of the projection weights (made once here, a half
    or 0.26-0.31 of the fp16 bytes), dequantized in registers, sparse or dense; prefill and the LM head keep
    the model's weights, which stay in memory beside the copies."""

    def __init__(self, model: Transformer, plan=None, mode: str = MODE, batch: int = 1,
                 max_seq: int | None = None, weights: str | None = None):
        w = model.output.weight
        if w.dtype not in DTYPES:
            raise ActTailError(f"the kernel decoder runs float16 or bfloat16 weights, not {w.dtype}")
        if w.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ActTailError("the kernel decoder needs a CUDA GPU (on the CPU it runs only under TRITON_INTERPRET=1)")
        if plan is not None:
            check_plan(plan, model.args)  # before the weights are laid out for the kernels
        if weights is not None and weights not in WEIGHT_FORMATS:
            raise ActTailError(f"unknown weight format {weights!r} (choose from {', '.join(WEIGHT_FORMATS)})")
        self.model, self.device, self.dtype, self.weights = model, w.device, w.dtype, weights
        input_major(model)
        model.set_rope()  # float32 tables on the device
        self.ops = model.ops = KernelOps(model)
        self.graphs: dict = {}
        self.resize(batch, max_seq or min(model.args.max_seq_len, 4096))
        self.set_plan(plan, mode)

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def random(cls, args: ModelArgs, dtype=torch.float16, device="cuda", max_seq: int = 512, seed: int = 0,
               batch: int = 1, weights: str | None = None) -> "Decoder":
        """Random weights of the model's shapes, made on the device (speed does not depend on the values)."""
        with torch.device("meta"):
            model = Transformer(args)
        model.to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:  # norms: an effective scale of 1; biases 0
                    p.fill_(1.0 - args.norm_offset if name.endswith("norm.weight") else 0.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=device) * p.shape[-1] ** -0.5)
        return cls(model.to(dtype).eval().requires_grad_(False), batch=batch, max_seq=max_seq, weights=weights)

    @classmethod
    def from_model(cls, model: Transformer, dtype=torch.float16, device="cuda", **kwargs) -> "Decoder":
        """From our decoder (e.g. ``acttail.load``): a copy of its weights in ``dtype`` on ``device``."""
        import copy

        ours = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
        ours.ops = type(model.ops)()  # no sparsifier of the source
        return cls(ours, **kwargs)

    @classmethod
    def from_transformers(cls, hf_model: nn.Module, **kwargs) -> "Decoder":
        """From a transformers causal LM with fp16/bf16 weights on the GPU, sharing its weight storage."""
        from .hf import from_transformers, share_weights

        p = next(hf_model.parameters())
        model = from_transformers(hf_model, dtype=p.dtype)
        dec = cls(model, **kwargs)
        share_weights(hf_model, model)
        return dec

    def set_plan(self, plan, mode: str = MODE) -> None:
        """The plan's launches (``plan_launches``: settings, the dispatch rule); None: dense. A plan for
        another shape is refused (``sparsify.check_plan``)."""
        if plan is not None:
            check_plan(plan, self.model.args)
        sets = settings(plan, mode) if plan is not None else {}
        self.set_settings(sets, plan.sparsities() if plan is not None else None)

    def set_settings(self, sets: dict, planned: dict | None = None, config: dict | None = None) -> None:
        """Runtime settings {(layer, kind): ProjectionSparsity} directly (``planned``: for the dispatch rule;
        None: every sparsified group runs sparse; ``config``: kernel launch settings, see ``plan_launches``)."""
        self.ops.launches = plan_launches(self.model, sets, planned, config, self.weights)
        self.graphs.clear()

    def resize(self, batch: int, max_seq: int) -> None:
        """Static KV caches and step buffers for ``batch`` sequences of up to ``max_seq`` positions."""
        if not 1 <= batch <= 8:
            raise ActTailError(f"the kernel decoder decodes 1 to 8 sequences at once, not {batch}")
        self.model.setup_caches(batch, max_seq)
        self.batch, self.max_seq = batch, max_seq
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # the token each step reads
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(batch, max_seq + 1, dtype=torch.long, device=self.device)  # tokens by position
        self.graphs.clear()

    # ---- steps -------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """The prompts [B, T] through the model from position 0, dense, filling the caches; the logits of
        their last position [B, vocab]. Padded to ``prefill_length(T)`` (causal: the prompt's positions never
        see the padding), replayed from a CUDA graph on a GPU."""
        m = self.model
        ids = input_ids.to(self.device)
        B, T = ids.shape
        captured = self._prefill_graph(B, T)
        if captured is not None:
            graph, buf, (x, residual) = captured
            buf[:, :T].copy_(ids)
            buf[:, T:].zero_()
            graph.replay()
        else:
            x, residual = self._prefill_blocks(torch.nn.functional.pad(ids, (0, self.prefill_length(T) - T)))
        h = m.ops.add_norm(m.norm, x[:, T - 1:T].contiguous(),
                           None if residual is None else residual[:, T - 1:T].contiguous())
        self.out[:, :T] = ids
        self.pos.fill_(T)
        return m.logits(h)[:, -1]

    def prefill_length(self, T: int) -> int:
        """The length a T-token prompt is padded to: the next power of two, at least 16, at most max_seq
        (no padding past ``PREFILL_GRAPH_MAX``)."""
        n = max(16, 1 << (T - 1).bit_length())
        return n if n <= min(PREFILL_GRAPH_MAX, self.max_seq) else T

    def _prefill_graph(self, batch: int, T: int):
        """(graph, input buffer, outputs) that prefill a [batch, T] prompt, captured on first use; None off
        the GPU or for a prompt longer than ``PREFILL_GRAPH_MAX`` (it runs eagerly)."""
        n = self.prefill_length(T)
        if self.device.type != "cuda" or n > PREFILL_GRAPH_MAX:
            return None
        return self._graph(("prefill", batch, n))

    def _prefill_blocks(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        m = self.model
        return m.blocks(m.embed(ids), torch.arange(ids.shape[1], device=self.device))

    def _capture_prefill(self, batch: int, n: int):
        """(graph, its input buffer [batch, n], its outputs) of ``_prefill_blocks`` on n tokens."""
        buf = torch.zeros(batch, n, dtype=torch.long, device=self.device)
        graph = _capture(lambda: self._prefill_blocks(buf))
        with torch.cuda.graph(graph), torch.no_grad():
            outs = self._prefill_blocks(buf)
        return graph, buf, outs

    @torch.no_grad()
    def forward_token(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """Logits [B, vocab] of one token per sequence (tokens [B, 1]) at position pos ([1], on the device)."""
        return self.model(tokens, pos)[:, -1]

    def _step(self, sampler) -> None:
        """One decode step on the device: the next tokens from self.tokens at self.pos, written to
        self.tokens and self.out, the position advanced."""
        nxt = sampler(self.forward_token(self.tokens, self.pos))
        self.tokens.copy_(nxt.view(-1, 1))
        self.out.index_copy_(1, self.pos + 1, nxt.view(-1, 1))
        self.pos.add_(1)

    def capture(self, sampler) -> torch.cuda.CUDAGraph:
        """The decode step with ``sampler`` captured in a CUDA graph (two warm-up steps first, outside it;
        the caches and positions are put back after)."""
        saved = [t.clone() for t in (self.tokens, self.pos, self.out)]
        caches = [(b.attention.kv_cache.k.clone(), b.attention.kv_cache.v.clone()) for b in self.model.layers]
        graph = _capture(lambda: self._step(sampler))
        with torch.cuda.graph(graph), torch.no_grad():
            self._step(sampler)
        for t, old in zip((self.tokens, self.pos, self.out), saved):
            t.copy_(old)
        for b, (k, v) in zip(self.model.layers, caches):
            b.attention.kv_cache.k.copy_(k)
            b.attention.kv_cache.v.copy_(v)
        return graph

    def decode(self, n: int, sampler=None, use_graph: bool | None = None) -> None:
        """n decode steps after ``prefill`` (and the first sampled token in self.tokens); the tokens land in
        self.out. ``use_graph``: replay one CUDA graph per step (default on a GPU)."""
        sampler = sampler or greedy
        use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        graph = self._graph(sampler) if use_graph else None
        for _ in range(n):
            if graph is not None:
                graph.replay()
            else:
                with torch.no_grad():
                    self._step(sampler)


    # ---- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float = 1.0, eos_token_id=None, pad_token_id: int | None = None,
                 streamer=None, attention_mask=None) -> Tensor:
        """Prompts [B, T] (token ids; B <= 8, equal lengths) and their continuations [B, T + new], as
        transformers' ``generate`` returns them: greedy, or with ``do_sample`` drawn from softmax(logits /
        temperature) after top-k and top-p filtering (on the device, inside the graph; seeded by
        ``torch.manual_seed``). Rows that reach ``eos_token_id`` (an id or a list) continue with
        ``pad_token_id`` (default: the first EOS id); generation stops when every row has, or after
        ``max_new_tokens``. ``streamer`` (transformers' TextStreamer and the like, batch 1) gets the prompt,
        then the new tokens as they are made. ``self.timing`` records prefill, capture and decode seconds."""
        ids = _prompt(input_ids, attention_mask, self.model.args.vocab_size)
        B, T = ids.shape
        if max_new_tokens < 1:
            raise ActTailError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if streamer is not None and B != 1:
            raise ActTailError("a streamer takes one sequence (batch 1), as in transformers")
        if B != self.batch or T + max_new_tokens > self.max_seq:
            self.resize(B, max(self.max_seq, T + max_new_tokens))
        sampler = Sampler(float(temperature), top_k, float(top_p)) if do_sample else greedy
        eos = _ids(eos_token_id)
        on_gpu = self.device.type == "cuda"
        sync = torch.cuda.synchronize if on_gpu else (lambda: None)
        t0 = time.perf_counter()
        self._prefill_graph(B, T)  # captured on first use: counted as capture, not as prefill
        sync()
        tp = time.perf_counter()
        first = sampler(self.prefill(ids))
        self.tokens.copy_(first.view(-1, 1))
        self.out[:, T] = first
        if streamer is not None:
            streamer.put(ids.cpu())  # transformers' streamers take the prompt first (and may skip it)
        sync()
        t1 = time.perf_counter()
        graph = self._graph(sampler) if on_gpu else None
        sync()
        t2 = time.perf_counter()
        made, every = 1, 1 if streamer is not None else 8  # new tokens so far; steps between host reads
        if streamer is not None:
            streamer.put(first.cpu())
        while made < max_new_tokens and not (eos and _all_done(self.out[:, T:T + made], eos)):
            n = min(every, max_new_tokens - made)
            for _ in range(n):
                graph.replay() if graph is not None else self._step(sampler)
            if streamer is not None:
                streamer.put(self.out[0, T + made:T + made + n].cpu())
            made += n
        seq = self.out[:, :T + made].cpu()
        t3 = time.perf_counter()
        if streamer is not None:
            streamer.end()
        self.timing = {"prefill_s": t1 - tp, "capture_s": (tp - t0) + (t2 - t1), "decode_s": t3 - t2,
                       "new_tokens": made}
        return _after_eos(seq, T, eos, pad_token_id)

    def _graph(self, key):
        """The decode graph of sampler ``key``, or ("prefill", batch, length)'s graph, buffer and outputs:
        captured on first use, kept until the plan, batch or length changes."""
        if key not in self.graphs:
            self.graphs[key] = self._capture_prefill(*key[1:]) if isinstance(key, tuple) else self.capture(key)
        return self.graphs[key]


def _capture(warm_up) -> torch.cuda.CUDAGraph:
    """A new CUDA graph, after ``warm_up()`` twice on a side stream (as torch's CUDA-graph recipe asks)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            warm_up()
    torch.cuda.current_stream().wait_stream(s)
    return torch.cuda.CUDAGraph()


def greedy(logits: Tensor) -> Tensor:
    """The most likely next token of each row."""
    return logits.argmax(-1)


@dataclass(frozen=True)
class Sampler:
    """Draws the next token of each row from softmax(logits / temperature), after keeping the ``top_k``
    highest logits and the smallest set whose probability reaches ``top_p`` (transformers' order and rules),
    by the exponential race argmax(p / E), E ~ Exp(1): one draw from p, with no host round trip."""

    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or (self.top_k is not None and self.top_k < 1):
            raise ActTailError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 1 (got "
                               f"{self.temperature}, {self.top_p}, {self.top_k})")

    def __call__(self, logits: Tensor) -> Tensor:
        x = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            ranked, order = x.sort(dim=-1)
            drop = ranked.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False  # the most likely token always stays
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = x.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def _prompt(input_ids, attention_mask, vocab_size: int) -> Tensor:
    """The prompts as int64 [B, T], every id inside the vocabulary (``tokens.check_ids``)."""
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # ragged lists, None, ids past 64 bits
        raise ActTailError(f"input_ids must be integer token ids [batch, length], not this "
                           f"{type(input_ids).__name__}") from None
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ActTailError(f"input_ids must be integer token ids [batch, length], got {tuple(ids.shape)} {ids.dtype}")
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise ActTailError("padded prompts are not supported: give prompts of equal length (attention_mask all ones)")
    return check_ids(ids, vocab_size, "input_ids")


def _ids(eos) -> list[int]:
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _all_done(new: Tensor, eos: list[int]) -> bool:
    """Has every row produced an EOS among its new tokens (a host read)?"""
    return bool(torch.isin(new, torch.tensor(eos, device=new.device)).any(-1).all())


def _after_eos(seq: Tensor, T: int, eos: list[int], pad: int | None) -> Tensor:
    """seq with every token after a row's first EOS (among the new ones) set to ``pad``, cut after the step
    where the last row finished."""
    if not eos:
        return seq
    hit = torch.isin(seq[:, T:], torch.tensor(eos))
    after = (hit.cumsum(-1) - hit.long()) > 0  # strictly after the first EOS
    seq[:, T:] = seq[:, T:].masked_fill(after, eos[0] if pad is None else pad)
    if bool(hit.any(-1).all()):
        last = int(hit.float().argmax(-1).max())
        seq = seq[:, :T + last + 1]
    return seq
