# Set-up and entry points. Each target creates the project's virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo demo-simclr test lint bench

$(VENV)/installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/installed

# SupCon on the handwritten digits that ship with scikit-learn: no download, under 2 minutes on
# 2 cores. demo-simclr trains SimCLR on the same data in about 4 minutes.
demo: venv
	$(PY) run.py --config supclr_digits.yaml

demo-simclr: venv
	$(PY) run.py --config simclr_digits.yaml

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/loss_bench.py
	$(PY) benchmarks/augment_bench.py
	$(PY) benchmarks/train_bench.py
