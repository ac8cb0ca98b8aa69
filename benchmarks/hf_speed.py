"""Decode speed as transformers users get it, side by side in one run (issue 18).

A ``LlamaForCausalLM`` with random fp16 weights of the Llama-2-7B shape and of the SmolLM2-135M shape on the
GPU; a uniform plan from ``acttail.analyze`` -> ``acttail.allocate(method="uniform")`` -> ``acttail.calibrate``
(thresholds only, random token ids); batch-1 greedy generation of --tokens new tokens after a --prompt-token
prompt, best of two runs after a warm-up, every row in the same process:

- ``model.generate`` eager, dense and with ``acttail.apply(model, plan)``;
- ``model.generate(..., cache_implementation="static")`` (transformers compiles the decode step with
  torch.compile, mode reduce-overhead: CUDA graphs), dense and with the plan applied;
- the fast path: ``acttail.decoder(model, plan).generate(...)`` (our decoder sharing the model's weights,
  one CUDA-graph replay per token), dense and with the plan, and the decode rate ``acttail generate``
  reports (the same decoder's decode time, prefill and capture excluded);
- transformers' own per-token cost: static-cache generation of the same shape with 1 layer (its host work
  per token and the LM head; what caps the compiled speed-up);
- host time per projection call, eager: our launch (acttail.apply's, prepared once) against ``F.linear``
  and the one-shot ``acttail.kernels.sparse_linear``; and GPU time inside a CUDA graph of many calls.

    python benchmarks/hf_speed.py --out OUT [--shapes 7b smollm2] [--tokens 128] [--prompt 32] [--rounds 3]

Writes OUT/hf_speed.json and OUT/hf_speed.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch._dynamo.utils import counters

import acttail
import acttail.runtime.decoder as decoder_module
from acttail.kernels import sparse_linear
from acttail.runtime.decoder import PREFILL_GRAPH_MAX

SHAPES = {"7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
          "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0)}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def random_llama(shape: dict, layers: int | None = None) -> transformers.PreTrainedModel:
    """LlamaForCausalLM with N(0, 1/fan_in) fp16 weights made on the GPU (speed does not depend on values)."""
    cfg = transformers.LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})},
                                   max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   torch_dtype="float16")
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn_like(p).mul_(p.shape[-1] ** -0.5))
    model = model.half().eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def uniform_plan(model, budget: float, ids: torch.Tensor):
    """analyze -> allocate (uniform) -> calibrate (thresholds only) on random token ids."""
    analysis = acttail.analyze(model, device="cuda", fit="median", progress=False)  # alphas unused (uniform)
    plan = acttail.allocate(analysis, budget, method="uniform")
    return acttail.calibrate(model, plan, ids, compensation="none", tokens=ids.numel(), ctx=ids.shape[1],
                             progress=False, device="cuda")


def rate(fn, n_new: int, repeats: int = 2) -> float:
    """Best tokens/s of ``fn`` (n_new tokens each) over repeats, after one warm-up call."""
    return n_new / seconds(fn, repeats)


def seconds(fn, repeats: int = 2) -> float:
    """Best wall time of ``fn`` over repeats, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def hf_rates(model, ids, n, static) -> tuple[float, float]:
    """(tokens/s of generating n tokens, prefill included; tokens/s of the decode steps alone: the time of n
    tokens minus the time of one, over n - 1)."""
    t_n = seconds(lambda: hf_generate(model, ids, n, static))
    t_1 = seconds(lambda: hf_generate(model, ids, 1, static))
    return n / t_n, (n - 1) / max(t_n - t_1, 1e-9)


def hf_generate(model, ids, n_new, static: bool):
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    if static:
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, **kw)


def host_times(model, plan, n: int = 400) -> list[dict]:
    """Eager time per call (host-bound: the GPU waits) and GPU time per call inside one CUDA graph, for the
    qkv and down launches of layer 0 (acttail.apply's, prepared once), the one-shot kernel call and F.linear."""
    rows = []
    with acttail.apply(model, plan) as handle:
        layer = model.model.layers[0]
        for (group, linear) in (("qkv", layer.self_attn.q_proj), ("down", layer.mlp.down_proj)):
            launch = handle.launches.get((0, group))
            if launch is None:
                continue
            x = torch.randn(1, launch.kernel.wt.shape[0], device="cuda", dtype=torch.float16)
            wt, t = launch.kernel.wt, launch.kernel.thresholds
            w, w_own = wt.t(), wt.t().contiguous()
            calls = {"acttail launch (prepared)": lambda: launch(x),
                     "kernels.sparse_linear (one-shot)": lambda: sparse_linear(x, wt, t, launch.widths),
                     "F.linear on the input-major weights (dense by dispatch)": lambda: F.linear(x, w),
                     "F.linear on transformers' layout (dense)": lambda: F.linear(x, w_own)}
            for name, call in calls.items():
                rows.append(dict(group=group, call=name, eager_us=_eager_us(call, n), graph_us=_graph_us(call, n)))
                log(f"host/GPU time {group} {name}: eager {rows[-1]['eager_us']:.1f} us/call, "
                    f"in a graph {rows[-1]['graph_us']:.1f} us/call")
    return rows


