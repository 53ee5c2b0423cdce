# Two commands set up a fresh machine and do the work:
#   make train [DATA_DIR=...] [ARGS="--epochs 5"]   the seed experiment as an MLflow run
#   make test                                       the test suite
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= data
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test ui install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/cifar-exp train --data-dir $(DATA_DIR) --download $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

ui: $(STAMP)
	$(BIN)/cifar-exp ui

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
