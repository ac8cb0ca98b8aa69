"""Another runtime consuming an ActTail plan: HF transformers with forward pre-hooks.

Reads a calibrated plan as plain JSON (this script needs only torch and transformers, not acttail),
registers on every q/k/v/o/gate/up/down ``nn.Linear`` of a HF Llama-style model a forward pre-hook that
zeroes the inputs with |x| <= the plan's threshold, then reports what it measured: the fraction of inputs
zeroed per projection kind against the plan's target, the perplexity of a text dense vs sparse, and a
greedy generation.

    pip install 'acttail[dev]'   # or just torch + transformers
    python examples/hf_hooks.py ~/.cache/acttail/models/smollm2-135m plan.calibrated.json \
        --text ~/.cache/acttail/text/wiki.txt --prompt "The theory of relativity"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

import torch

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def read_plan(path: str) -> dict:
    """A calibrated acttail plan (version 1 or 2, magnitude score, no compensation); exits with one line if not."""
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"hf_hooks: cannot read plan {path}: {e}")
    if not isinstance(plan, dict) or plan.get("format") != "acttail-plan" or plan.get("version") not in (1, 2):
        sys.exit(f"hf_hooks: {path} is not an acttail plan, version 1 or 2")
    if plan.get("score", "magnitude") != "magnitude" or plan.get("compensation", "none") != "none":
        sys.exit(f"hf_hooks: {path} uses score {plan.get('score')!r} / compensation {plan.get('compensation')!r}; "
                 "these hooks only zero small inputs (use acttail.apply for the rest)")
    if any(e["threshold"] is None for e in plan["projections"]):
        sys.exit(f"hf_hooks: {path} has no thresholds; run `acttail calibrate` on it first")
    return plan


class Sparsifier:
    """Forward pre-hooks zeroing small inputs, with counters of what they zeroed."""

    def __init__(self):
        self.enabled = True
        self.zeroed = defaultdict(int)  # kind -> inputs zeroed
        self.seen = defaultdict(int)  # kind -> inputs seen
        self.handles = []

    def hook(self, kind: str, threshold: float):
        def pre_hook(module, args):
            if not self.enabled:
                return None
            x = args[0]
            keep = x.abs() > threshold
            self.zeroed[kind] += int(x.numel() - keep.sum())
            self.seen[kind] += x.numel()
            return (x * keep, *args[1:])

        return pre_hook

    def attach(self, model, plan: dict) -> None:
        """One pre-hook per plan entry, on the matching Linear of decoder layer ``layer``."""
        layers = model.model.layers
        if len(layers) != plan["model"]["num_layers"]:
            sys.exit(f"hf_hooks: model has {len(layers)} layers, the plan {plan['model']['num_layers']}")
        for e in plan["projections"]:
            linear = layers[e["layer"]].get_submodule(MODULES[e["kind"]])
            if (linear.in_features, linear.out_features) != (e["in_features"], e["out_features"]):
                sys.exit(f"hf_hooks: {e['key']} is {linear.in_features}->{linear.out_features} in the model, "
                         f"{e['in_features']}->{e['out_features']} in the plan")
            self.handles.append(linear.register_forward_pre_hook(self.hook(e["kind"], e["threshold"])))

    def measured(self) -> dict[str, float]:
        return {k: self.zeroed[k] / self.seen[k] for k in self.seen if self.seen[k]}

    def reset(self) -> None:
        self.zeroed.clear()
        self.seen.clear()


def target_by_kind(plan: dict) -> dict[str, float]:
    """The plan's parameter-weighted sparsity per kind."""
    params, weighted = defaultdict(int), defaultdict(float)
    for e in plan["projections"]:
        params[e["kind"]] += e["params"]
        weighted[e["kind"]] += e["params"] * e["sparsity"]
    return {k: weighted[k] / params[k] for k in params}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of one sequence of token ids."""
    return math.exp(model(ids[None], labels=ids[None]).loss.item())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="HF model folder (config.json, safetensors, tokenizer)")
    p.add_argument("plan", help="calibrated acttail plan (JSON)")
    p.add_argument("--text", help="text file for a dense vs sparse perplexity")
    p.add_argument("--tokens", type=int, default=512, help="tokens of --text to score")
    p.add_argument("--prompt", default="The meaning of life is", help="prompt for a greedy generation")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    plan = read_plan(args.plan)
    sp = Sparsifier()
    sp.attach(model, plan)
    print(f"plan: {plan['method']['name']} budget {plan['budget']}, {len(sp.handles)} hooks on {args.model}")

    on_text = {}
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            ids = tok(f.read(), return_tensors="pt").input_ids[0, : args.tokens]
        sp.enabled = False
        dense = perplexity(model, ids)
        sp.enabled = True
        sp.reset()
        sparse = perplexity(model, ids)
        on_text = sp.measured()
        print(f"perplexity over {len(ids)} tokens: dense {dense:.3f}  sparse {sparse:.3f}  ratio {sparse / dense:.3f}")

    sp.reset()
    ids = tok(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print("generation:", tok.decode(out[0], skip_special_tokens=True))

    target, on_generation = target_by_kind(plan), sp.measured()
    print("fraction of inputs zeroed per kind: plan target, measured on --text, measured during generation")
    print(f"{'kind':<6}{'target':>9}{'text':>9}{'generate':>10}")
    for kind, frac in on_generation.items():
        text = f"{on_text[kind]:>9.3f}" if kind in on_text else f"{'-':>9}"
        print(f"{kind:<6}{target[kind]:>9.3f}{text}{frac:>10.3f}")


if __name__ == "__main__":
    main()
