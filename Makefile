# `make run`: set up .venv (first time) and run the demo. `make test`: set up and run the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pinned: on these machines torch 2.13.0 is the CPU build from local disk; an
# unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: run test install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/elmforge train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf outputs data sweeps report .pytest_cache