def _eager_us(call, n):
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def _graph_us(call, n):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            call()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def run_shape(name: str, shape: dict, args, out: dict) -> None:
    rows = out.setdefault("rows", [])

    def add(how, variant, tok_s, **extra):
        rows.append(dict(shape=name, how=how, variant=variant, tok_s=tok_s, **extra))
        save(out, args.out)
        log(f"{name} | {how} | {variant}: {tok_s:.1f} tok/s" + (f" (decode alone {extra['decode_tok_s']:.1f})"
                                                                 if "decode_tok_s" in extra else "")
            + (f" (prefill {extra['prefill_ms']:.1f} ms)" if "prefill_ms" in extra else ""))

    def section(label, fn):  # one failure must not lose the other rows
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log(f"{name} {label} FAILED: {type(e).__name__}: {e}")
            out.setdefault("errors", []).append(dict(shape=name, section=label, error=traceback.format_exc()[-3000:]))

    torch.manual_seed(0)
    model = random_llama(shape)
    ids = torch.randint(0, shape["vocab_size"], (1, args.prompt), device="cuda")
    cal = torch.randint(0, shape["vocab_size"], (8, 512), device="cuda")
    t0 = time.time()
    saved = Path(args.plan.format(shape=name)) if args.plan else None
    if saved is not None and saved.exists():
        plan = acttail.Plan.load(saved)
        log(f"{name}: plan read from {saved}")
    else:
        plan = uniform_plan(model, args.budget, cal)
        log(f"{name}: plan {args.budget:.0%} in {time.time() - t0:.0f} s")
        if saved is not None:
            plan.save(saved)
    n = args.tokens
    for static in [w == "static" for w in ("eager", "static") if w in args.ways]:
        how = "model.generate(cache_implementation='static')" if static else "model.generate (eager)"
        best = {}  # variant -> (tok/s, decode tok/s, extra) best over the rounds

        def measure(variant, **extra):
            counters.clear()
            tok_s, decode = hf_rates(model, ids, n, static)
            if static:  # inductor ran part of the step without CUDA graphs; recompilations
                extra.update(cudagraph_skips=counters["inductor"]["cudagraph_skips"],
                             recompiles=sum(counters["recompiles"].values()))
            log(f"{name} | {how} | {variant}: {tok_s:.1f} tok/s this round (decode alone {decode:.1f}) {extra}")
            if tok_s > best.get(variant, (0,))[0]:
                best[variant] = (tok_s, decode, extra)

        def dense():
            measure("dense")

        def applied():
            with acttail.apply(model, plan) as handle:
                measure(f"acttail.apply {args.budget:.0%}",
                        sparse_groups=sum(lp.runs_sparse(1) for lp in handle.launches.values()))
        for _ in range(args.rounds):  # dense and the plan alternate (the host's speed drifts)
            section(f"{how} dense", dense)
            torch._dynamo.reset()
            section(f"{how} apply", applied)
            torch._dynamo.reset()
        for variant, (tok_s, decode, extra) in best.items():
            add(how, variant, tok_s, decode_tok_s=decode, rounds=args.rounds, **extra)
    if "host" in args.ways:
        section("host times", lambda: out.setdefault("host", []).extend(dict(shape=name, **r) for r in host_times(model, plan)))
    if "static" in args.ways:
        section("transformers overhead", lambda: overhead(name, shape, ids, n, add))
    if "fast" in args.ways:
        section("fast path", lambda: fast_path(model, plan, ids, n, args, add, out, name))


def overhead(name, shape, ids, n, add):
    small = random_llama(shape, layers=1)
    add("model.generate(cache_implementation='static'), 1 layer", "dense",
        rate(lambda: hf_generate(small, ids, n, True), n))
    torch._dynamo.reset()


