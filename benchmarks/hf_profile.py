"""GPU time per decode token by kernel, transformers' compiled static-cache generation, dense and with
``acttail.apply`` (issue 18: where the compiled step with the plan spends its time).

    cd benchmarks && python3 hf_profile.py --out OUT [--shape 7b] [--tokens 32]

A Llama of the shape with random fp16 weights (hf_speed.py's), a 50% uniform plan; after a warm-up call,
one ``generate(..., cache_implementation="static")`` of --tokens new tokens under torch.profiler; the CUDA
kernels' total time grouped by name, divided by the tokens. Writes OUT/hf_profile.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import acttail
from hf_speed import SHAPES, hf_generate, random_llama, seconds, uniform_plan


def kernel_times(model, ids, n: int) -> dict:
    """{kernel name: (us per token, launches per token)} of one static-cache generate of n tokens."""
    hf_generate(model, ids, n, True)  # compile and capture
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        hf_generate(model, ids, n, True)
        torch.cuda.synchronize()
    out = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name][0] += e.device_time / n
            out[e.name][1] += 1 / n
    host = {a.key: [a.self_cpu_time_total / n, a.cpu_time_total / n, a.count / n] for a in prof.key_averages()
            if a.self_cpu_time_total > 0}
    t_n = seconds(lambda: hf_generate(model, ids, n, True))
    t_1 = seconds(lambda: hf_generate(model, ids, 1, True))
    return {"wall_us_per_token": t_n / n * 1e6, "decode_wall_us_per_token": (t_n - t_1) / (n - 1) * 1e6,
            "kernels": dict(out), "host": host}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_llama(SHAPES[args.shape])
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (1, 32), device="cuda")
    plan = uniform_plan(model, 0.5, torch.randint(0, SHAPES[args.shape]["vocab_size"], (8, 512), device="cuda"))
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "tokens": args.tokens}
    result["dense"] = kernel_times(model, ids, args.tokens)
    torch._dynamo.reset()
    with acttail.apply(model, plan):
        result["plan"] = kernel_times(model, ids, args.tokens)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "hf_profile.json").write_text(json.dumps(result, indent=1))
    for variant in ("dense", "plan"):
        rows = sorted(result[variant]["kernels"].items(), key=lambda kv: -kv[1][0])
        total = sum(v[0] for _, v in rows)
        print(f"## {variant}: {total:.0f} us of GPU time per token, {sum(v[1] for _, v in rows):.0f} launches; "
              f"wall {result[variant]['wall_us_per_token']:.0f} us per token (prefill included)")
        print(f"decode steps alone: {result[variant]['decode_wall_us_per_token']:.0f} us wall per token")
        for name, (us, count) in rows[:12]:
            print(f"{us:9.1f} us {count:7.1f}x  {name[:110]}")
        print(f"### {variant}: host, self CPU us per token (total CPU us, calls per token)")
        for name, (own, total, count) in sorted(result[variant]["host"].items(), key=lambda kv: -kv[1][0])[:18]:
            print(f"{own:9.1f} us ({total:9.1f}) {count:7.1f}x  {name[:100]}")


if __name__ == "__main__":
    main()
