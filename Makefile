VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint quickstart bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint:
	$(PY) -m ruff check src tests

test: lint
	$(PY) -m pytest

quickstart:
	$(PY) -m src.train experiment=quickstart

clean:
	rm -rf outputs multirun .pytest_cache
