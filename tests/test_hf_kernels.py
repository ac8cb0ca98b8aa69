"""acttail.apply on stock transformers models with the kernel backend (decode steps through the plan's
launches: q/k/v in one, gate/up + act in one), here on the CPU under the Triton interpreter, and
torch.compile(fullgraph=True) of the patched model, whose launches are the custom ops (their CPU
implementations are the torch references)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import acttail
from acttail.runtime.applied import applied

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernels on the CPU under TRITON_INTERPRET=1", allow_module_level=True)

from runtime_tiny import hf_config, randomize  # noqa: E402

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=0)


def tiny_hf(arch="llama", seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, COMMON))
    randomize(model, None)
    return model.eval()


def calibrated(model, budget=0.7, compensation="none", mode_ids=None):
    """A calibrated uniform plan; at 70% the dispatch rule runs every one-token launch sparse."""
    ids = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(1))
    plan = acttail.allocate(acttail.analyze(model, progress=False), budget, method="uniform")
    return acttail.calibrate(model, plan, ids, compensation=compensation, steps=3, tokens=256, ctx=64, progress=False)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def prompt_cache(model, n=8):
    ids = torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values


def step(model, cache, tok=7):
    with torch.no_grad():
        return model(torch.tensor([[tok]]), past_key_values=copy.deepcopy(cache)).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3"])
def test_decode_step_on_the_kernels_equals_the_reference_path(arch, monkeypatch):
    """A one-token step: four launches per layer (q/k/v, o, gate/up with the activation, down), each giving
    the reference path's output on the same input (inputs zeroed, the plain Linear, learned biases) to fp16
    precision, and the step's logits near the reference's (a rounding difference upstream can move an input
    across its threshold, so the logits are compared loosely); a prefill launches nothing."""
    from acttail.runtime import launch as launch_mod
    from acttail.runtime.sparsify import Sparsifier, settings

    fp32 = tiny_hf(arch)
    plan = calibrated(fp32, compensation="learned")
    model = fp32.half()
    cache = prompt_cache(model)
    with acttail.apply(model, plan, backend="reference"):
        ref = step(model, cache)
    calls, seen = [], []
    real = launch_mod.Launch.__call__

    def spy(self, x, *a, **k):
        y = real(self, x, *a, **k)
        calls.append(self.kinds)
        seen.append((self, x.clone(), y.clone()))
        return y

    monkeypatch.setattr(launch_mod.Launch, "__call__", spy)
    with acttail.apply(model, plan, backend="kernels"):
        got = step(model, cache)
        assert sorted(calls) == sorted([("q", "k", "v"), ("o",), ("gate", "up"), ("down",)] * model.config.num_hidden_layers)
        calls.clear()
        with torch.no_grad():
            model(torch.randint(0, 320, (1, 5)))
        assert calls == []
    sp, weights = Sparsifier(settings(plan)), acttail.runtime.hf.projection_modules(model)
    for launch, x, y in seen:
        assert rel_err(y, reference(sp, weights, launch, x)) < 5e-3, launch.kinds
    assert rel_err(got, ref) < 0.3
    assert rel_err(ref, step(model, cache)) > 0.05  # the plan changes the step: the comparison can fail
    assert all(p.is_contiguous() for p in model.parameters())  # remove() gave every module its own weights back


def reference(sp, modules, launch, x):
    """The reference path's output of a launch's projections on x (act(gate) * up for a gate/up launch)."""
    parts = {(layer, kind): (linear, rows) for linear, ps in modules.items() for kind, layer, rows in ps}
    outs = []
    for kind in launch.kinds:
        linear, rows = parts[launch.layer, kind]
        bias = None if linear.bias is None else linear.bias[rows]
        outs.append(sp.project_one((launch.layer, kind), x, sp.settings.get((launch.layer, kind)), linear.weight[rows], bias))
    if launch.act is not None:
        return torch.nn.functional.silu(outs[0]) * outs[1] if launch.act == "silu" else \
            torch.nn.functional.gelu(outs[0], approximate="tanh") * outs[1]
    return torch.cat(outs, dim=-1)


def test_torch_compile_fullgraph_matches_eager():
    """The patched model compiles with fullgraph=True (no graph break at a projection), its launches appear
    as acttail::launch custom ops in the graph (qkv, o, gate/up with the activation, down: 4 a layer), and the
    compiled step gives the eager kernel step's logits. (Against the reference path a whole step differs
    more: an fp16 rounding apart moves inputs across their thresholds; each launch is checked on its own
    input in test_decode_step_on_the_kernels_equals_the_reference_path.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    fp32 = tiny_hf("llama", seed=3)
    plan = calibrated(fp32)
    model = fp32.half()
    cache = prompt_cache(model)
    ops = []

    def backend(gm, inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("acttail."))
        return gm

    counter = CompileCounterWithBackend(backend)
    with acttail.apply(model, plan, backend="kernels"):
        eager = step(model, cache)
        torch._dynamo.reset()
        compiled = torch.compile(lambda t, c: model(t, past_key_values=c).logits, backend=counter, fullgraph=True)
        with torch.no_grad():
            got = compiled(torch.tensor([[7]]), copy.deepcopy(cache))
    assert counter.frame_count == 1
    assert ops == ["acttail.launch.default"] * 8
    assert rel_err(got, eager) < 5e-3
    assert rel_err(eager, step(model, cache)) > 0.05  # the plan changes the step: the comparison can fail


