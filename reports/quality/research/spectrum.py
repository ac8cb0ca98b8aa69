"""Weight-spectrum arithmetic for low-rank compensation at equal bytes (item 6), CPU only.

For every projection of SmolLM2-135M and Qwen2.5-Coder-0.5B (fp32 safetensors converted by acttail from the
GGUFs): the fraction of Frobenius energy of W captured by its top-r singular directions, and the byte cost
of the factors r (d_in + d_out) / (d_in d_out). For input-isotropic dropped activations, the share of the
dropped output error that a rank-r R-Sparse term removes equals the captured energy; the byte cost has to be
paid by dropping more activations. Writes research/out/spectrum.json and prints a table per model and kind.
"""

import json
import os
import sys

import torch
from safetensors import safe_open

MODELS = {
    "smollm2-135m": os.path.expanduser("~/.cache/acttail/models/smollm2-135m/model.safetensors"),
    "qwen2.5-coder-0.5b": os.path.expanduser("~/.cache/acttail/models/qwen2.5-coder-0.5b/model.safetensors"),
}
RANKS = (8, 16, 32, 64, 128)
KIND = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

torch.set_num_threads(2)
out = {}
for name, path in MODELS.items():
    f = safe_open(path, "pt")
    layers = sorted({int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")})
    res = {}
    for kind, suffix in KIND.items():
        rows = []
        for l in layers:
            W = f.get_tensor(f"model.layers.{l}.{suffix}.weight").double()
            sv = torch.linalg.svdvals(W)
            e = sv.pow(2)
            cum = torch.cumsum(e, 0) / e.sum()
            d_out, d_in = W.shape
            rows.append({"layer": l, "shape": [d_out, d_in],
                         "captured": {r: float(cum[min(r, len(cum)) - 1]) for r in RANKS},
                         "cost": {r: r * (d_in + d_out) / (d_in * d_out) for r in RANKS}})
        res[kind] = rows
        cap = {r: sum(x["captured"][r] for x in rows) / len(rows) for r in RANKS}
        print(f"{name:20s} {kind:5s} {str(rows[0]['shape']):12s} " + "  ".join(
            f"r{r}: {100 * cap[r]:5.1f}% / {100 * rows[0]['cost'][r]:5.1f}%B" for r in RANKS), flush=True)
    out[name] = res
os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"), exist_ok=True)
json.dump(out, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "spectrum.json"), "w"))
