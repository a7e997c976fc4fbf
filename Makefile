# Every target creates .venv on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision: exact pins for this CPU box come first so pip never resolves a newer CUDA build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-all train lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS) || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[dev,export,sweep]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not gpu"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

train: $(STAMP)
	$(BIN)/python -m ssd_lightning.train $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

bench: $(STAMP)
	$(BIN)/python scripts/bench_encoder.py
	$(BIN)/python scripts/bench_loss_postprocess.py
	$(BIN)/python scripts/bench_data.py
	$(BIN)/python scripts/bench_inference.py
	$(BIN)/python scripts/bench_eval.py
	$(BIN)/python scripts/bench_error_analysis.py
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf $(VENV) outputs multirun .cache
