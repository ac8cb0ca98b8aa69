#!/bin/sh
# All GPU measurements and checks (run from the repository root on a CUDA machine).
#   OUT=results sh benchmarks/run_gpu.sh
# Writes $OUT/e2e/e2e.{md,json}, $OUT/e2e-ctx2048/ (a 2048-token prompt), $OUT/kernels/kernels.{md,json}, $OUT/cli.log (the GPU CLI tests) and, when a copy of
# TEAL's kernels/ is in $TEAL (default .teal, git-ignored), $OUT/tail/tail.json; logs to $OUT/*.log.
set -e
OUT=${OUT:-out/gpu}
TEAL=${TEAL:-.teal}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_e2e.py --out "$OUT/e2e" 2>&1 | tee "$OUT/e2e.log"
python3 benchmarks/gpu_e2e.py --out "$OUT/e2e-ctx2048" --context 2048 --sparsities 0.5 0.9 \
  --steps current "one attention program" unfused 2>&1 | tee "$OUT/e2e-ctx2048.log"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_cli.py 2>&1 | tee "$OUT/cli.log"
python3 benchmarks/gpu_kernels.py --out "$OUT/kernels" 2>&1 | grep -v '^check' | tee "$OUT/kernels.log"
if [ -d "$TEAL/kernels" ]; then
  python3 benchmarks/gpu_tail.py --teal "$TEAL" --out "$OUT/tail" 2>&1 | tee "$OUT/tail.log"
fi
