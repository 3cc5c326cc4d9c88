# Two commands on a fresh machine: `make up` (whole stack on the embedded default) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk (pip's constraint file); installing it first keeps pip from
# pulling a multi-gigabyte CUDA build when the project's `torch>=2.4` is resolved.
TORCH_SPEC ?= torch==2.13.0
# `make up PORT=8001` serves the API on another port (default: DGSERVE_API_PORT, else 8000).
PORT ?=

.PHONY: install up test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

up: install
	$(BIN)/dgserve up $(if $(PORT),--port $(PORT))

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
