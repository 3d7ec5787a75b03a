# Every target runs inside .venv, which `make venv` creates from nothing.
# Interpreters come from variables, so a machine without pyenv passes its own:
#   make test PYTHON=/usr/bin/python3.12
#   make test-matrix PYTHON_OLDEST=/opt/py310/bin/python3 PYTHON_NEWEST=/opt/py313/bin/python3
PYTHON ?= python3
# The oldest and newest supported Python: pyenv's newest patch release of each
# when pyenv has one, else whatever answers to the name on PATH.
PYENV_VERSIONS := $(shell pyenv root 2>/dev/null)/versions
PYTHON_OLDEST ?= $(or $(lastword $(sort $(wildcard $(PYENV_VERSIONS)/3.10.*/bin/python3.10))),python3.10)
PYTHON_NEWEST ?= $(or $(lastword $(sort $(wildcard $(PYENV_VERSIONS)/3.13.*/bin/python3.13))),python3.13)
VENV := .venv
BIN := $(VENV)/bin
# The package and its runtime dependencies only: enough for the demo.
RUNTIME_STAMP := $(VENV)/.runtime
# Plus the development tools (the dev extra): tests, lint, protoc, build.
STAMP := $(VENV)/.installed
# Which interpreter an environment runs: its installation and version. .venv
# belongs to $(PYTHON): one another interpreter made (`make demo`, then
# `make test PYTHON=python3.12`) is made again, never silently reused.
IDENTITY := import sys; print("%d.%d.%d from" % sys.version_info[:3], sys.base_prefix)
WANTED_PYTHON := $(shell $(PYTHON) -c '$(IDENTITY)' 2>/dev/null)
VENV_PYTHON := $(shell $(BIN)/python -c '$(IDENTITY)' 2>/dev/null)

.PHONY: venv protos lint test test-matrix demo bench bench-startup soak clean other-python

venv: $(STAMP)

ifneq ($(VENV_PYTHON),$(WANTED_PYTHON))
# Always out of date: the environment is made again below.
$(RUNTIME_STAMP): other-python
endif
other-python:

$(RUNTIME_STAMP): pyproject.toml
	@if [ -z '$(WANTED_PYTHON)' ]; then \
	  echo "make: PYTHON=$(PYTHON) does not run; name a Python 3.10+ interpreter, e.g. make test PYTHON=python3.12" >&2; \
	  exit 1; \
	fi
	@if [ -e $(VENV) ] && [ '$(VENV_PYTHON)' != '$(WANTED_PYTHON)' ]; then \
	  echo "make: $(VENV) runs $(if $(VENV_PYTHON),Python $(VENV_PYTHON),no working Python), not PYTHON=$(PYTHON) (Python $(WANTED_PYTHON)): making it again"; \
	  rm -rf $(VENV); \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(STAMP): $(RUNTIME_STAMP) setup.cfg
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

protos: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# The suite from the sdist on the oldest Python with every dependency at its
# floor, and on the newest Python with the newest releases.
test-matrix: $(STAMP)
	$(BIN)/python scripts/test_matrix.py --oldest '$(PYTHON_OLDEST)' --newest '$(PYTHON_NEWEST)'

demo: $(RUNTIME_STAMP)
	$(BIN)/python examples/deploy.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Only the SDK's import time and the first verdict, beside their floors.
bench-startup: $(STAMP)
	$(BIN)/python benchmarks/run.py --sections startup

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .matrix build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
