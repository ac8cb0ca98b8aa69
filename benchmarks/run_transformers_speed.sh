#!/bin/sh
# The transformers-speed measurements (issue 18) in one device call, each step time-boxed so that one
# failure leaves the others' results. Run from the repository root on a CUDA machine with acttail importable
# without the repository root on sys.path (our top-level kernels/ would shadow transformers' `kernels`):
#   sh benchmarks/stage_tree.sh . /tmp/pkg && PYTHONPATH=/tmp/pkg OUT=results sh benchmarks/run_transformers_speed.sh
# Writes $OUT/chk/ (gpu_checks.py's transformers check: the kernels inside inductor's CUDA graphs against
# eager), $OUT/s7b/ (hf_speed.py, 7B shape, every way, 3 alternating rounds), $OUT/prof/ (hf_profile.py).
OUT=${OUT:-out/transformers-speed}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd benchmarks || exit 1
timeout 100 python3 gpu_checks.py --out "$OUT/chk" --sections hf --archs llama 2>&1 | grep -v -i warn | tail -3
timeout 330 python3 hf_speed.py --out "$OUT/s7b" --shapes 7b --rounds 3 2>&1 | grep -v -i warn | grep -E "tok/s|plan|FAIL|equal"
timeout 150 python3 hf_profile.py --out "$OUT/prof" --tokens 64 2>&1 | grep -v -i warn | grep -E "^## |decode steps|Cache Lookup"
