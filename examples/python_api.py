"""The Python API on a stock transformers model: analyze, allocate, calibrate, apply, evaluate.

    python examples/python_api.py ~/.cache/acttail/models/smollm2-135m --budget 0.5 --tokens 4096

Loads the model with transformers, plans ``--budget`` sparsity from the ESD analysis of its weights,
calibrates the thresholds (and learns the compensating output biases) on c4, applies the plan to the transformers model in place and measures
perplexity, KL divergence to the dense model and top-1 agreement on wiki (never the calibration text).
"""

from __future__ import annotations

import argparse

import torch

import acttail
from acttail.text import read_text


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="HF model folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--method", default="uniform", help="allocation method (see `acttail allocate --help`)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration and evaluation tokens")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--compensation", default="learned", help="none, learned (SPON biases) or lowrank")
    p.add_argument("--steps", type=int, default=200, help="training steps of the learned biases")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{args.model}/tokenizer.json")

    analysis = acttail.analyze(args.model, progress=False)  # alpha etc. per projection (cached)
    plan = acttail.allocate(analysis, args.budget, method=args.method)
    plan = acttail.calibrate(model, plan, read_text("c4"), tokenizer, tokens=args.tokens, ctx=args.ctx,
                             compensation=args.compensation, steps=args.steps, progress=False)
    dense = acttail.evaluate(model, read_text("wiki"), tokenizer, tokens=args.tokens, ctx=args.ctx, progress=False)
    with acttail.apply(model, plan) as handle:
        sparse = acttail.evaluate(model, read_text("wiki"), tokenizer, tokens=args.tokens, ctx=args.ctx,
                                  progress=False)
        achieved = handle.achieved()
    mean = sum(achieved[e.layer, e.kind] * e.params for e in plan.projections) / sum(e.params for e in plan.projections)
    print(f"{args.method} {args.budget:.0%}, {args.compensation} compensation: perplexity dense {dense['perplexity']:.4f} -> sparse "
          f"{sparse['perplexity']:.4f}, KL {sparse['kl']:.4f} nats/token, top-1 agreement "
          f"{sparse['top1_agreement']:.4f}, sparsity achieved on wiki {mean:.4f}")
    return {"plan": plan, "dense": dense, "sparse": sparse}


if __name__ == "__main__":
    main()
