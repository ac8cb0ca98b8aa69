"""Plans on stock transformers models: ``apply`` (sparsify their projections in place, removable) and
``from_transformers`` (our decoder built from their weights: calibration, the fast decoder).

``apply`` gives every q/k/v/o/gate/up/down ``nn.Linear`` of each decoder layer (Phi-3's fused ``qkv_proj`` /
``gate_up_proj`` too: each part gets its own sparsified copy of the input) a subclass of its class whose
forward reads the module's own state (``module._acttail``); ``remove()`` gives the class back. Inputs are
zeroed as the plan says and the projection runs as before: the reference path, on any device, every
position of a longer input sparsified. With the kernel backend (the default on CUDA for fp16/bf16 weights)
a decode step (one new token per sequence, batch <= 8) runs each projection group's ``Launch`` instead
(launch.py, the same mapping and dispatch rule as the GPU decoder): q/k/v in one launch (the q projection
computes all three, k and v take their columns), gate/up and act(gate) * up in one (the MLP's forward
takes them), o and down one each; a group the dispatch rule leaves dense runs the plain Linear. The
weights are stored input-major for the kernels, q/k/v and gate/up concatenated, with each module's weight
a view of that storage (same bytes, no second copy); a group the dispatch rule runs dense at every batch
size keeps its weights as they were.

Under torch.compile the patched model compiles with fullgraph=True and each launch is one opaque custom op,
``acttail::launch(x, key)`` (launch.py): no graph break at a projection, and inductor's CUDA graphs (mode
"reduce-overhead", what transformers' static-cache generation uses) capture the kernels as they are. What a
compiled forward reads of the plan is kept to constants (each module's ``_Spec``) so that dynamo's guards,
evaluated on every compiled call, stay few: transformers' compiled decode pays them on every token. The
zeros are counted only outside compiled graphs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ActTailError
from ..layout import GROUPS
from ..weights import decoder_layers, projection_modules
from .applied import Applied, applied
from .sparsify import MODE, Sparsifier, settings

MAX_BATCH = 8  # as acttail.kernels.MAX_BATCH (not imported: the reference path needs no triton)


def apply(model: nn.Module, plan, mode: str = MODE, backend: str | None = None) -> Applied:
    """Sparsify ``model``'s projections as ``plan`` says (threshold or topk mode); returns the handle.
    ``backend``: "kernels" (decode steps on the Triton kernels), "reference", or None: kernels where the
    weights are fp16/bf16 on CUDA and triton imports, and the plan has no score weights. A model holding a
    plan already is refused (by ``Applied``, before anything is patched)."""
    modules = projection_modules(model)
    _check_shapes(model, plan, modules)
    sets = settings(plan, mode)
    if backend not in (None, "kernels", "reference"):
        raise ActTailError(f"unknown backend {backend!r} (choose from kernels, reference)")
    if backend is None:
        backend = "kernels" if _kernels_serve(model, sets) else "reference"
    sp = Sparsifier(sets)
    undo: list = []
    patched: list = []  # every module's _Patched: handle.dense() sets their ``on`` for compiled graphs
    handle = Applied(model, sp, lambda: [u() for u in reversed(undo)], plan, mode,
                     compiled_switch=lambda on: [setattr(p, "on", on) for p in patched])
    units = _units(model, modules) if backend == "kernels" else {}
    if backend == "kernels":
        _build_launches(model, units, sets, plan.sparsities(), undo, handle, patched)
        handle.launches = {(u.layer, u.group): u.launch for u in units.values() if u.launch is not None}
        undo.append(lambda: [_PENDING.pop(launch.key, None) for launch in handle.launches.values()])
    for linear, parts in modules.items():
        if any(sets.get((layer, kind)) for kind, layer, _ in parts):
            unit = units.get(linear)
            patched.append(_Patched(handle, parts, unit.spec(linear) if unit is not None else None))
            _swap(linear, _linear_forward, patched[-1], undo)
    return handle


def _kernels_serve(model: nn.Module, sets: dict) -> bool:
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
        return False
    if any(s.score is not None for s in sets.values()):
        return False  # the kernels rank inputs by |x|: score-weighted plans run the reference path
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_shapes(model, plan, modules) -> None:
    """The plan must describe this model (``Plan.check_shapes``): its layer count, and each projection's (in,
    out) as its modules hold it."""
    shapes = {}
    for linear, parts in modules.items():
        for kind, layer, rows in parts:
            out = linear.out_features if rows == slice(None) else rows.stop - rows.start
            shapes[(layer, kind)] = (linear.in_features, out)
    plan.check_shapes(len(decoder_layers(model)), lambda layer, kind: shapes.get((layer, kind)))


_CLASSES: dict = {}  # (module class, forward) -> its patched subclass


def _swap(module: nn.Module, forward, state: "_Patched", undo: list) -> None:
    """Give ``module`` a subclass of its class whose forward is ``forward``, and ``state`` as ``_acttail``;
    undo puts both back. (A class-level forward reading one state object per module keeps torch.compile's
    guards few: a bound method stored on the instance, or a handle shared by every module's closure, costs
    an identity guard per module that runs in Python on every compiled call: ~1.3 ms a 7B token.)"""
    cls = type(module)
    sub = _CLASSES.get((cls, forward))
    if sub is None:
        sub = _CLASSES[(cls, forward)] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    state.original = cls.forward
    module.__class__ = sub
    module._acttail = state

    def restore():
        module.__class__ = cls
        module.__dict__.pop("_acttail", None)

    undo.append(restore)


class _Patched:
    """What the patched forward of one module reads (``module._acttail``): the handle (eager: is the plan on
    in this thread; the reference path), ``on`` (compiled graphs: no ``dense()`` block open), the module's
    projections ``parts``, and ``spec``, its place in the kernel path (None: no launch)."""

    def __init__(self, handle: Applied, parts=(), spec: "_Spec | None" = None):
        self.handle, self.parts, self.spec, self.on = handle, parts, spec, True
        self.original = None

    @property
    def enabled(self) -> bool:
        return self.on if torch.compiler.is_compiling() else self.handle.enabled


class _Spec(NamedTuple):
    """A patched module's place in its unit's launch, in constants alone (what dynamo guards of the kernel path:
    a few constant checks a module, no tensor or object of the launch): the launch's key (``launch.run``), the
    dispatch rule per batch size, whether this module launches (lead) and whether it is the last to take its
    columns [start, stop) of the output; ``act``: the launch returns act(gate) * up, for the MLP's forward
    only."""
    key: int
    sparse_at: tuple
    lead: bool
    last: bool
    start: int
    stop: int
    act: bool


_PENDING: dict = {}  # launch key -> (input, output) of a shared q/k/v launch, until its last module took its columns
_run = None  # launch.run, bound when a plan first builds launches (launch.py imports triton; the reference path does not)


def _columns(spec: _Spec, x: torch.Tensor) -> torch.Tensor | None:
    """This module's columns of its unit's launch on x; None where the launch needs another caller (an act
    pair, or a follower called without its leader). The leader launches; the others take their columns of
    its output when they get the same input tensor (one launch for q, k and v)."""
    if spec.act:
        return None
    if spec.lead:
        y = _run(spec.key, x.reshape(-1, x.shape[-1]))
        if spec.last:
            return y.reshape(*x.shape[:-1], -1)  # the whole output (o, down; Phi-3's fused qkv_proj)
        _PENDING[spec.key] = (x, y)
    else:
        pending = _PENDING.get(spec.key)
        if pending is None or pending[0] is not x:
            return None
        y = pending[1]
        if spec.last:
            del _PENDING[spec.key]
    return y[:, spec.start:spec.stop].reshape(*x.shape[:-1], -1)


# ---- the reference path, and the kernel path's dispatch ----------------------------------------------


def _linear_forward(self, x):
    """The forward of a patched Linear computing its ``_acttail.parts`` [(kind, layer, output rows)]."""
    st = self._acttail
    if not st.enabled:
        return F.linear(x, self.weight, self.bias)
    spec = st.spec
    if spec is not None and _is_decode(x):
        if not spec.sparse_at[_batch(x) - 1]:
            return F.linear(x, self.weight, self.bias)  # the dispatch rule: dense
        y = _columns(spec, x)
        if y is not None:
            return y
    sp = st.handle.sparsifier
    outs = [sp.project_one((layer, kind), x, sp.settings.get((layer, kind)), self.weight[rows],
                           None if self.bias is None else self.bias[rows]) for kind, layer, rows in st.parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _is_decode(x: torch.Tensor) -> bool:
    """One new token per sequence, 1 to MAX_BATCH sequences: the shape the kernels serve."""
    dims = x.dim()
    return dims >= 2 and (dims == 2 or x.shape[-2] == 1) and 1 <= _batch(x) <= MAX_BATCH


def _batch(x: torch.Tensor) -> int:
    """Rows of x: the product of its leading dimensions (the input of a Linear has a last dimension > 0)."""
    return x.numel() // x.shape[-1]


class _Unit:
    """One launch of the kernel path: the Linears of a group of one layer (q/k/v, o, gate/up, down) and
    their columns in its output. The first Linear of a shared launch computes every column and leaves the
    rest for the others, which take them when they get the same input tensor."""

    def __init__(self, layer: int, group: str, linears: list, widths: list[int]):
        self.layer, self.group, self.linears, self.widths = layer, group, linears, widths
        self.launch = None
        cols, start = {}, 0
        for linear in linears:
            n = linear.out_features
            cols[linear] = slice(start, start + n)
            start += n
        self.cols = cols

    def spec(self, linear: nn.Module | None) -> _Spec:
        """The spec of ``linear`` (None: the MLP taking the act pair) in this unit's launch; without a launch (the
        dispatch rule runs the group dense at every batch size), dense at every batch size."""
        launch = self.launch
        if launch is None:
            return _Spec(0, (False,) * MAX_BATCH, True, True, 0, 0, False)
        cols = self.cols.get(linear, slice(0, launch.out_features))
        return _Spec(launch.key, launch.sparse_at, linear is None or linear is self.linears[0],
                     linear is None or linear is self.linears[-1], cols.start, cols.stop, launch.act is not None)


def _units(model: nn.Module, modules: dict) -> dict[nn.Linear, _Unit]:
    """Linear -> its unit, per layer and group (layout.GROUPS), the Linears in the order of the group's kinds
    with each kind's output width."""
    found: dict = {}
    for linear, parts in modules.items():
        for kind, layer, rows in parts:
            group = next(g for g, kinds in GROUPS.items() if kind in kinds)
            width = linear.out_features if rows == slice(None) else rows.stop - rows.start
            found.setdefault((layer, group), {})[kind] = (linear, width)
    out = {}
    for (layer, group), by_kind in found.items():
        kinds = [k for k in GROUPS[group] if k in by_kind]
        linears = list(dict.fromkeys(by_kind[k][0] for k in kinds))
        unit = _Unit(layer, group, linears, [by_kind[k][1] for k in kinds])
        out.update({m: unit for m in linears})
    return out


