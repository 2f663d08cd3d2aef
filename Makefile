# Every target that runs code depends on `install`, so each works alone on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo lint format bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install
	WANDB_MODE=offline $(BIN)/python -m pytest -q

test-slow: install
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m slow

demo: install
	WANDB_MODE=offline $(BIN)/python trainer/run.py recipes/demo.yaml
	$(BIN)/python -m trainer.evaluate recipes/demo.yaml --checkpoint work_dirs/demo

bench: install
	$(BIN)/python benchmarks/model_speed.py --variants default fp32
	$(BIN)/python benchmarks/data_loader.py
	$(BIN)/python benchmarks/eval_speed.py --images 1000

lint: install
	$(BIN)/ruff check trainer tests
	$(BIN)/ruff format --check trainer tests

format: install
	$(BIN)/ruff check --fix trainer tests
	$(BIN)/ruff format trainer tests

clean:
	rm -rf $(VENV) work_dirs *.egg-info
