# Two commands do all the set-up: `make train` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: venv train train-reader test test-all lint format ui clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

## Train the default experiment on the built-in synthetic data, tracked in ./mlflow.db + ./mlruns.
train: $(STAMP)
	$(VENV)/bin/cartridgeocr-train $(ARGS)

## After `make train`: fine-tune the pretrained PP-OCRv6 tiny recogniser on synthetic strips (the default reader
## recipe, within 60 minutes on 2 CPU cores), tracked in the same store. Read with it:
##   cartridgeocr-predict run_id=<detector run> input=photos/ ocr=learned ocr.run_id=<this run>
train-reader: $(STAMP)
	$(VENV)/bin/cartridgeocr-train-recogniser recogniser=ppocr_v6_tiny $(ARGS)

## Run the test suite (the same command CI runs).
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

## The suite plus the tests marked slow (longer variants of what `make test` covers).
test-all: $(STAMP)
	$(PY) -m pytest -q --run-slow $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cartridgeocr hydra_plugins tests benchmarks scripts
	$(VENV)/bin/ruff format --check cartridgeocr hydra_plugins tests benchmarks scripts

format: $(STAMP)
	$(VENV)/bin/ruff format cartridgeocr hydra_plugins tests benchmarks scripts
	$(VENV)/bin/ruff check --fix cartridgeocr hydra_plugins tests benchmarks scripts

## Open the MLflow UI on this folder's runs.
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlruns
