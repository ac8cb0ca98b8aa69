"""How far a tiny perturbation of the hidden states moves a tiny thresholded model's logits (CPU, seconds).

gpu_checks.py compares decode logits computed two ways (eager against inductor-compiled, dynamic against
static cache). At fp16, two correct ways of computing a step differ by about 1e-3; dense, that stays about
1e-3 at the logits, but with a 70% plan an input that lands on the other side of its threshold drops or
keeps a whole weight row, and on the tiny random model of those checks (hidden size 256) one such flip moves
the logits by 10-50%. This measures that: gpu_checks' model and plan (float32, reference path), relative
noise of size eps (times each layer input's RMS) added at every decoder layer's input, and the relative
change of one decode step's logits over --draws seeds, dense and with the plan.

    cd benchmarks && python3 flip_sensitivity.py [--eps 1e-3 3e-3] [--draws 20]
"""

from __future__ import annotations

import argparse
import copy

import torch

import acttail
from gpu_checks import hf_tiny, rel


def logit_changes(model, cache, eps: float, draws: int) -> list[float]:
    """Sorted relative changes of one decode step's logits with noise eps at every layer input."""
    step = lambda: model(torch.tensor([[7]]), past_key_values=copy.deepcopy(cache)).logits  # noqa: E731
    base = step()

    def noisy(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x + eps * x.norm() / x.numel() ** 0.5 * torch.randn_like(x)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    hooks = [layer.register_forward_pre_hook(noisy, with_kwargs=True) for layer in model.model.layers]
    changes = []
    for seed in range(draws):
        torch.manual_seed(seed)
        changes.append(rel(step(), base))
    for h in hooks:
        h.remove()
    return sorted(changes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()
    model = hf_tiny("llama")
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    plan = acttail.allocate(acttail.analyze(model, progress=False), 0.7, method="uniform")
    plan = acttail.calibrate(model, plan, ids, compensation="learned", steps=5, tokens=256, ctx=64, progress=False)
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        print("| eps | model | median change | changes over 0.1 | largest |\n|---|---|---|---|---|")
        for eps in args.eps:
            for name in ("dense", "70% plan"):
                handle = acttail.apply(model, plan, backend="reference") if name != "dense" else None
                c = logit_changes(model, cache, eps, args.draws)
                if handle is not None:
                    handle.remove()
                print(f"| {eps:g} | {name} | {c[len(c) // 2]:.4f} | {sum(x > 0.1 for x in c)} of {len(c)} | {c[-1]:.3f} |")


if __name__ == "__main__":
    main()