def _python_guards(fn, *args) -> int:
    """How many of a compiled call's guards dynamo evaluates in Python (LAMBDA_GUARD: identity checks between
    two paths to one object), read from its guard log; every compiled call pays for each."""
    import io
    import logging

    torch._dynamo.reset()
    log, handler = logging.getLogger("torch._dynamo"), logging.StreamHandler(io.StringIO())
    disabled = logging.root.manager.disable  # another test may have called logging.disable
    logging.disable(logging.NOTSET)
    torch._logging.set_logs(guards=True)
    log.addHandler(handler)
    try:
        with torch.no_grad():
            torch.compile(fn, backend="eager", fullgraph=True)(*args)
    finally:
        log.removeHandler(handler)
        torch._logging.set_logs()
        logging.disable(disabled)
    return handler.stream.getvalue().count("LAMBDA_GUARD")


def test_the_patched_model_adds_few_python_guards_and_dense_switches_compiled_graphs():
    """transformers' compiled static-cache decode evaluates every guard of the step on every token: the plan may
    add a few module-level Python guards, none per layer (a handle in every closure and bound forwards cost 23
    a layer, ~1.3 ms a 7B token on an H100; a q/k/v unit shared by three modules' states 2 a layer).
    handle.dense() still switches a compiled graph to the dense step (it recompiles)."""
    fp32 = tiny_hf("llama", seed=5)
    plan = calibrated(fp32)
    model = fp32.half()
    cache = prompt_cache(model)
    fn = lambda t, c: model(t, past_key_values=c).logits  # noqa: E731
    dense = _python_guards(fn, torch.tensor([[7]]), copy.deepcopy(cache))
    with acttail.apply(model, plan, backend="kernels") as handle:
        sparse = _python_guards(fn, torch.tensor([[7]]), copy.deepcopy(cache))
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        with torch.no_grad():
            got = compiled(torch.tensor([[7]]), copy.deepcopy(cache))
            with handle.dense():
                off = compiled(torch.tensor([[7]]), copy.deepcopy(cache))
    assert dense > 0 and sparse - dense <= 4, (dense, sparse)
    eager_dense = step(model, cache)
    assert rel_err(off, eager_dense) < 1e-3 and rel_err(got, eager_dense) > 0.05


