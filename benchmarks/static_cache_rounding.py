"""Is the plan's departure of static-cache generation from eager generation rounding? (issue 18, CPU)

gpu_checks.py's tiny Llama and 70% plan with learned biases (reference backend), 12 greedy tokens generated
with transformers' dynamic cache (eager ``generate``) and with ``cache_implementation="static"`` (compilation
switched off: the static cache alone, whose attention runs over the padded cache with a mask), in float32 and
in bfloat16, dense and with the plan: leading equal tokens and the relative difference of each step's logits.
With --compile the static-cache generation runs the model's forward compiled (torch.compile, fullgraph,
inductor's CPU code), as transformers compiles it on a GPU.

    cd benchmarks && python3 static_cache_rounding.py [--compile]
"""

from __future__ import annotations

import copy
import json
import sys

import torch

import acttail
from gpu_checks import agreement, hf_tiny


def generated(model, prompt, static: bool, compiled: bool = False):
    kw = dict(cache_implementation="static") if static else {}
    if static and compiled:
        model.forward = torch.compile(type(model).forward.__get__(model), fullgraph=True)
    try:
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kw)
    finally:
        model.__dict__.pop("forward", None)
    return out.sequences[0, prompt.shape[1]:].clone(), torch.cat([s.float() for s in out.logits]).clone()


def main():
    compiled = "--compile" in sys.argv[1:]
    fp32 = hf_tiny("llama")
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    plan = acttail.allocate(acttail.analyze(fp32, progress=False), 0.7, method="uniform")
    plan = acttail.calibrate(fp32, plan, ids, compensation="learned", steps=5, tokens=256, ctx=64, progress=False)
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1))
    torch._dynamo.config.disable = not compiled  # the static cache alone, or compiled
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model = copy.deepcopy(fp32).to(dtype)
            dense = agreement(generated(model, prompt, True, compiled), generated(model, prompt, False))
            torch._dynamo.reset()
            with acttail.apply(model, plan, backend="reference"):
                sparse = agreement(generated(model, prompt, True, compiled), generated(model, prompt, False))
            torch._dynamo.reset()
            for label, a in (("dense", dense), ("70% plan", sparse)):
                print(json.dumps(dict(dtype=str(dtype), model=label, leading_equal=a["leading_equal"],
                                      step_rel=[round(x, 4) for x in a["step_rel"]])))
    if compiled:
        from torch._dynamo.utils import counters
        print(f"graphs compiled: {counters['stats']['unique_graphs']}")


if __name__ == "__main__":
    main()
