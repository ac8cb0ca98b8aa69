"""End-to-end benchmark: tokens/s of batch-1 greedy decoding with the GPU decode path.

Llama-2-7B and SmolLM2-135M shapes, random fp16 weights made on the GPU. Variants: dense (cuBLAS on the same
input-major weights), uniform 50/70/90% (per-projection thresholds calibrated on the model's own dense decode
activations), and a per-projection plan. Each decode step is a CUDA-graph replay; prefill is dense.
Writes e2e.md and e2e.json under --out.

    python benchmarks/gpu_e2e.py --out OUT [--quick] [--weights int8|int4|q4_1]
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton

from gpu_kernels import copy_bandwidth, warm_up

from acttail.kernels import quantize
from acttail.layout import GROUP_OF, KINDS, WEIGHT_FORMATS
from acttail.runtime.args import LLAMA2_7B, SMOLLM2_135M
from acttail.runtime.decoder import Decoder, greedy
from acttail.runtime.sparsify import ProjectionSparsity


def kind_params(d):
    q, kv = d.n_head * d.head_dim, d.n_local_heads * d.head_dim
    i = d.intermediate_size
    return {"q": d.dim * q, "k": d.dim * kv, "v": d.dim * kv, "o": q * d.dim,
            "gate": d.dim * i, "up": d.dim * i, "down": i * d.dim}


def synthetic_plan(d, mean=0.5):
    """Per-projection sparsities that vary by kind and depth, param-weighted mean exactly ``mean``.

    A stand-in for an acttail plan (random weights have no heavy-tailed spectra to allocate from)."""
    off = {"q": 0.10, "k": 0.10, "v": -0.10, "o": -0.05, "gate": 0.05, "up": 0.0, "down": -0.10}
    P = kind_params(d)
    raw = {(i, k): off[k] + 0.2 * (i / max(1, d.n_layer - 1) - 0.5) for i in range(d.n_layer) for k in KINDS}
    total = sum(P[k] for _, k in raw)
    shift = mean - sum(v * P[k] for (_, k), v in raw.items()) / total
    return {key: min(0.95, max(0.0, v + shift)) for key, v in raw.items()}


def eager_steps(dec, prompt, n, observer=None):
    """n eager greedy decode steps after a prefill, ``observer(layer, kinds, x)`` seeing each group's input."""
    dec.tokens.copy_(dec.prefill(prompt).argmax(-1).view(-1, 1))
    dec.ops.observer = observer
    try:
        with torch.no_grad():
            for _ in range(n):
                dec.tokens.copy_(dec.forward_token(dec.tokens, dec.pos).argmax(-1).view(-1, 1))
                dec.pos.add_(1)
    finally:
        dec.ops.observer = None


def record_inputs(dec, prompt, n):
    """Projection-group inputs over n eager dense decode steps after a prefill: {(layer, group): [rows]}."""
    seen = defaultdict(list)
    dec.set_settings({})
    eager_steps(dec, prompt, n, lambda i, kinds, x: seen[i, GROUP_OF[kinds[0]]].append(x.float()))
    return {key: torch.cat(v) for key, v in seen.items()}


def thresholds_for(inputs, sparsity):
    """{(layer, kind): t} zeroing the fraction sparsity[(layer, kind)] of that projection's inputs."""
    out = {}
    for (i, k), s in sparsity.items():
        a = inputs[i, GROUP_OF[k]].abs().flatten()
        if s > 0:
            out[i, k] = torch.quantile(a, s).item()
    return out


def achieved(dec, prompt, th, n, d):
    """Measured fraction of skipped inputs per projection over n eager sparse steps, param-weighted mean."""
    zero = defaultdict(float)
    cnt = defaultdict(int)

    def rec(i, kinds, x):
        launch = dec.ops.launches.get((i, GROUP_OF[kinds[0]]))
        if launch is None or not launch.runs_sparse(1):  # a group dispatched to dense reads every row
            return
        for k in kinds:
            if (i, k) in th:
                zero[i, k] += (x.float().abs() <= th[i, k]).float().sum().item()
                cnt[i, k] += x.numel()

    eager_steps(dec, prompt, n, rec)
    P = kind_params(d)
    frac = {key: zero[key] / cnt[key] for key in cnt}
    mean = sum(frac.get((i, k), 0.0) * P[k] for i in range(d.n_layer) for k in KINDS) / (d.n_layer * sum(P.values()))
    return frac, mean


