"""Correctness of the kernel paths on a real GPU (what CI checks under the Triton interpreter, here compiled):

- the kernel decoder (``acttail.decoder``) against the fp32 reference, tiny random models of every
  architecture (sparse plan, first decode logits);
- ``PreparedLaunch`` (the launch fixed once, the compiled kernel called directly) against the one-shot
  ``sparse_linear`` / ``sparse_glu``: bitwise, batch 1 and 4, fused norm included;
- ``acttail.apply`` on a transformers model: the decode step on the kernels against the reference path,
  eager and inside ``torch.compile(fullgraph=True, mode="reduce-overhead")`` (the launches as custom ops
  in inductor's CUDA graphs);
- ``model.generate(cache_implementation="static")`` with a plan applied against eager ``generate``: tokens
  and each step's logits, on the kernels and, as the control, on the reference backend.

    python benchmarks/gpu_checks.py --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from pathlib import Path

import torch
import transformers

import acttail
from acttail.kernels import PreparedLaunch, new_locks, sparse_glu, sparse_linear
from acttail.runtime.args import ModelArgs
from acttail.runtime.model import Transformer
from acttail.runtime.sparsify import ProjectionSparsity, Sparsifier

ARCHS = {"LlamaForCausalLM": {}, "Qwen2ForCausalLM": {},
         "GemmaForCausalLM": {"head_dim": 64, "hidden_act": "gelu_pytorch_tanh"},
         "Gemma2ForCausalLM": {"head_dim": 64, "query_pre_attn_scalar": 96, "sliding_window": 8,
                               "attn_logit_softcapping": 4.0, "final_logit_softcapping": 3.0},
         "Gemma3ForCausalLM": {"head_dim": 64, "query_pre_attn_scalar": 96, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"], "rope_local_base_freq": 100.0},
         "Phi3ForCausalLM": {"sliding_window": 8}}
CONFIG = {"vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "max_position_embeddings": 64, "tie_word_embeddings": False}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny(arch):
    args = ModelArgs.from_config({**CONFIG, **ARCHS[arch]}, arch)
    torch.manual_seed(0)
    m = Transformer(args)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else
                    torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.3))
            p.copy_(p.half().float())
    return m.eval().requires_grad_(False)


def check_decoder(arch):
    """First sparse decode step (every group sparse: planned None) vs the fp32 reference, after a dense prompt."""
    m = tiny(arch)
    sets = {(i, k): ProjectionSparsity(threshold=0.2) for i in range(2) for k in ("q", "k", "v", "o", "gate", "up", "down")}
    dec = acttail.decoder(m, None, max_seq=32)
    dec.set_settings(sets)
    prompt = torch.randint(0, 512, (1, 6), device="cuda")
    dec.prefill(prompt)
    got = dec.forward_token(torch.tensor([[7]], device="cuda"), dec.pos)[0]
    ref_m = m.cuda()
    ref_m.setup_caches(1, 32)
    ref_m(prompt, torch.arange(6, device="cuda"))
    with ref_m.sparsified(Sparsifier(sets)):
        ref = ref_m(torch.tensor([[7]], device="cuda"), torch.tensor([6], device="cuda"))[0, -1]
    ref_m.clear_caches()
    dense = ref_m(torch.cat([prompt, torch.tensor([[7]], device="cuda")], 1))[0, -1]
    out = dec.generate(prompt, max_new_tokens=8)
    return dict(arch=arch, rel_err=rel(got, ref), plan_changes_logits=rel(ref, dense), generated=out[0].tolist())


def check_prepared():
    """PreparedLaunch (second and later calls: the compiled kernel directly) equals the one-shot launch."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for K, N, glu in ((4096, 12288, False), (4096, 22016, True), (11008, 4096, False)):
        wt = torch.randn(K, N, device="cuda", generator=g, dtype=torch.float16) / K ** 0.5
        t = torch.tensor([0.6] * (2 if glu else 1), device="cuda")
        bias = torch.randn(N, device="cuda", generator=g)
        prep = PreparedLaunch(wt, t, None, act="silu" if glu else None, bias=bias, locks=new_locks("cuda", N // 16 + 3))
        for B in (1, 4):
            for _ in range(3):
                x = torch.randn(B, K, device="cuda", generator=g, dtype=torch.float16)
                a = prep(x)
                b = sparse_glu(x, wt, t, bias=bias) if glu else sparse_linear(x, wt, t, bias=bias)
                rows.append(dict(K=K, N=N, glu=glu, B=B, bitwise=bool(torch.equal(a, b)), rel=rel(a, b),
                                 fast=prep.prepared(B)))
        x = torch.randn(1, K, device="cuda", generator=g, dtype=torch.float16)
        r = torch.randn(1, K, device="cuda", generator=g, dtype=torch.float16)
        nw = torch.rand(K, device="cuda", generator=g, dtype=torch.float16) + 0.5
        for _ in range(3):
            o1, o2 = torch.empty_like(x), torch.empty_like(x)
            a = prep(x, norm=(nw, 1e-5), residual=r, residual_out=o1)
            fn = (lambda *s, **k: sparse_glu(*s, **k)) if glu else sparse_linear
            b = fn(x, wt, t, bias=bias, norm=(nw, 1e-5), residual=r, residual_out=o2)
            rows.append(dict(K=K, N=N, glu=glu, B=1, fused_norm=True, bitwise=bool(torch.equal(a, b) and torch.equal(o1, o2))))
    return rows


def hf_tiny(arch="llama", hidden: int = 256, layers: int = 2):
    common = dict(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, eos_token_id=0,
                  bos_token_id=0, pad_token_id=0)
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[arch]
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg(**common, tie_word_embeddings=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if p.dim() == 1 and "norm" in n else torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def generated(model, prompt, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logits of each step [steps, vocab]) of 16 greedy tokens, eager or with the static cache."""
    kw = dict(cache_implementation="static") if static else {}
    out = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences[0, prompt.shape[1]:].clone(), torch.cat([s.float() for s in out.logits]).clone()


def agreement(a, b) -> dict:
    """Leading equal tokens of two generations, and the relative difference of their logits at each step
    whose prefix is still the same (step 0 is the prefill, eager in both; step 1 the first decode step)."""
    same = int((a[0] == b[0]).cumprod(0).sum())
    steps = range(min(same + 1, len(a[0])))
    return dict(leading_equal=same, step_rel=[round(rel(a[1][i], b[1][i]), 6) for i in steps])


def check_hf(arch, mode="reduce-overhead", hidden: int = 256, layers: int = 2):
    """apply's decode launches vs the reference path (eager); the compiled step (the launches as custom ops
    inside inductor's graphs) vs eager, each output cloned before the next call (a CUDA-graph output lives
    until the next replay); static-cache generation (transformers compiles the decode step) vs eager
    generation on the kernels, on the reference backend (what compilation changes without the kernels; and the
    static cache uncompiled) and dense (what compilation changes without a plan)."""
    from torch._dynamo.utils import counters

    fp32 = hf_tiny(arch, hidden, layers)
    ids = torch.randint(0, 512, (4, 64))
    plan = acttail.allocate(acttail.analyze(fp32, progress=False), 0.7, method="uniform")
    plan = acttail.calibrate(fp32, plan, ids, compensation="learned", steps=5, tokens=256, ctx=64, progress=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script (TRITON_INTERPRET=1)
    model = fp32.half().to(dev)
    prompt = torch.randint(0, 512, (1, 8), device=dev)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    step = lambda m, c: m(torch.tensor([[7]], device=dev), past_key_values=c).logits  # noqa: E731
    res = dict(arch=arch, mode=mode)
    with torch.no_grad(), acttail.apply(model, plan, backend="reference"):
        ref = step(model, copy.deepcopy(cache))
    with torch.no_grad(), acttail.apply(model, plan, backend="kernels") as handle:
        assert handle.launches, "no launches: the kernel backend did not engage"
        eager = step(model, copy.deepcopy(cache))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, fullgraph=True, mode=mode)
        comp = []
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            comp.append(compiled(model, copy.deepcopy(cache)).clone())
        res["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]  # inductor ran without CUDA graphs
        res["kernels_vs_reference"] = rel(eager, ref)
        res["compiled_vs_eager"] = [rel(c, eager) for c in comp]
        print(arch, json.dumps(res), flush=True)
        kernel_gen = generated(model, prompt, static=False)
        torch._dynamo.reset()
        res["kernels_static_vs_eager"] = agreement(generated(model, prompt, static=True), kernel_gen)
        print(arch, json.dumps(res), flush=True)
    with torch.no_grad(), acttail.apply(model, plan, backend="reference"):
        ref_gen = generated(model, prompt, static=False)
        torch._dynamo.config.disable = True  # the static cache alone, no compilation
        res["reference_static_uncompiled_vs_eager"] = agreement(generated(model, prompt, static=True), ref_gen)
        torch._dynamo.config.disable = False
        torch._dynamo.reset()
        res["reference_static_vs_eager"] = agreement(generated(model, prompt, static=True), ref_gen)
        res["kernels_vs_reference_eager_gen"] = agreement(kernel_gen, ref_gen)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, mode=mode)
        torch.compiler.cudagraph_mark_step_begin()
        res["reference_compiled_vs_eager"] = rel(compiled(model, copy.deepcopy(cache)).clone(), ref)
    with torch.no_grad():
        dense_gen = generated(model, prompt, static=False)
        torch._dynamo.reset()
        res["dense_static_vs_eager"] = agreement(generated(model, prompt, static=True), dense_gen)
    res["plan_changes_logits"] = rel(ref, step(model, copy.deepcopy(cache)))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", nargs="+", default=["decoder", "prepared", "hf"])
    ap.add_argument("--archs", nargs="+", default=["llama", "qwen2", "phi3"], help="transformers models of the hf check")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the hf check")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the hf check's models (heads of 64)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the hf check's models")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               torch=torch.__version__, transformers=transformers.__version__)
    sections = {"decoder": lambda: [check_decoder(a) for a in ARCHS], "prepared": check_prepared,
                "hf": lambda: [check_hf(a, args.compile_mode, args.hidden, args.layers) for a in args.archs]}
    for name, fn in ((s, sections[s]) for s in args.sections):
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001
            res[name] = dict(error=traceback.format_exc()[-4000:])
        print(name, f"{time.time() - t0:.0f} s", json.dumps(res[name])[:3000], flush=True)
        (out_dir / f"gpu_checks-{args.compile_mode}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
