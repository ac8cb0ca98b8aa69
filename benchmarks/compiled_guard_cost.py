"""What ``acttail.apply`` adds to the cost of calling a compiled decode step, on the CPU (issue 18).

transformers' compiled static-cache decode pays dynamo's guard evaluation and the compiled frame's glue on
every token. This compiles a tiny Llama's decode step (8 layers) with a backend whose graph returns its
first outputs again, so a call costs only that: guards and glue; dense, then with a 70% plan on the kernel
path. Best of 7 rounds of 200 calls. Compares trees of acttail without a GPU (each on PYTHONPATH: a folder
holding ``acttail/`` with ``kernels/`` copied in as ``acttail/kernels``).

    cd /tmp && TRITON_INTERPRET=1 PYTHONPATH=PKG python /path/to/benchmarks/compiled_guard_cost.py
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import transformers

import acttail

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_hf_kernels import calibrated, prompt_cache, tiny_hf  # noqa: E402


def call_us(fn, args, calls: int = 200, rounds: int = 7) -> float:
    """Best microseconds a call of ``fn`` compiled with a graph that replays its first outputs."""
    torch._dynamo.reset()

    def backend(gm, inputs):
        out = gm(*inputs)
        return lambda *a: out

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    best = float("inf")
    with torch.no_grad():
        compiled(*args)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                compiled(*args)
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(layers: int = 8) -> None:
    cfg = tiny_hf("llama", seed=3).config
    cfg.num_hidden_layers = layers
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    plan = calibrated(model)
    model = model.half()
    cache = prompt_cache(model)
    step = lambda t, c: model(t, past_key_values=c).logits  # noqa: E731
    args = (torch.tensor([[7]]), copy.deepcopy(cache))
    dense = call_us(step, args)
    with acttail.apply(model, plan, backend="kernels"):
        sparse = call_us(step, args)
    print(f"{acttail.__file__}: {layers} layers, dense {dense:.0f} us a call, with the plan {sparse:.0f} us: "
          f"{(sparse - dense) / layers:.1f} us a layer")


if __name__ == "__main__":
    main()
