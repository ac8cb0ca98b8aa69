"""Host cost of ``acttail.apply``'s eager decode path, on the CPU: a tiny Llama with a 70% plan on the kernel
path, each launch's kernel replaced by a stub that returns zeros, 40 greedy tokens of ``model.generate``
under cProfile: milliseconds a token and Python calls; and the host time of one layer's projection calls
(q, k, v, o, the MLP) on a one-token input, float32, dense and through apply (best of 5 x 20000). Compares two trees of acttail without a GPU
(run it once with each on PYTHONPATH: a folder holding ``acttail/`` with ``kernels/`` copied in as
``acttail/kernels``).

    cd /tmp && TRITON_INTERPRET=1 PYTHONPATH=PKG python /path/to/benchmarks/apply_host_overhead.py
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

import acttail

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_hf_kernels import calibrated, tiny_hf  # noqa: E402


class ZerosKernel:
    """A PreparedLaunch stand-in: the launch's tensors, and zeros of the output's shape for any input."""

    def __init__(self, kernel):
        self.wt, self.thresholds, self.glu, self.act = kernel.wt, kernel.thresholds, kernel.glu, kernel.act
        self.bias, self.locks = kernel.bias, kernel.locks

    def __call__(self, x, t, **kwargs):
        return torch.zeros(x.shape[0], self.wt.shape[1] // (2 if self.glu else 1), dtype=x.dtype)


def main(tokens: int = 40) -> None:
    model = tiny_hf("llama", seed=3)
    plan = calibrated(model)
    model = model.half()
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([[3, 5, 7, 9]])
    with acttail.apply(model, plan, backend="kernels") as handle, torch.no_grad():
        for launch in handle.launches.values():
            launch.kernel = ZerosKernel(launch.kernel)
        model.generate(ids, max_new_tokens=4, do_sample=False)
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        profiler.disable()
        seconds = time.perf_counter() - t0
    stats = pstats.Stats(profiler)
    print(f"{acttail.__file__}: {seconds / tokens * 1e3:.1f} ms a token, {stats.total_calls} Python calls")
    layer_host_us()


def layer_host_us(calls: int = 20000) -> None:
    """Host microseconds of one layer's projection calls, dense and through apply (kernels stubbed)."""
    model = tiny_hf("llama", seed=3)
    plan = calibrated(model)
    layer, x = model.model.layers[0], torch.randn(1, 1, model.config.hidden_size)

    def projections():
        attn = layer.self_attn
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(x), layer.mlp(x)

    def best_us():
        for _ in range(200):
            projections()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                projections()
            times.append(time.perf_counter() - t0)
        return min(times) / calls * 1e6

    with torch.no_grad():
        dense = best_us()
        with acttail.apply(model, plan, backend="kernels") as handle:
            for launch in handle.launches.values():
                launch.kernel = ZerosKernel(launch.kernel)
            sparse = best_us()
    print(f"one layer's projection calls, host time: dense {dense:.1f} us, through apply {sparse:.1f} us")


if __name__ == "__main__":
    main()