# ---- the kernel path: weights input-major, one Launch per unit ------------------------------------------


def _build_launches(model: nn.Module, units: dict, sets: dict, planned: dict, undo: list, handle: Applied,
                    patched: list) -> None:
    """Store each unit's weights input-major (shared storage), build its Launch, and let the MLP take gate/up
    and their activation in one launch where its structure is known."""
    global _run
    from .launch import ever_sparse, launch_for, planned_sparsity, run

    _run = run

    act = _activation(model)
    for unit in dict.fromkeys(units.values()):
        kinds = GROUPS[unit.group]
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in unit.linears)
        if not ever_sparse(planned_sparsity(unit.layer, kinds, unit.widths, planned), nbytes):
            continue  # dense at every batch size: the module keeps its weights as they are (and runs as before)
        wt = _input_major(unit.linears, undo)
        mlp = _mlp(model, unit) if unit.group == "gate_up" and act is not None else None
        unit.launch = launch_for(unit.layer, kinds, wt, unit.widths, sets, planned,
                                 _bias(unit.linears), act if mlp is not None else None)
        if mlp is not None and unit.launch is not None:
            patched.append(_Patched(handle, spec=unit.spec(None)))
            _swap(mlp, _mlp_forward, patched[-1], undo)


def _input_major(linears: list, undo: list) -> torch.Tensor:
    """One input-major storage [in, sum of outs] for the Linears (concatenated), each module's weight
    re-pointed at its [out, in] view of it; undo gives every module contiguous weights of its own back."""
    wt = torch.cat([m.weight.detach().t() for m in linears], dim=1).contiguous() if len(linears) > 1 else \
        linears[0].weight.detach().t().contiguous()
    start = 0
    for m in linears:
        n = m.out_features
        m.weight.data = wt[:, start:start + n].t()
        start += n

        def restore(m=m):
            m.weight.data = m.weight.data.contiguous()

        undo.append(restore)
    return wt


