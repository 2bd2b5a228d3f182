# Every target builds or refreshes .venv itself: a fresh machine needs only python3 + pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lazymerge.demo .demo

# Every test but the rotating cross-checks (heavy extra cases of checks that run anyway),
# plus one slice of those (about a third), by commit (tests/conftest.py). test-all runs all.
# One pytest-xdist worker per core, a test file's tests on one worker (its module
# fixtures prepare every case at once): 3.6 min against 8 min serially on 2 cores.
# PYTEST_ARGS="" runs serially.
PYTEST_ARGS ?= -n auto --dist loadfile

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	LAZYMERGE_ALL_TESTS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# 13B-shaped merges at 2, 4 and 8 layers vs a plain copy and mergekit (~30 GB of disk
# at 8 layers, freed after each run). BENCH_ARGS="--layers 2 --no-mergekit" to narrow it.
bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[bench]" "$(TORCH_PIN)"
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lazymerge tests benchmarks
	$(BIN)/ruff format --check lazymerge tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
