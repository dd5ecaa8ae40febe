# Developer shortcuts; each target is the command the README documents.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint bench demo
install:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install torch==2.14.1 torchvision==0.29.1 && $(VENV)/bin/pip install -e '.[offline,hf,spark,dev]'

demo: install
	$(VENV)/bin/clipline demo clipline-demo

test:
	$(PY) -m pytest

# Everything not marked slow (docs/TESTING.md); CI runs the whole suite.
test-fast:
	$(PY) -m pytest -m "not slow"

lint:
	$(VENV)/bin/ruff check pipeline tests jobs bench
	$(VENV)/bin/ruff format --check pipeline tests jobs bench
	$(VENV)/bin/mypy pipeline

bench:
	$(PY) bench/run_all.py