def _bias(linears: list) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias.detach().float() if m.bias is not None else
                      torch.zeros(m.out_features, device=m.weight.device) for m in linears])


def _mlp(model: nn.Module, unit: _Unit) -> nn.Module | None:
    """The MLP whose gate/up the unit computes, when its forward is down(act(gate) * up) as we know it."""
    mlp = getattr(decoder_layers(model)[unit.layer], "mlp", None)
    if mlp is None or not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
        return None
    known = (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj") and hasattr(mlp, "act_fn")) or \
        (hasattr(mlp, "gate_up_proj") and hasattr(mlp, "activation_fn"))
    return mlp if known else None


def _activation(model: nn.Module) -> str | None:
    """The gate activation as our kernels name it (silu, gelu_tanh), read from the config as our runtime
    reads it; None when the config names another."""
    from .args import ModelArgs

    try:
        state = _StateDict(model, tensors=False)
        return ModelArgs.from_config(state.config, state.architecture).activation
    except ActTailError:
        return None


def _mlp_forward(self, x):
    """The MLP's forward: a decode step the dispatch rule runs sparse computes act(gate) * up in the unit's
    one launch, then down; anything else runs the MLP's own forward (through the patched Linears)."""
    st = self._acttail
    if st.enabled and _is_decode(x) and st.spec.sparse_at[_batch(x) - 1]:
        h = _run(st.spec.key, x.reshape(-1, x.shape[-1]))
        return self.down_proj(h.reshape(*x.shape[:-1], -1))
    return st.original(self, x)


# ---- our decoder from a transformers model -------------------------------------------------------------


class _StateDict:
    """A checkpoint-like view of a transformers model's weights (what ``load_model`` reads)."""

    def __init__(self, model: nn.Module, tensors: bool = True):
        cfg = model.config
        self.config = cfg.to_dict()
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.config.update(text.to_dict())
        self.architecture = (cfg.architectures or [type(model).__name__])[0]
        self.path = getattr(cfg, "_name_or_path", "") or type(model).__name__
        self._tensors = dict(model.state_dict()) if tensors else {}
        self.tensor_names = list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise ActTailError(f"{self.path}: the model has no tensor {name!r}")
        return self._tensors[name]


def from_transformers(model: nn.Module, dtype: torch.dtype = torch.float32):
    """Our decoder (``runtime.model.Transformer``) with the weights of a stock transformers causal LM, on its
    device (tensors already in ``dtype`` there are shared, not copied; q/k/v and gate/up are concatenated)."""
    from .model import load_model

    dev = next(model.parameters()).device
    return load_model(_StateDict(model), dtype, str(dev))


def share_weights(hf_model: nn.Module, ours) -> None:
    """Point the transformers model's projection weights (and q/k/v biases) at views of our decoder's
    storage, so both run on one copy of the bytes (its own copies are freed when nothing else holds them)."""
    for linear, parts in projection_modules(hf_model).items():
        kind, layer, _ = parts[0]
        block = ours.layers[layer]
        source = {"q": block.attention.wqkv, "k": block.attention.wqkv, "v": block.attention.wqkv,
                  "o": block.attention.wo, "gate": block.feed_forward.w13, "up": block.feed_forward.w13,
                  "down": block.feed_forward.w2}[kind]
        start = _row_start(ours, kind)
        rows = slice(start, start + linear.out_features)
        linear.weight.data = source.weight.data[rows]
        if linear.bias is not None and source.bias is not None:
            linear.bias.data = source.bias.data[rows]


def _row_start(ours, kind: str) -> int:
    """Where a kind's rows start in our fused weight (q/k/v in wqkv, gate/up in w13)."""
    q, k, _ = ours.args.qkv_sizes
    return {"k": q, "v": q + k, "up": ours.args.intermediate_size}.get(kind, 0)


def is_transformers_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings")


def hf_position_logits(model, batch: torch.Tensor, dense: bool) -> torch.Tensor:
    """Logits [B * (T - 1), vocab] of every predicting position of a transformers model, with the applied
    plan switched off when ``dense``."""
    handle = applied(model)
    if dense and handle is not None:
        with handle.dense():
            logits = model(input_ids=batch).logits
    else:
        logits = model(input_ids=batch).logits
    return logits[:, :-1].flatten(0, 1)
