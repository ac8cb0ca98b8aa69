"""The block's ops on the Triton kernels, for decode steps: one new token per sequence, B <= 8, a static KV
cache, fp16/bf16 weights stored input-major (``decoder.input_major``). Anything else (prefill, and the
positions of a longer input) runs the reference ``TorchOps`` on the same weights, dense.

Per projection group the step takes the group's ``Launch`` (launch.py: the plan's thresholds, biases and
the dispatch rule) where it runs sparse, else cuBLAS on the same input-major weights. Where a qkv or
gate/up group runs sparse on thresholds (and biases) alone with one token, the block's residual add and
RMSNorm run inside its launch (``fuse``). Attention is one Triton launch with RoPE and the cache write in
front (one sequence; several run torch's attention), its positions split over programs and merged
deterministically (flash-decoding); ``attention="sdpa"`` runs torch's for one sequence too.

Gemma's (1 + weight) norms are folded into plain RMSNorm weights once (``self.norms``); the extra norms
(after attention and the MLP, q/k per head) are the same add_rmsnorm kernel without a residual, the gate/up
kernel takes GeGLU as a constexpr, and decode attention takes the score scale, the soft-cap and the sliding
window (it reads only the window's part of the cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acttail.kernels import MAX_BATCH, new_locks
from acttail.kernels.decode_ops import add_rmsnorm, decode_attention, rope_attention, rope_cache_write, silu_mul

from ..layout import GROUPS
from .launch import Launch
from .ops import ACTIVATIONS, TorchOps


class KernelOps(TorchOps):
    """``launches`` {(layer, group): Launch} (a group absent runs dense); ``norms`` {RMSNorm module: its
    folded weight}. ``observer(layer, kinds, x)`` sees every group's input (then nothing is fused)."""

    def __init__(self, model: nn.Module, launches: dict | None = None, fuse: bool = True, attention: str = "kernel",
                 attn_splits: int | None = None):
        super().__init__()
        self.launches = dict(launches or {})
        self.fuse, self.attention_impl, self.attn_splits = fuse, attention, attn_splits
        self.observer = None
        self.norms = {m: (m.weight.detach().float() + m.offset).to(m.weight.dtype).contiguous()
                      for m in model.modules() if hasattr(m, "offset") and hasattr(m, "eps")}
        self.locks = new_locks(model.output.weight.device, model.args.n_local_heads + 3)  # attention's counters

    def sparse_groups(self, batch: int = 1) -> int:
        """How many groups run the sparse kernel at this batch size."""
        return sum(launch.runs_sparse(batch) for launch in self.launches.values())

    # ---- projections -------------------------------------------------------------------------------

    def linear(self, layer, group, x, linear, sizes=None):
        if not _decode(x):
            return super().linear(layer, group, x, linear, sizes)
        B = x.shape[0]
        return self._project(layer, group, x.view(B, -1), linear, None).view(B, 1, -1)

    def norm_linear(self, layer, group, x, residual, norm, linear, sizes=None, act=None):
        if not _decode(x):
            return super().norm_linear(layer, group, x, residual, norm, linear, sizes, act)
        B = x.shape[0]
        x2, r2 = x.view(B, -1), None if residual is None else residual.view(B, -1)
        launch = self._launch(layer, group, B)
        if launch is not None and self.fuse and B == 1 and launch.fuses_norm and self.observer is None:
            out = None if r2 is None else torch.empty_like(x2)
            y = launch(x2, norm=(self.norms[norm], norm.eps), residual=r2, residual_out=out)
            return y.view(B, 1, -1), (x2 if out is None else out).view(B, 1, -1)
        h = add_rmsnorm(x2, r2, self.norms[norm], norm.eps)  # x2 += r2 in place: the residual stream
        return self._project(layer, group, h, linear, act).view(B, 1, -1), x2.view(B, 1, -1)

    def _launch(self, layer: int, group: str, batch: int) -> Launch | None:
        launch = self.launches.get((layer, group))
        return launch if launch is not None and launch.runs_sparse(batch) else None

    def _project(self, layer, group, x2: Tensor, linear: nn.Linear, act: str | None) -> Tensor:
        """The group's output for x2 [B, in]: its sparse launch, else cuBLAS on the input-major weights."""
        if self.observer is not None:
            self.observer(layer, GROUPS[group], x2)
        launch = self._launch(layer, group, x2.shape[0])
        if launch is not None:
            return launch(x2)
        y = F.linear(x2, linear.weight, linear.bias)
        if act == "silu":  # silu(gate) * up in one launch
            return silu_mul(y, y.shape[-1] // 2)
        if act is not None:
            gate, up = y.chunk(2, dim=-1)
            return ACTIVATIONS[act](gate) * up
        return y

    # ---- norms and attention -----------------------------------------------------------------------

    def norm(self, norm, x):
        if norm is None or not _decode(x):
            return super().norm(norm, x)
        B = x.shape[0]
        return add_rmsnorm(x.reshape(B, -1), None, self.norms[norm], norm.eps).view(B, 1, -1)

    def add_norm(self, norm, x, residual):
        if not _decode(x):
            return super().add_norm(norm, x, residual)
        B = x.shape[0]
        r2 = None if residual is None else residual.view(B, -1)
        return add_rmsnorm(x.view(B, -1), r2, self.norms[norm], norm.eps).view(B, 1, -1)

    def attention(self, attn, qkv, rope, input_pos):
        if not _decode(qkv) or qkv.shape[0] != 1 or attn.kv_cache is None or self.attention_impl != "kernel":
            return super().attention(attn, qkv, rope, input_pos)
        qkv2 = qkv.view(1, -1)
        if attn.q_norm is not None:  # Gemma 3: every q and k head normalised before the rotation
            nq, nk, _ = attn.sizes
            q, k = qkv2[0, :nq].view(attn.n_head, -1), qkv2[0, nq:nq + nk].view(attn.n_kv, -1)
            q.copy_(add_rmsnorm(q, None, self.norms[attn.q_norm], attn.q_norm.eps))
            k.copy_(add_rmsnorm(k, None, self.norms[attn.k_norm], attn.k_norm.eps))
        cos, sin = rope
        kc, vc = attn.kv_cache.k[0], attn.kv_cache.v[0]
        shape = dict(scale=attn.scale, softcap=attn.softcap, window=attn.window, splits=self.attn_splits,
                     locks=self.locks)
        if self.fuse:
            y = rope_attention(qkv2, cos, sin, input_pos, kc, vc, attn.n_head, attn.n_kv, attn.head_dim, **shape)
        else:
            q = rope_cache_write(qkv2, cos, sin, input_pos, kc, vc, attn.n_head, attn.n_kv, attn.head_dim)
            y = decode_attention(q, kc, vc, input_pos, **shape)
        return y.view(1, 1, -1)


def _decode(x: Tensor) -> bool:
    """One new token for each of at most MAX_BATCH sequences: the shape the kernels serve."""
    return x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_BATCH