def time_decode(dec, prompt, n_tokens, repeats=3):
    """Median tokens/s over repeats of n_tokens graph replays (each after a fresh dense prefill)."""
    rates = []
    for _ in range(repeats):
        dec.tokens.copy_(dec.prefill(prompt).argmax(-1).view(-1, 1))
        dec.decode(0)  # captures the step's graph (outside the timing) the first time
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.decode(n_tokens)
        b.record()
        b.synchronize()
        rates.append(n_tokens / (a.elapsed_time(b) / 1e3))
    return statistics.median(rates), rates


# decode steps timed side by side: (kernel launch settings over pick_config's, or None; fusion on; attention
# splits per head, None: attention_splits' rule). "current": the committed step (one-token launches RB=8 at 3
# per SM; each block's residual add + RMSNorm fused into its sparse projections, RoPE + the cache write into
# attention, attention split over programs); "unfused": norms and RoPE as separate launches and one attention
# program per head (the step of issue 12's run3); "one attention program": the current step with one program
# per key/value head; "compact only": the current step with every chunk compacted (DENSE 0, the kernel before
# chunks were read in place at low sparsity). (Steps with one chunk of all K rows per program for K <= 2048,
# timed at 5e5e861: 3-47% slower on the SmolLM2 shape; and the [64, 128] accumulator 'rb1 3/SM', fragile under
# load: reports/gpu/issue12/final.)
STEPS = {"current": (None, True, None), "unfused": (None, False, 1), "one attention program": (None, True, 1),
         "compact only": ({"DENSE": 0}, True, None)}
DEFAULT_STEPS = ["current", "unfused"]


def set_step(dec, step, sets=None, planned=None):
    """The decode step's launch settings and fusion, with runtime settings ``sets`` (the graph is re-captured)."""
    config, dec.ops.fuse, dec.ops.attn_splits = STEPS[step]
    dec.set_settings(sets or {}, planned, config)


def step_agreement(dec, prompt, th):
    """Largest relative difference of the first decode logits between the launch rules (thresholds th)."""
    outs = []
    for step in STEPS:
        set_step(dec, step, {k: ProjectionSparsity(threshold=t) for k, t in th.items()})
        dec.tokens.copy_(dec.prefill(prompt).argmax(-1).view(-1, 1))
        outs.append(dec.forward_token(dec.tokens, dec.pos).float())
    set_step(dec, next(iter(STEPS)))
    return max((((o - outs[0]).norm() / outs[0].norm()).item() for o in outs[1:]), default=0.0)


