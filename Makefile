# fastsel developer entry points. `make test` and `make bench` work on a fresh machine:
# they create .venv, install the pinned dependencies and build the C++ extension first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_DEPS  := $(VENV)/.deps-installed
STAMP_BUILD := $(VENV)/.ext-built
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null) fastsel/contract.py csrc/write_contract_header.py

.PHONY: all setup build test test-fast test-triton bench train-bench gpu-check clean

all: test

$(STAMP_DEPS): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) setup.py pyproject.toml $(CSRC)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import fastsel, sys; info = fastsel.build_info(); print('fastsel extension:', info); sys.exit(0 if info['available'] else 1)"
	touch $@

setup: $(STAMP_DEPS)
build: $(STAMP_BUILD)

# The whole suite: the main process, then the Triton interpreter tests in their own
# process (TRITON_INTERPRET must be set before triton is imported).
test: build
	$(PY) -m pytest -q tests --ignore=tests/triton
	@if ls tests/triton/test_*.py >/dev/null 2>&1; then \
		TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests/triton; fi

test-fast: build
	$(PY) -m pytest -q -x -m "not slow" tests --ignore=tests/triton

# Both microbenchmarks, fastsel.score then the selection ops (bench/README.md): by default
# the headline shapes in a few minutes, written to bench/results/local/ (not tracked);
# `make bench FULL=1` runs the full grids (about 16 min on 2 cores) into bench/results/.
ifeq ($(FULL),1)
BENCH_ARGS :=
else
BENCH_ARGS := --representative --out bench/results/local
endif
bench: build
	$(PY) bench/bench_score.py $(BENCH_ARGS)
	$(PY) bench/bench_select.py $(BENCH_ARGS)

# End-to-end benchmark on Fashion-MNIST (bench/train_bench.py, fastsel/experiments): the
# verdict grid (3 seeds, 4 settings, 102 runs) takes about 52 min on 2 quiet cores;
# results in bench/results/train/.
# Installs Debian's dataset-fashion-mnist first when it is missing. Options:
# make train-bench TRAIN_BENCH_ARGS="--smoke" (or "--full", "--strategies uniform,mms", ...).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
train-bench: build
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		$(SUDO) apt-get install -y -qq dataset-fashion-mnist || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist); fi
	$(PY) bench/train_bench.py $(TRAIN_BENCH_ARGS)

# On a machine with a CUDA device: a venv with torch's CUDA build (.venv-gpu), the CUDA
# extension, the GPU-only tests and a short GPU benchmark, with a summary. Without a
# device it says so and exits 0 (bench/gpu_check.py).
gpu-check:
	$(PYTHON) bench/gpu_check.py

clean:
	rm -rf build fastsel/_C*.so *.egg-info $(STAMP_BUILD)