def test_a_launch_compiles_to_one_custom_op():
    """Inside torch.compile a Launch is one opaque custom op, acttail::launch(x, key), with the eager launch's
    output; the graph holds none of the launch's tensors (dynamo guards the key, not the weights)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    fp32 = tiny_hf("llama", seed=7)
    plan = calibrated(fp32)
    model = fp32.half()
    ops, graph_inputs = [], []

    def backend(gm, inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("acttail."))
        graph_inputs.append(len(inputs))
        return gm

    with acttail.apply(model, plan, backend="kernels") as handle:
        qkv, glu = handle.launches[0, "qkv"], handle.launches[0, "gate_up"]
        x = torch.randn(1, COMMON["hidden_size"], dtype=torch.float16)
        eager = (qkv(x), glu(x))
        torch._dynamo.reset()
        got = torch.compile(lambda v: (qkv(v), glu(v)), backend=CompileCounterWithBackend(backend), fullgraph=True)(x)
    assert ops == ["acttail.launch.default"] * 2 and graph_inputs == [1]
    assert rel_err(got[0], eager[0]) < 5e-3 and rel_err(got[1], eager[1]) < 5e-3


def test_torch_compile_of_the_reference_path_matches_eager():
    """On the reference backend (float32, CPU) the patched model compiles with fullgraph=True too and gives the
    eager logits (the zeros are not counted inside the graph)."""
    model = tiny_hf("llama", seed=4)
    plan = calibrated(model, budget=0.5)
    ids = torch.randint(0, 320, (2, 16))
    with acttail.apply(model, plan) as handle, torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(lambda t: model(t).logits, backend="eager", fullgraph=True)(ids)
        assert handle.achieved()  # the eager run counted
    assert torch.allclose(got, eager, atol=1e-5)


def test_apply_and_the_decoder_share_one_dispatch_rule():
    """The same plan makes the same groups sparse through acttail.apply and through the kernel decoder: at 30%
    the tiny matrices run dense everywhere (a decode step through apply is the dense step, bit for bit), at
    70% a one-token step runs every group sparse, at two tokens none (the bytes skipped do not pay for the
    launch)."""
    fp32 = tiny_hf("llama", seed=5)
    for budget, expect in ((0.3, False), (0.7, True)):
        plan = calibrated(fp32, budget=budget)
        model = copy.deepcopy(fp32).half()
        cache = prompt_cache(model)
        dense = step(model, cache)
        dec = acttail.decoder(copy.deepcopy(fp32).half(), plan)
        with acttail.apply(model, plan, backend="kernels") as handle:
            assert torch.equal(step(model, cache), dense) != expect
            for batch in (1, 2):
                ours = {k: launch.runs_sparse(batch) for k, launch in dec.ops.launches.items()}
                theirs = {k: launch.runs_sparse(batch) for k, launch in handle.launches.items()}
                assert len(ours) == 8 and set(ours.values()) == {expect and batch == 1}
                # apply builds no launch (and leaves the weights as they are) where the rule is dense at every batch
                assert theirs == ({k: v for k, v in ours.items()} if expect else {})
            assert all(p.is_contiguous() for p in model.parameters()) != expect


def test_an_applied_plan_survives_evaluate_and_calibrate():
    """evaluate / calibrate put back what was there before (the applied plan), not a dense model."""
    model = tiny_hf("llama", seed=6)
    plan = calibrated(model, budget=0.5)
    ids = torch.randint(0, 320, (2, 32))
    with acttail.apply(model, plan) as handle:
        with torch.no_grad():
            before = model(ids).logits
        acttail.evaluate(model, ids.flatten(), tokens=64, ctx=32, progress=False)
        acttail.calibrate(model, plan, ids, compensation="none", tokens=64, ctx=32, progress=False)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before)
        assert applied(model) is handle
        with handle.dense(), torch.no_grad():
            assert not torch.allclose(model(ids).logits, before)
    assert applied(model) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_fast_path_greedy_tokens_equal_transformers(arch):
    """acttail.decoder(model) on a transformers model (fp16; the kernels under the interpreter) continues a
    prompt with transformers' own greedy tokens (a dense plan), and after it the transformers model, whose
    weights now are views of the decoder's storage, still gives its own logits."""
    model = tiny_hf(arch, seed=8).half()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 320, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        logits = model(ids).logits
    fast = acttail.decoder(model)
    assert torch.equal(fast.generate(ids, max_new_tokens=6), theirs)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert fast.model.layers[0].feed_forward.w2.weight.data_ptr() == \
        next(m for n, m in model.named_modules() if n.endswith("0.mlp.down_proj")).weight.data_ptr()


