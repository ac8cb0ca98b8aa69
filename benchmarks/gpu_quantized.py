"""Sparse decode over quantized weights, one GPU, one run (issue 22): our sparse GEMV on fp16, int8 (per output
channel), int4 (groups of input rows) and q4_1 (GGUF's grid) weights, beside dense cuBLAS on the fp16 weights and our kernel with
every row kept on the same quantized bytes (the dense GEMV of that layout), with each format's floor.

Each configuration is checked against its torch reference (the dequantized weights) first; times are CUDA-graph
replays of many calls rotating through weight copies (gpu_kernels.time_graph: L2 never serves a repeat), batch 1,
one threshold zeroing the given fraction of the input. The floor of a call: the bytes it must read (kept rows of
the weights, their scales, x and y) over the device's copy bandwidth.

    cd benchmarks && python3 gpu_quantized.py --out OUT [--quick]
    cd benchmarks && TRITON_INTERPRET=1 python3 gpu_quantized.py --out OUT --cpu-check   # the paths, no timing

Writes OUT/quantized.json and OUT/quantized.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from acttail.kernels import INT4_GROUP, quantize, sparse_linear, sparse_linear_ref
from gpu_kernels import rel_err, threshold_for

SHAPES = [(4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
SPARSITIES = [0.0, 0.3, 0.5, 0.7, 0.9]
FORMATS = ("fp16", "int8", "int4-g32", "int4-g128", "q4_1")
ROTATE_BYTES = 512e6


def weights(fmt: str, wt: torch.Tensor) -> dict:
    """The launch arguments of wt [K, N] fp16 in format fmt: the stored weights, scales and group."""
    if fmt == "fp16":
        return dict(wt=wt)
    q, s, group = quantize(wt, fmt.split("-g")[0], int(fmt.split("-g")[1]) if "-g" in fmt else INT4_GROUP)
    return dict(wt=q, scales=s, group=group)


def stored_bytes(w: dict, rows: float) -> float:
    """Bytes read for a fraction ``rows`` of the input rows: weights and (int4) their group scales."""
    q = w["wt"]
    total = q.numel() * q.element_size() * rows
    if "scales" in w:
        s = w["scales"]
        total += s.numel() * s.element_size() * (rows if w["group"] else 1.0)
    return total


def call_of(x, t, w):
    return lambda i: sparse_linear(x, w[i]["wt"], t, scales=w[i].get("scales"), group=w[i].get("group"))


def bench(K: int, N: int, s: float, copies: list, dense: list, bw: float, timer) -> list[dict]:
    x = torch.randn(1, K, device=copies[0]["fp16"]["wt"].device, dtype=torch.float16)
    t_val = threshold_for(x, s)
    t = torch.tensor([t_val], device=x.device)
    keep = (x.float().abs() > t_val).float().mean().item()
    n = len(copies)
    t_dense = timer(lambda i: F.linear(x, dense[i]), n)
    rows = []
    for fmt in FORMATS:
        w = [c[fmt] for c in copies]
        ref = sparse_linear_ref(x, w[0]["wt"], t, scales=w[0].get("scales"), group=w[0].get("group"))
        err = rel_err(call_of(x, t, w)(0), ref)
        us = timer(call_of(x, t, w), n)
        us_all_rows = timer(call_of(x, torch.tensor([-1.0], device=x.device), w), n)
        need = stored_bytes(w[0], keep) + (K + N) * 2
        rows.append(dict(in_features=K, out_features=N, sparsity=s, kept=keep, format=fmt, rel_err=err, us=us,
                         us_every_row=us_all_rows, us_cublas_fp16=t_dense, floor_us=need / bw * 1e6,
                         x_floor=us / (need / bw * 1e6), vs_cublas_fp16=t_dense / us, vs_every_row=us_all_rows / us))
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Sparse GEMV over quantized weights (batch 1)", "", f"- device: {meta['device']}; {meta['versions']}",
             f"- date: {meta['date']}; copy bandwidth {meta['bw_TBps']:.2f} TB/s", f"- command: `{meta['command']}`", "",
             "| in x out | sparsity | format | us | us, every row (dense, same bytes) | cuBLAS fp16 us | vs cuBLAS fp16 "
             "| vs every row | floor us | % of floor | rel err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['in_features']} x {r['out_features']} | {r['sparsity']:.0%} | {r['format']} | {r['us']:.1f} | "
                     f"{r['us_every_row']:.1f} | {r['us_cublas_fp16']:.1f} | {r['vs_cublas_fp16']:.2f}x | "
                     f"{r['vs_every_row']:.2f}x | {r['floor_us']:.1f} | {100 / r['x_floor']:.0f}% | {r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="two shapes, three sparsities")
    ap.add_argument("--cpu-check", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), no timing")
    args = ap.parse_args()
    shapes, sparsities = (SHAPES[:2], [0.0, 0.5, 0.9]) if args.quick else (SHAPES, SPARSITIES)
    if args.cpu_check:
        shapes, sparsities, dev = [(96, 64)], [0.0, 0.5], "cpu"
        bw, timer = 1e11, lambda call, n: _cpu_us(call)
        meta = dict(device="cpu (interpreter)", versions=f"torch {torch.__version__}")
    else:
        from gpu_kernels import copy_bandwidth, time_graph, warm_up
        import triton

        dev = "cuda"
        warm_up()
        bw, timer = copy_bandwidth(), lambda call, n: time_graph(call, n)[0]
        meta = dict(device=torch.cuda.get_device_name(), versions=f"torch {torch.__version__}, triton {triton.__version__}")
    meta.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), bw_TBps=bw / 1e12,
                command="python " + " ".join(sys.argv))
    rows = []
    for K, N in shapes:
        n = 1 if args.cpu_check else max(2, math.ceil(ROTATE_BYTES / (K * N * 2)))
        torch.manual_seed(0)
        wts = [torch.randn(K, N, device=dev, dtype=torch.float16) / K ** 0.5 for _ in range(n)]
        copies = [{fmt: weights(fmt, wt) for fmt in FORMATS} for wt in wts]
        dense = [wt.t().contiguous() for wt in wts]
        for s in sparsities:
            rows += bench(K, N, s, copies, dense, bw, timer)
            print(f"{K} x {N} at {s:.0%}: " + ", ".join(f"{r['format']} {r['us']:.1f} us ({r['vs_cublas_fp16']:.2f}x "
                                                        f"cuBLAS fp16)" for r in rows[-len(FORMATS):]), flush=True)
        del wts, copies, dense
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "quantized.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


def _cpu_us(call) -> float:
    t0 = time.perf_counter()
    call(0)
    return (time.perf_counter() - t0) * 1e6


if __name__ == "__main__":
    main()
