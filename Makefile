# Herd: two commands for a fresh machine: `make demo` and `make test`.
# Both set up .venv first: the pinned CPU torch, then the project with its dev extras,
# every pip call constrained by constraints.txt (so pip never resolves a CUDA torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := constraints.txt

export HERD_CACHE_DIR ?= $(CURDIR)/.cache/herd
# DeepSpeed's compiled CPU ops are kept per virtual environment (its torch/DeepSpeed), built once.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@echo "==> setting up $(VENV) (pinned CPU torch, then Herd and its dev extras)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 -c $(CONSTRAINTS)
	$(PIP) install -q -e '.[dev]' -c $(CONSTRAINTS)
	@touch $@

$(TORCH_EXTENSIONS_DIR)/.warm: $(VENV)/.installed
	@echo "==> compiling DeepSpeed's CPU ops once per virtual environment (a few minutes the first time)"
	$(PY) -m jobs.warmup
	@mkdir -p $(TORCH_EXTENSIONS_DIR) && touch $@

setup: $(VENV)/.installed $(TORCH_EXTENSIONS_DIR)/.warm

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m cluster.demo

bench: setup
	$(PY) bench/train.py
	$(PY) bench/serve.py

clean:
	rm -rf .herd .cache
