"""Activation sparsity on weight-only quantized models (issue 22): is a plan's loss the same over int8 / int4
weights as over the float weights? CPU, the reference runtime.

For each weight format (the float weights, int8 per output channel, int4 in groups of 128 (the decoder's
``kernels.INT4_GROUP``) or 32 input rows, round to nearest: the formats the sparse kernel reads, applied here as their dequantized values, which is what the
kernel computes with), the model is evaluated dense and with a plan whose thresholds are calibrated on that
model (c4, thresholds only: no learned biases, so the comparison is of the sparsity alone), on wiki. KL and
top-1 are to the dense model of the same format; the dense quantized rows also give the quantization's own
cost against the float model.

    python benchmarks/quantized_quality.py MODEL PLAN --out OUT [--tokens 16384] [--cal-tokens 16384]

MODEL: a model folder (e.g. ~/.cache/acttail/models/smollm2-135m); PLAN: an allocated plan (``acttail
allocate``). Writes OUT/quantized-quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import acttail
from acttail.kernels import dequantize_ref, quantize

FORMATS = ("float", "int8", "int4-g128", "int4-g32", "q4_1")


def quantized(model, fmt):
    """model with every projection weight replaced by its ``fmt`` values (dequantized), in place: "int8",
    "int4-gG" (groups of G input rows) or "q4_1"."""
    for block in model.layers:
        for linear in (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2):
            wt = linear.weight.detach().t()
            q, scales, group = quantize(wt, fmt.split("-g")[0], *([int(fmt.split("-g")[1])] if "-g" in fmt else []))
            linear.weight.data.copy_(dequantize_ref(q, scales, group).t())
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("plan")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=16384, help="wiki tokens evaluated")
    ap.add_argument("--cal-tokens", type=int, default=16384, help="c4 tokens the thresholds are calibrated on")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), help="float, int8, int4-gG (G rows a scale), q4_1")
    args = ap.parse_args()
    text = Path.home() / ".cache/acttail/text"
    rows, t0 = [], time.time()
    for fmt in args.formats:
        model = acttail.load(args.model)
        if fmt != "float":
            quantized(model, fmt)
        plan = acttail.calibrate(model, args.plan, text / "c4.txt", tokens=args.cal_tokens, compensation="none")
        dense = acttail.evaluate(model, text / "wiki.txt", tokens=args.tokens)
        sparse = acttail.evaluate(model, text / "wiki.txt", plan=plan, tokens=args.tokens)
        rows.append(dict(weights=fmt, dense_ppl=dense["perplexity"], sparse_ppl=sparse["perplexity"],
                         kl=sparse["kl"], top1=sparse["top1_agreement"],
                         achieved=sparse["achieved"]["weighted_achieved"]))
        print(json.dumps(rows[-1]), flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=f"cpu, {torch.get_num_threads()} threads",
                command="python " + " ".join(sys.argv), seconds=round(time.time() - t0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized-quality.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Sparsity over quantized weights ({meta['date']}, {meta['device']})", "", f"`{meta['command']}`", "",
             "| weights | dense ppl | plan ppl | plan / dense | KL to dense | top-1 | achieved sparsity |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['weights']} | {r['dense_ppl']:.2f} | {r['sparse_ppl']:.2f} | {r['sparse_ppl'] / r['dense_ppl']:.3f} | "
              f"{r['kl']:.3f} | {r['top1']:.3f} | {r['achieved']:.3f} |"
              for r in rows]
    (out / "quantized-quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
