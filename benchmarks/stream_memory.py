"""Peak memory and time of calibration and evaluation with the whole model on the GPU vs streamed one decoder
block at a time (``acttail calibrate --stream``), on random checkpoints of real shapes written to disk.

    python benchmarks/stream_memory.py --out OUT [--shapes 7b 13b] [--tokens 4096]

Each shape is written as an HF folder (bf16 safetensors, one shard per 4 layers), then: open + calibrate
(thresholds, 50% uniform) + evaluate, once with the whole model loaded in float32 on the GPU and once
streamed; peak GPU memory (torch.cuda.max_memory_allocated), peak host memory (ru_maxrss) and seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

SHAPES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
          "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40)}


def write_checkpoint(folder: Path, shape: dict, vocab: int = 32000, per_shard: int = 4) -> Path:
    """A random Llama-shaped HF folder in bf16 (N(0, 1/fan_in) matrices, unit norms)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d, inter, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, "hidden_act": "silu", **shape}
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, generator=g, device="cuda") * s[-1] ** -0.5).to(torch.bfloat16).cpu()

    weight_map = {}
    for first in range(0, n, per_shard):
        t = {}
        for i in range(first, min(n, first + per_shard)):
            p = f"model.layers.{i}"
            for k in "qkvo":
                t[f"{p}.self_attn.{k}_proj.weight"] = rnd(d, d)
            t[f"{p}.mlp.gate_proj.weight"] = rnd(inter, d)
            t[f"{p}.mlp.up_proj.weight"] = rnd(inter, d)
            t[f"{p}.mlp.down_proj.weight"] = rnd(d, inter)
            t[f"{p}.input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
            t[f"{p}.post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        if first == 0:
            t["model.embed_tokens.weight"] = rnd(vocab, d)
            t["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
            t["lm_head.weight"] = rnd(vocab, d)
        name = f"model-{first // per_shard:05d}.safetensors"
        save_file(t, str(folder / name))
        weight_map.update({k: name for k in t})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def measure(folder: Path, stream: bool, tokens: int) -> dict:
    """Open, calibrate 50% uniform thresholds and evaluate on random tokens; peak memory and seconds."""
    from acttail.calibration import fit_thresholds
    from acttail.evaluation import evaluate_windows
    from acttail.runtime import open_model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    _, model = open_model(folder, device="cuda", stream=stream)
    t1 = time.time()
    wins = torch.randint(0, model.args.vocab_size, (tokens // 512, 512), generator=torch.Generator().manual_seed(1))
    targets = {(i, k): 0.5 for i in range(model.args.n_layer) for k in ("q", "k", "v", "o", "gate", "up", "down")}
    found = fit_thresholds(model, wins, targets, progress=False)
    t2 = time.time()
    from acttail.runtime.sparsify import ProjectionSparsity, Sparsifier

    with model.sparsified(Sparsifier({k: ProjectionSparsity(threshold=r["threshold"]) for k, r in found.items()})):
        ppl = evaluate_windows(model, wins, None, progress=False)["perplexity"]
    t3 = time.time()
    out = {"stream": stream, "tokens": int(wins.numel()), "open_s": t1 - t0, "calibrate_s": t2 - t1,
           "evaluate_s": t3 - t2, "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
           "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "perplexity": ppl, "max_abs_dev": max(abs(r["achieved"] - 0.5) for r in found.values())}
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="+", default=["7b", "13b"], choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--scratch", default="/tmp/stream_memory")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in args.shapes:
        folder = Path(args.scratch) / name
        t0 = time.time()
        write_checkpoint(folder, SHAPES[name])
        written = time.time() - t0
        for stream in (True, False):  # streamed first: its host peak is not inflated by the whole-model run
            r = {"shape": name, "write_s": written, **measure(folder, stream, args.tokens)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        shutil.rmtree(folder)
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "stream_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
