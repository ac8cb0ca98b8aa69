"""Benchmark: `acttail analyze` vs weightwatcher's default analyze(), side by side in one run.

1. SmolLM2-135M (the real converted checkpoint): both tools on all 210 projections; per-matrix alpha
   agreement (median and max |difference|).
2. A Llama-2-7B-shaped model (hidden 4096, intermediate 11008, bf16 random weights written to safetensors
   by this script): both tools on one full layer (7 matrices); ours on the whole model (``--layers 32``,
   e.g. on a GPU with ``--device cuda``), safetensors reads included.

Prints a markdown table; ``--out FILE`` also writes it, headed by the versions of both tools and of
powerlaw (weightwatcher's fitter: powerlaw 2.0 makes it several times faster than 1.5) and the load
average before and after. Timings are wall-clock, on whatever else the machine is doing: the ratios are
what matter, since both tools run in the same conditions. Checkpoint fingerprints (a sha256 of the weights,
cached after a model's first run) are computed before the timed runs and reported on their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from acttail.analysis import analyze_checkpoint, settings
from acttail.checkpoint import Checkpoint
from acttail.esd import eigenvalues

SMOLLM2 = Path.home() / ".cache" / "acttail" / "models" / "smollm2-135m"


def write_7b_shaped(folder: Path, layers: int, device: str = "cpu", seed: int = 0) -> Path:
    """A Llama-2-7B-shaped decoder (only the 7 projections per layer) with random bf16 weights (drawn on
    ``device``, which is faster on a GPU), one shard per layer, plus config.json."""
    hidden, inter = 4096, 11008
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(seed)
    weight_map = {}
    for i in range(layers):
        fname = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        t = {f"model.layers.{i}.{n}.weight": (torch.randn(*s, generator=g, device=device) * 0.02)
             .to(torch.bfloat16).cpu() for n, s in shapes.items()}
        save_file(t, str(folder / fname))
        weight_map.update({n: fname for n in t})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32}))
    return folder


def time_ours(folder: Path, device: str, layers: int | None = None, workers: int | None = None
              ) -> tuple[float, list[float]]:
    """Seconds for our analysis of the first ``layers`` layers (all if None), reads included; alphas."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    ckpt = Checkpoint.open(folder)
    if layers is not None:
        ckpt.num_layers = layers
    doc = analyze_checkpoint(ckpt, settings("ks", "float32", device), progress=False, workers=workers)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, [r["alpha"] for r in doc["projections"]]


def time_weightwatcher(folder: Path, layers: int | None = None) -> tuple[float, list[float]]:
    """Seconds for ONE weightwatcher default analyze() of a module holding the same matrices as nn.Linear
    layers (the matrices are read first, untimed: weightwatcher needs a model in memory); its alphas."""
    import weightwatcher as ww

    ckpt = Checkpoint.open(folder)
    projs = [p for p in ckpt.projections() if layers is None or p.layer < layers]
    linears = []
    for p in projs:
        lin = torch.nn.Linear(p.in_features, p.out_features, bias=False)
        lin.weight.data = ckpt.load(p).float()
        linears.append(lin)
    t = time.perf_counter()
    df = ww.WeightWatcher(model=torch.nn.Sequential(*linears)).analyze()
    elapsed = time.perf_counter() - t
    if len(df) != len(projs):
        raise RuntimeError(f"weightwatcher analysed {len(df)} of {len(projs)} matrices")
    return elapsed, df["alpha"].tolist()


def versions() -> str:
    """The installed versions of the packages that decide the timings."""
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    return ", ".join(f"{n} {version(n)}" for n in ("acttail", "weightwatcher", "powerlaw", "torch", "numpy", "scipy"))


def fingerprint_seconds(folder: Path) -> float:
    """Seconds to open a checkpoint, its fingerprint included; later opens reuse the cached hashes."""
    t = time.perf_counter()
    Checkpoint.open(folder)
    return time.perf_counter() - t


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def agreement(a: list[float], b: list[float]) -> str:
    d = np.abs(np.array(a) - np.array(b))
    return f"median {np.median(d):.1e}, max {np.max(d):.1e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=1, help="layers of the 7B-shaped model analysed by us")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-reference", action="store_true", help="do not run weightwatcher")
    ap.add_argument("--compare-workers", type=int, nargs="*", default=[],
                    help="also time the whole model with these worker counts")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    rows = ["# ESD analysis speed: acttail vs weightwatcher",
            "", f"{date.today()}, {platform.node()} ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads), device {args.device}"
            + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
            "", f"versions: {versions()}", "", f"load average (1/5/15 min) at the start: {load()}", "",
            "| workload | acttail | weightwatcher | speed-up | alpha agreement |", "|---|---|---|---|---|"]
    notes = []
    eigenvalues(torch.randn(256, 512), device=args.device)  # warm-up: library loading, CUDA context
    if not args.skip_smollm2 and SMOLLM2.is_dir():
        notes.append(f"fingerprint of SmolLM2-135M, untimed above: {fingerprint_seconds(SMOLLM2):.1f} s")
        t_ours, a_ours = time_ours(SMOLLM2, args.device)
        if args.skip_reference:
            rows.append(f"| SmolLM2-135M, 210 matrices | {t_ours:.1f} s | - | - | - |")
        else:
            t_ww, a_ww = time_weightwatcher(SMOLLM2)
            rows.append(f"| SmolLM2-135M, 210 matrices | {t_ours:.1f} s | {t_ww:.1f} s | {t_ww / t_ours:.1f}x | "
                        f"{agreement(a_ours, a_ww)} |")
        print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_7b_shaped(Path(tmp) / "llama7b", args.layers, args.device)
        notes.append(f"fingerprint of the 7B-shaped model ({args.layers} layer(s)), untimed above: "
                     f"{fingerprint_seconds(folder):.1f} s")
        t1, a1 = time_ours(folder, args.device, 1)
        if args.skip_reference:
            rows.append(f"| 7B-shaped, 1 layer (7 matrices, bf16) | {t1:.1f} s | - | - | - |")
        else:
            t_ww, a_ww = time_weightwatcher(folder, 1)
            rows.append(f"| 7B-shaped, 1 layer (7 matrices, bf16) | {t1:.1f} s | {t_ww:.1f} s | {t_ww / t1:.1f}x | "
                        f"{agreement(a1, a_ww)} |")
        if args.layers > 1:
            tn, an = time_ours(folder, args.device)
            rows.append(f"| 7B-shaped, {args.layers} layers ({7 * args.layers} matrices) | {tn:.1f} s | - | - | - |")
            for w in args.compare_workers:
                tw, aw = time_ours(folder, args.device, workers=w)
                rows.append(f"| same, {w} worker(s) instead of the default | {tw:.1f} s | - | - | "
                            f"{agreement(an, aw)} vs default |")
    rows += ["", f"load average at the end: {load()}", ""] + notes
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
