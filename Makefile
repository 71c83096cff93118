# The two commands a new user needs (README): `make run` and `make test`.
# Both create the virtual environment at .venv/ first if it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PARAMS ?= params.yaml
# Where the torch wheel comes from. On this workplace's machines pip finds the 2.13.0 CPU wheel
# on disk; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU) or
# https://pypi.org/simple (GPU: PyPI's CUDA 13 build, the image's; driver >= 580, README "GPU install").
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# llama-cpp-python has no wheel on the index: pip compiles llama.cpp (~6 min on 2 quiet cores, ~18 min
# on busy ones; pip's wheel cache makes a reinstall on the same machine instant). A CPU build, whatever
# GPU toolkits the machine has.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_CUDA=OFF -DGGML_HIP=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_SYCL=OFF \
	-DGGML_OPENCL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF
PYTEST_ARGS ?=

.PHONY: setup run lint test test-fast services services-stop clean

$(BIN)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/pip install --quiet -r requirements.lock -c constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/dvc config --global core.analytics false >/dev/null 2>&1 || true
	touch $@

setup: $(BIN)/.installed

## Whole DAG on the tiny CPU profile (local Ray, local MLflow store, local DVC cache).
run: setup
	$(BIN)/python -m flows.pipeline --params $(PARAMS)

## The linter, then the whole test suite, slow end-to-end tests included (pytest's "no tests" exit 5 is a failure).
test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

services: setup
	infra/local/services.sh start

services-stop:
	infra/local/services.sh stop

clean:
	rm -rf $(VENV)
