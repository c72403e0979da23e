# Set-up is two commands: `make run` and `make test`. Both build .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
RUNS    ?= runs

.PHONY: run test test-cluster ui install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# torch first, pinned: a bare `torch` resolved by pip pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/unislim run pipeline.yaml --runs-dir $(RUNS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Driver kills, two drivers at once, a second Ray node: minutes each, so not part of `make test`.
test-cluster: $(STAMP)
	UNISLIM_CLUSTER_TESTS=1 $(BIN)/python -m pytest -q -m cluster tests

ui: $(STAMP)
	$(BIN)/unislim ui --runs-dir $(RUNS)

clean:
	rm -rf $(VENV)
