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

.PHONY: all install demo test test-main test-triton bench lint cuda-check cmake-check \
	package-check clean

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
	$(VENV)/bin/ruff check python tests benchmarks tools examples setup.py

# Compile the CUDA kernels and their bindings with plain nvcc (no GPU needed).
cuda-check: $(DEPS_STAMP)
	PYTHON=$(abspath $(PY)) tools/cuda_compile_check.sh

# Second build of the same sources with CMake (IDE integration, build check).
cmake-check: install
	cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) >/dev/null
	cmake --build build/cmake -j $(MAX_JOBS)

# Build the sdist, a wheel from that sdist (against the installed torch, CPU kernels only:
# about a minute on 2 cores), and check both: contents, metadata, and the unpacked wheel
# running on its own. A stale egg-info would add its old file list to the sdist: removed first.
PACKAGE_DIR := dist/package-check
package-check: $(DEPS_STAMP)
	rm -rf $(PACKAGE_DIR) python/*.egg-info && mkdir -p $(PACKAGE_DIR)
	$(PY) -c 'import setuptools.build_meta as b; b.build_sdist("$(PACKAGE_DIR)")' >/dev/null
	rm -rf python/*.egg-info
	DEEPPAR_NO_CUDA=1 $(PY) -m pip wheel --quiet --no-build-isolation --no-deps \
		-w $(PACKAGE_DIR) $(PACKAGE_DIR)/deeppar-*.tar.gz
	$(PY) tools/check_dist.py $(PACKAGE_DIR)/deeppar-*.tar.gz $(PACKAGE_DIR)/deeppar-*.whl

clean:
	rm -rf build dist python/*.egg-info python/deeppar/_C*.so $(BUILD_STAMP)