def kernel_breakdown(dec, prompt, n=8):
    """CUDA time per kernel name over n graph replays of the decode step (torch profiler), per token."""
    from torch.profiler import ProfilerActivity, profile
    dec.tokens.copy_(dec.prefill(prompt).argmax(-1).view(-1, 1))
    dec.decode(2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.decode(n)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if us > 0:
            rows.append(dict(kernel=e.key[:90], calls_per_token=e.count / n, us_per_token=us / n))
    return sorted(rows, key=lambda r: -r["us_per_token"])


def random_biases(dims, seed=2):
    """Learned output biases of every projection (fp32, random): what a plan calibrated with the default
    compensation adds; only their cost is timed here."""
    g = torch.Generator().manual_seed(seed)
    return {(i, k): ProjectionSparsity(bias=0.01 * torch.randn(dims.out_features(k), generator=g))
            for i in range(dims.n_layer) for k in KINDS}


def weight_bytes(weights=None, K=4096) -> float:
    """Bytes a projection weight of K inputs takes per parameter, scales included: fp16 2, else what
    ``kernels.quantize`` stores for that format (int8 ~1, int4 group 128 ~0.52, q4_1 0.625)."""
    if weights is None:
        return 2.0
    q, scales, _ = quantize(torch.ones(K, 64), weights)
    return (q.nbytes + scales.nbytes) / (K * 64)


def run_model(name, dims, bw, n_tokens, calib_tokens, sparsities=(0.5, 0.7, 0.9), biases=False, T=16, weights=None):
    dec = Decoder.random(dims, torch.float16, "cuda", max_seq=T + n_tokens + calib_tokens + 8, weights=weights)
    name = f"{name}, {weights} weights" if weights else name
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, dims.vocab_size, (1, T), generator=g).cuda()
    inputs = record_inputs(dec, prompt, calib_tokens)
    P = kind_params(dims)
    bpw = weight_bytes(weights, dims.dim)
    layer_bytes = sum(P.values()) * bpw
    head_bytes = dims.vocab_size * dims.dim * 2
    # the keys and values attention reads per token, at the mean position of the timed decode
    kv_bytes = dims.n_layer * 2 * dims.n_local_heads * dims.head_dim * 2 * (T + n_tokens / 2)
    # graph replay reproduces eager decoding (dense): same greedy tokens
    dec.set_settings({})
    eager, graph = (tokens_of(dec, prompt, 12, use_graph) for use_graph in (False, True))
    rows = []
    uniform = lambda s: {(i, k): s for i in range(dims.n_layer) for k in KINDS}  # noqa: E731
    steps_rel_diff = step_agreement(dec, prompt, thresholds_for(inputs, uniform(0.5)))
    # (label, planned sparsities, dispatch, learned biases): without dispatch every group runs the sparse kernel
    variants = [("dense", None, False, False)] + \
        [(f"uniform {int(s * 100)}%", uniform(s), False, False) for s in sparsities] + \
        [("plan (per-projection, mean 50%)", synthetic_plan(dims), False, False)] + \
        [("every row kept, kernels forced (t = -1)", "all", False, False)] + \
        [(f"uniform {int(s * 100)}%, use_sparse dispatch", uniform(s), True, False) for s in sparsities] + \
        [(f"uniform {int(s * 100)}%, use_sparse dispatch, learned biases", uniform(s), True, True)
         for s in (sparsities if biases else ())]
    dense_rate, breakdown = {}, {}
    comp = random_biases(dims) if biases else None
    for label, sp, dispatch, with_bias in variants:
        if sp == "all":  # the sparse kernel (fused norms) in place of cuBLAS, nothing skipped
            sp, th = None, {(i, k): -1.0 for i in range(dims.n_layer) for k in KINDS}
        else:
            th = thresholds_for(inputs, sp) if sp else {}
        sets = {k: ProjectionSparsity(threshold=t, bias=comp[k].bias if with_bias else None) for k, t in th.items()}
        planned = sp if dispatch else None
        set_step(dec, next(iter(STEPS)), sets, planned)
        n_sparse = dec.ops.sparse_groups(1)
        frac, mean_s = achieved(dec, prompt, th, 8, dims) if th else ({}, 0.0)
        need = sum((1 - frac.get((i, k), 0.0)) * P[k] * bpw for i in range(dims.n_layer)
                   for k in KINDS) + head_bytes + kv_bytes
        floor = bw / need
        for step in STEPS:
            set_step(dec, step, sets, planned)
            rate, rates = time_decode(dec, prompt, n_tokens)
            dense_rate.setdefault(step, rate)
            rows.append(dict(model=name, variant=label, step=step,
                             target_mean_sparsity=(sum(sp[i, k] * P[k] for i, k in sp) /
                                                   (dims.n_layer * sum(P.values()))) if sp else 0.0,
                             achieved_mean_sparsity=mean_s, tok_s=rate, tok_s_runs=rates,
                             speedup=rate / dense_rate[step], floor_tok_s=floor, of_floor=rate / floor,
                             bytes_per_token=need, sparse_groups=n_sparse, groups=4 * dims.n_layer,
                             graph_matches_eager=(eager == graph) if label == "dense" else None))
            print(f"{name} {label} [{step}]: {rate:.1f} tok/s ({rate / dense_rate[step]:.2f}x dense), achieved "
                  f"sparsity {mean_s:.3f}, floor {floor:.1f} tok/s ({rate / floor:.0%} of floor)", flush=True)
        set_step(dec, next(iter(STEPS)), sets, planned)
        if label in ("dense", "uniform 50%", "uniform 90%"):
            try:
                breakdown[label] = kernel_breakdown(dec, prompt)
                top = ", ".join(f"{r['kernel'][:40]} {r['us_per_token']:.0f}us" for r in breakdown[label][:6])
                print(f"{name} {label} per-token kernel time: {top}", flush=True)
            except Exception as e:  # the profiler is a diagnostic; its failure must not lose the timings
                print(f"profiler failed: {type(e).__name__}: {e}", flush=True)
    del dec
    torch.cuda.empty_cache()
    return rows, dict(model=name, layer_bytes_total=dims.n_layer * layer_bytes, head_bytes=head_bytes,
                      eager_tokens=eager, graph_tokens=graph, steps_logits_rel_diff=steps_rel_diff,
                      kernel_breakdown=breakdown)


def tokens_of(dec, prompt, n, use_graph):
    """The n greedy tokens after the prompt, decoded with or without graph replays."""
    dec.tokens.copy_(dec.prefill(prompt).argmax(-1).view(-1, 1))
    T = prompt.shape[1]
    dec.out[:, T] = dec.tokens[:, 0]
    dec.decode(n - 1, greedy, use_graph)
    return dec.out[0, T:T + n].tolist()