def test_a_removed_plan_leaves_no_launch_registered():
    """The launches' key registry (acttail::launch finds its launch by key) holds them weakly: once the plan is
    removed and the handle dropped, no launch, and so no weight copy, stays alive through it."""
    import gc

    from acttail.runtime import launch as launch_module

    model = tiny_hf("llama", seed=8)
    plan = calibrated(model)
    model = model.half()
    handle = acttail.apply(model, plan, backend="kernels")
    keys = [lp.key for lp in handle.launches.values()]
    assert keys and all(k in launch_module._BY_KEY for k in keys)
    with torch.no_grad():
        model(torch.tensor([[3, 4]]))  # a prefill and
        model(torch.tensor([[5]]), past_key_values=prompt_cache(model, 2))  # a decode step on the kernels
    handle.remove()
    del handle
    gc.collect()
    assert not any(k in launch_module._BY_KEY for k in keys)


def _tensors_held(obj, seen=None) -> set:
    """ids of the tensors reachable from obj's attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return {id(obj)}
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        vars(obj).values() if hasattr(obj, "__dict__") and not isinstance(obj, type) else ()
    return set().union(*(_tensors_held(v, seen) for v in items)) if items else set()


def test_a_compiled_launch_keeps_nothing_from_a_call(monkeypatch):
    """Inside inductor's CUDA graphs acttail::launch must leave no allocation of its own alive after a call:
    the graphs' memory pool may hold outputs only (cudagraph trees refuse the step otherwise). A prepared
    launch keeps its scratch buffers and last output from its first call on a GPU (under the interpreter it
    binds nothing, so it is kept out of the in-graph path here by making it fail), which broke transformers'
    compiled decode on an H100."""
    from acttail.kernels import PreparedLaunch

    def kept(*args, **kwargs):
        raise AssertionError("a prepared launch inside a compiled graph keeps buffers in the graphs' pool")

    monkeypatch.setattr(PreparedLaunch, "__call__", kept)
    model = tiny_hf("llama", seed=9)
    plan = calibrated(model)
    model = model.half()
    with acttail.apply(model, plan, backend="kernels") as handle:
        for launch in handle.launches.values():
            x = torch.randn(1, launch.kernel.wt.shape[0], dtype=torch.float16)
            before = _tensors_held(launch)
            y = launch.in_graph(x)
            assert _tensors_held(launch) == before and id(y) not in before


def test_inductor_compiles_the_kernel_step_and_calls_the_launches():
    """torch.compile with inductor itself (its CPU code, not the eager backend): the decode step on the kernels
    lowers each acttail::launch to a call of the op, which runs the launch (the Triton interpreter here), and
    gives the eager kernel step's logits."""
    fp32 = tiny_hf("llama", seed=3)
    plan = calibrated(fp32)
    model = fp32.half()
    cache = prompt_cache(model)
    with acttail.apply(model, plan, backend="kernels") as handle:
        eager = step(model, cache)
        torch._dynamo.reset()
        calls = []
        launch_ops = {k: lp.in_graph for k, lp in handle.launches.items()}
        for k, lp in handle.launches.items():  # count the op's runs inside the compiled step
            lp.in_graph = lambda x, k=k: calls.append(k) or launch_ops[k](x)
        compiled = torch.compile(lambda t, c: model(t, past_key_values=c).logits, fullgraph=True)
        with torch.no_grad():
            got = compiled(torch.tensor([[7]]), copy.deepcopy(cache))
    assert sorted(calls) == sorted(handle.launches)  # every launch ran once, inside inductor's code
    assert rel_err(got, eager) < 5e-3
