# Quick start: `make demo` runs the demo, `make test` runs the whole test suite.
# Both create the virtual environment (.venv) and build the native trap hook first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

demo: $(STAMP)
	$(VENV)/bin/nestvisor demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(VENV)/bin/nestvisor bench

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py src/nestvisor/cpu/_trap.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip==24.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info src/nestvisor/cpu/_trap*.so