def markdown(rows, info, bw, meta):
    lines = ["# End-to-end decode benchmark (batch 1, greedy, fp16, random weights of the real shapes)", "",
             f"- device: {meta['device']}", f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {bw / 1e12:.2f} TB/s",
             f"- each decode step is one CUDA-graph replay (static KV cache, dense prefill of {meta['context']} tokens); "
             "tok/s = median of 3 runs of the decode",
             "- thresholds calibrated per projection on the model's own dense decode activations; "
             "'achieved' = zeroed fraction measured on later sparse decode steps (param-weighted)",
             "- floor = copy bandwidth / bytes that must be read per token (kept weight rows + LM head + the KV "
             "cache at the mean decode position)", "",
             "- 'sparse groups': projection groups (qkv, o, gate/up, down per layer) run by the sparse kernel; "
             "the last variant lets `use_sparse` send a group to dense cuBLAS when the kernel cannot pay", "",
             "- step: 'current' = the committed decode step (pick_config's RB=8 at 3 programs per SM; residual "
             "add + RMSNorm fused into the sparse projections, RoPE + cache write into attention); 'unfused' = "
             "the same with norms and RoPE as separate launches and one attention program per key/value head; "
             "'one attention program' = current with one attention program per head; 'compact only' = every "
             "chunk compacted. Speedups are against dense with the same step", "",
             "| model | variant | step | target sparsity | achieved | sparse groups | tok/s | vs dense | floor tok/s "
             "| of floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['step']} | {r['target_mean_sparsity']:.2f} | "
                     f"{r['achieved_mean_sparsity']:.2f} | {r['sparse_groups']}/{r['groups']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['floor_tok_s']:.1f} | {r['of_floor']:.0%} |")
    lines += ["", "Graph replay vs eager greedy tokens (dense, 12 tokens):", ""]
    for i in info:
        lines.append(f"- {i['model']}: {'identical' if i['eager_tokens'] == i['graph_tokens'] else 'DIFFERENT'}; "
                     f"first-step logits at uniform 50%, largest difference between the launch rules: relative "
                     f"{i['steps_logits_rel_diff']:.1e}")
    for i in info:
        for label, ks in i["kernel_breakdown"].items():
            total = sum(r["us_per_token"] for r in ks)
            lines += ["", f"Kernel time per token, {i['model']}, {label}, current step (torch profiler over graph "
                      f"replays; {total:.0f} us of kernels per token):", "", "| kernel | launches/token | us/token |",
                      "|---|---|---|"]
            lines += [f"| `{r['kernel']}` | {r['calls_per_token']:.0f} | {r['us_per_token']:.1f} |" for r in ks[:12]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, fewer tokens")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                    help="uniform sparsities to time (each with and without use_sparse dispatch)")
    ap.add_argument("--only-7b", action="store_true", help="the Llama-2-7B shape only")
    ap.add_argument("--only-smollm2", action="store_true", help="the SmolLM2-135M shape only")
    ap.add_argument("--context", type=int, default=16, help="prompt tokens before the timed decode (dense prefill)")
    ap.add_argument("--biases", action="store_true",
                    help="also time each dispatch variant with learned output biases (the default compensation)")
    ap.add_argument("--weights", choices=list(WEIGHT_FORMATS),
                    help="decode over quantized copies of the projection weights (every group a kernel launch; "
                         "'dense' then reads every row of the same bytes)")
    ap.add_argument("--steps", nargs="+", choices=list(STEPS), default=DEFAULT_STEPS,
                    help="decode steps to time (the first is the reference of the profiles)")
    args = ap.parse_args()
    for step in set(STEPS) - set(args.steps):
        del STEPS[step]
    for step in args.steps:  # in the order asked
        STEPS[step] = STEPS.pop(step)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command="python " + " ".join(sys.argv), torch=torch.__version__, triton=triton.__version__,
                context=args.context)
    bw = copy_bandwidth()
    warm_up()
    models = [("SmolLM2-135M shape", SMOLLM2_135M)] if args.quick or args.only_smollm2 else \
        [("Llama-2-7B shape", LLAMA2_7B)] if args.only_7b else \
        [("Llama-2-7B shape", LLAMA2_7B), ("SmolLM2-135M shape", SMOLLM2_135M)]
    rows, info = [], []
    for name, dims in models:
        r, i = run_model(name, dims, bw, args.tokens // (4 if args.quick else 1), 8, tuple(args.sparsities),
                         args.biases, args.context, args.weights)
        rows += r
        info.append(i)
    (out / "e2e.json").write_text(json.dumps(dict(meta=meta, copy_bw=bw, rows=rows, info=info), indent=1))
    (out / "e2e.md").write_text(markdown(rows, info, bw, meta))


if __name__ == "__main__":
    main()
