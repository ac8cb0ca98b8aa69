#!/bin/sh
# Issue 22's quantized measurements in one device call, each step time-boxed: the sparse GEMV over fp16 /
# int8 / int4 / q4_1 weights (gpu_quantized.py --quick) and the 7B-shape decode step over int4 and q4_1 weights,
# dense and at 50% / 70% (gpu_e2e.py --weights). Same staging as run_transformers_speed.sh:
#   sh benchmarks/stage_tree.sh . /tmp/pkg && PYTHONPATH=/tmp/pkg OUT=results sh benchmarks/run_quantized.sh
OUT=${OUT:-out/quantized}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd benchmarks || exit 1
timeout 240 python3 gpu_quantized.py --out "$OUT/gemv" --quick 2>&1 | grep -v -i warn | grep -E " at |FAIL|Error"
for w in int4 q4_1; do
  timeout 165 python3 gpu_e2e.py --out "$OUT/e2e-$w" --only-7b --weights $w --sparsities 0.5 0.7 --steps current \
    --tokens 64 2>&1 | grep -v -i warn | grep -E "tok/s|Error"
done
