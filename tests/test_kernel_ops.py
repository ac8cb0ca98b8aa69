"""The kernels as PyTorch custom operators (acttail.kernels.ops, torch.ops.acttail.*): on the CPU their
implementation is the torch reference; their schemas and fake implementations pass torch.library.opcheck,
and a compiled function calling them compiles with fullgraph=True to the same results."""

import pytest
import torch

from acttail.kernels import new_locks, sparse_glu_ref, sparse_linear_ref, topk_thresholds_ref
from acttail.kernels import ops


def inputs(B=2, K=64, N=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).half()
    wt = (torch.randn(K, N, generator=g) / K ** 0.5).half()
    return x, wt, torch.randn(N, generator=g)


def test_ops_match_their_references():
    x, wt, bias = inputs()
    t = torch.tensor([0.5, 0.8, 0.3])
    y = torch.ops.acttail.sparse_linear(x, wt, t, [32, 32, 32], bias, new_locks("cpu"))
    assert torch.equal(y, sparse_linear_ref(x, wt, t, [32, 32, 32], bias))
    t2 = torch.tensor([0.5, 0.8])
    h = torch.ops.acttail.sparse_glu(x, wt, t2, "gelu_tanh", None, new_locks("cpu"))
    assert h.shape == (2, 48) and torch.equal(h, sparse_glu_ref(x, wt, t2, "gelu_tanh"))
    keep = torch.ops.acttail.topk_thresholds(x, [10, 20])
    assert torch.equal(keep, topk_thresholds_ref(x, [10, 20]))
    assert ((x.float().abs() > keep[0][:, None]).sum(-1) == 10).all()


@pytest.mark.parametrize("name", ["sparse_linear", "sparse_glu", "topk_thresholds"])
def test_opcheck(name):
    """Schema, fake tensors and the dispatcher's checks (no mutation is declared: the ticket counters are left
    as they were found)."""
    x, wt, bias = inputs(seed=1)
    args = {"sparse_linear": (x, wt, torch.tensor([0.5]), [96], bias, new_locks("cpu")),
            "sparse_glu": (x, wt, torch.tensor([0.5, 0.6]), "silu", None, new_locks("cpu")),
            "topk_thresholds": (x, [8, 16, 32])}[name]
    torch.library.opcheck(getattr(torch.ops.acttail, name).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_fullgraph_equals_eager():
    x, wt, bias = inputs(seed=2)
    locks = new_locks("cpu")

    def f(v):
        t = torch.ops.acttail.topk_thresholds(v, [16, 16])
        return torch.ops.acttail.sparse_glu(v, wt, t, "silu", None, locks)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))
    assert ops.IN_GRAPH == {"pdl": False}
