# Two commands: `make demo` and `make test`. Both set up .venv first.
# TORCH pins the CPU wheel on CPU machines (it installs from local disk here); on a GPU
# machine pass e.g. TORCH="torch" to get the CUDA build your driver needs.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench,spatial]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/latentcell demo

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

docs: setup
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	$(BIN)/sphinx-build -b html docs docs/_build/html

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) latentcell_demo docs/_build