def fast_path(model, plan, ids, n, args, add, out, name):
    with torch.no_grad():
        hf_tokens = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
    fast = acttail.decoder(model, None, max_seq=ids.shape[1] + n + 8)
    ours = fast.generate(ids, max_new_tokens=32)[0, ids.shape[1]:].cpu()
    same = int((ours == hf_tokens.cpu()).cumprod(0).sum())
    out.setdefault("agreement", []).append(dict(shape=name, same_leading_tokens=same, of=32))
    log(f"{name}: fast path dense greedy tokens equal transformers' for the first {same} of 32")
    for label, p in (("dense", None), (f"plan {args.budget:.0%}", plan)):
        fast.set_plan(p)
        for prefill in ("graph", "eager"):  # the prompt in one CUDA-graph replay, or eagerly (before 2026-12-07)
            decoder_module.PREFILL_GRAPH_MAX = PREFILL_GRAPH_MAX if prefill == "graph" else 0
            tok_s = rate(lambda: fast.generate(ids, max_new_tokens=n), n)
            how = "acttail.decoder(model, plan).generate" + ("" if prefill == "graph" else ", eager prefill")
            add(how, label, tok_s, sparse_groups=fast.ops.sparse_groups(1),
                prefill_ms=fast.timing["prefill_s"] * 1e3, decode_ms=fast.timing["decode_s"] * 1e3)
        decoder_module.PREFILL_GRAPH_MAX = PREFILL_GRAPH_MAX
        decode = (fast.timing["new_tokens"] - 1) / fast.timing["decode_s"]
        add("acttail generate (decode rate it reports)", label, decode)


def markdown(out: dict) -> str:
    meta = out["meta"]
    lines = ["# Decode speed through transformers (batch 1, greedy, fp16, random weights)", "",
             f"- device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, transformers "
             f"{meta['transformers']}", f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- {meta['tokens']} new tokens after a {meta['prompt']}-token prompt; tok/s = new tokens / wall time "
             "of the call (prefill included), best of 2 after a warm-up; the 'acttail generate' rows are the decode "
             "rate alone (prefill and graph capture excluded), as the CLI prints it", ""]
    for shape in dict.fromkeys(r["shape"] for r in out["rows"]):
        rows = [r for r in out["rows"] if r["shape"] == shape]
        lines += [f"## {shape}", "", "| how | variant | tok/s | vs the same way dense | vs transformers eager dense "
                  "| vs transformers compiled dense | decode steps alone, tok/s | prefill ms |", "|---|---|---|---|---|---|---|---|"]
        base = {r["how"]: r["tok_s"] for r in rows if r["variant"] == "dense"}
        eager = base.get("model.generate (eager)")
        static = base.get("model.generate(cache_implementation='static')")
        for r in rows:
            rel = lambda b: f"{r['tok_s'] / b:.2f}x" if b else "-"  # noqa: E731
            decode = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
            prefill = f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else "-"
            lines.append(f"| {r['how']} | {r['variant']} | {r['tok_s']:.1f} | {rel(base.get(r['how']))} | "
                         f"{rel(eager)} | {rel(static)} | {decode} | {prefill} |")
        lines.append("")
    if out.get("host"):
        lines += ["## Time per projection call, layer 0", "",
                  "eager: a loop of calls, one synchronize at the end (host-bound: the GPU waits on the host); "
                  "graph: the same calls captured in one CUDA graph (GPU time alone)", "",
                  "| shape | group | call | eager us/call | in a graph us/call |", "|---|---|---|---|---|"]
        lines += [f"| {h['shape']} | {h['group']} | {h['call']} | {h['eager_us']:.1f} | {h['graph_us']:.1f} |"
                  for h in out["host"]]
        lines.append("")
    for a in out.get("agreement", []):
        lines.append(f"- {a['shape']}: the fast path's dense greedy tokens equal transformers' for the first "
                     f"{a['same_leading_tokens']} of {a['of']} (fp16, different kernels: a near-tie can flip)")
    for e in out.get("errors", []):
        lines.append(f"- FAILED {e['shape']} {e['section']}: `{e['error'].strip().splitlines()[-1]}`")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["7b", "smollm2"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate dense and the plan this many times (eager and static rows), keep each one's best")
    ap.add_argument("--plan", help="a plan file ({shape} is replaced): read if it exists, else written after "
                    "calibrating (runs of other trees then time the same plan)")
    ap.add_argument("--ways", nargs="+", choices=["eager", "static", "host", "fast"], default=["eager", "static", "host", "fast"],
                    help="which rows to measure")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    out = dict(meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         command="python " + " ".join(sys.argv), tokens=args.tokens, prompt=args.prompt))
    for name in args.shapes:
        run_shape(name, SHAPES[name], args, out)
        save(out, out_dir)
        torch.cuda.empty_cache()
    print(markdown(out))


def save(out: dict, folder) -> None:
    """The results so far (a killed run keeps what it measured)."""
    (Path(folder) / "hf_speed.json").write_text(json.dumps(out, indent=1))
    (Path(folder) / "hf_speed.md").write_text(markdown(out))


if __name__ == "__main__":
    main()
