"""Registers and spills of the sparse GEMV for sm_90, compiled offline (no GPU, no torch).

Triton compiles the kernel for a Hopper target on any machine and its bundled ptxas reports the resources;
with the device's Triton version (3.6.0 on the lent H100/H200 image) the counts matched the loaded kernels
in reports/gpu/issue12 (168 registers for one token, 204 for the SwiGLU launch without a cap, 120 with the
8-row accumulator). Use it to check a change before spending device time:

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    PYTHONPATH=. /tmp/t36/bin/python benchmarks/compile_sm90.py [K N KC RB maxnreg glu]
"""

import os
import re
import subprocess
import sys
import tempfile
from unittest.mock import MagicMock

for _m in ("torch", "torch.nn", "torch.nn.functional"):  # the kernel module needs torch only at launch
    sys.modules.setdefault(_m, MagicMock())

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402


def source(fn, args, constexprs):
    """ASTSource specialised as a launch would be: pointers 16-byte aligned, ints of 1 constant."""
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], cx[(i,)] = "constexpr", constexprs[name]
            continue
        v = args[name]
        if isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], cx[(i,)] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, cx, attrs)


def ptxas_resources(ptx):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return int(regs.group(1)) if regs else None, spill.groups() if spill else None


def gemv(K, N, KC, RB=1, maxnreg=None, glu=False, B=1, BK=64, BN=128, dtype="*fp16"):
    """Compile _sparse_gemv_kernel as _launch would for one projection (or a [gate | up] pair)."""
    from acttail.kernels.sparse_gemv import _sparse_gemv_kernel
    nb = triton.cdiv(N, BN)
    args = dict(x_ptr=dtype, stride_xb=K, w_ptr=dtype, stride_wk=N, t_ptr="*fp32", stride_tp=1, stride_tb=0,
                y_ptr=dtype, stride_yb=N, part_ptr="*fp32", idx_ptr="*i32", lock_ptr="*i32", B=B, K=K, N=N,
                N1=N // 2 if glu else N, N2=N, NB1=nb // 2 if glu else nb, NB2=nb)
    cx = dict(SPLIT=triton.cdiv(K, KC), GLU=glu, BLOCK_B=1 if B == 1 else 16, KC=KC,
              KCP=triton.next_power_of_2(KC), BK=BK, BN=BN, DOT_F32=False, RB=RB if B == 1 else 1, PDL=True)
    options = dict(num_warps=4, num_stages=1 if B == 1 else 3)
    if maxnreg:
        options["maxnreg"] = maxnreg
    k = triton_compile(source(_sparse_gemv_kernel, args, cx), target=GPUTarget("cuda", 90, 32), options=options)
    return ptxas_resources(k.asm["ptx"])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        K, N, KC, RB, regs, glu = (int(a) for a in sys.argv[1:7])
        print(gemv(K, N, KC, RB, regs or None, bool(glu)))
    else:
        for K, N, KC, RB, regs, glu in [(4096, 11008, 1024, 1, None, False), (4096, 22016, 2048, 1, None, True),
                                        (4096, 22016, 2048, 1, 168, True), (4096, 11008, 1024, 8, 128, False),
                                        (4096, 22016, 2048, 8, 128, True)]:
            r, s = gemv(K, N, KC, RB, regs, glu)
            print(f"{K}x{N} KC={KC} RB={RB} maxnreg={regs} glu={glu}: {r} registers, spills {s}")
