#!/bin/sh
# The quality study and its speed and memory companions on a CUDA machine, as run for reports/quality/
# (repository root; GGUFs of SmolLM2-135M and Qwen2.5-Coder-0.5B at $GGUF/smol.gguf and $GGUF/qwen.gguf,
# texts wiki/c4/technical in $ACTTAIL_CACHE/text; results under $RESULTS):
#   GGUF=... ACTTAIL_CACHE=... RESULTS=... sh benchmarks/run_quality.sh
set -e
export PYTHONUNBUFFERED=1
M=$ACTTAIL_CACHE/models
mkdir -p "$RESULTS" "$M"
[ -d "$M/smollm2-135m" ] || acttail convert-gguf "$GGUF/smol.gguf" "$M/smollm2-135m"
[ -d "$M/qwen2.5-coder-0.5b" ] || acttail convert-gguf "$GGUF/qwen.gguf" "$M/qwen2.5-coder-0.5b"
[ -f "$RESULTS/e2e/e2e.json" ] || python3 benchmarks/gpu_e2e.py --out "$RESULTS/e2e" --only-7b \
    --sparsities 0.3 0.4 0.5 0.6 0.7 0.9
python3 benchmarks/quality_study.py --model "$M/smollm2-135m" --name smollm2-135m --out "$RESULTS/smollm2-135m" \
    --device cuda
python3 benchmarks/quality_study.py --model "$M/qwen2.5-coder-0.5b" --name qwen2.5-coder-0.5b \
    --out "$RESULTS/qwen2.5-coder-0.5b" --device cuda --greedy-step 0.05 --greedy-tokens 4096 \
    --rows "TEAL (uniform, magnitude, none)" greedy "greedy + learned (default)"
python3 benchmarks/stream_memory.py --out "$RESULTS/stream" --shapes ${STREAM_SHAPES:-7b 13b}
echo PIPELINE DONE
