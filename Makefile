# Two commands for a fresh machine with Python >= 3.10:
#   make demo   the MNIST demo (extra flags: make demo ARGS="--epochs 1")
#   make test   ruff and the tests
# Each creates the virtual environment .venv, or updates it when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jbn-installed

.PHONY: demo test venv clean-venv

demo: $(STAMP)
	$(PY) train_mnist.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
