# One-command set-up: every target below creates .venv, installs the dependencies and builds
# deeppar (with its native extension) first, and does so only once (stamp files).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.deeppar-built
NATIVE_SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: all install demo test test-main test-triton bench lint cuda-check cmake-check clean

all: install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILD_STAMP)

demo: install
	$(VENV)/bin/deeppar demo

# The whole test suite, then the Triton kernels again under Triton's CPU interpreter.
test: test-main test-triton

test-main: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-triton: install
	DEEPPAR_TRITON_INTERPRET=1 $(PY) -m pytest -m triton $(PYTEST_ARGS)

bench: install
	@set -e; for script in benchmarks/bench_*.py; do \
		echo "== $$script"; $(PY) $$script; done

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check python tests benchmarks setup.py

# Compile the CUDA kernels and their bindings with plain nvcc (no GPU needed).
cuda-check: $(DEPS_STAMP)
	PYTHON=$(abspath $(PY)) tools/cuda_compile_check.sh

# Second build of the same sources with CMake (IDE integration, build check).
cmake-check: install
	cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) >/dev/null
	cmake --build build/cmake -j $(MAX_JOBS)

clean:
	rm -rf build dist python/*.egg-info python/deeppar/_C*.so $(BUILD_STAMP)
