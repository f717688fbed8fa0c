# DiffEx: `make demo` runs the pipeline on built-in synthetic data, `make test` runs the tests.
# Both create the virtual environment in .venv when it is missing and install the project.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffex-installed
PYTHON ?= python3
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffex demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

clean:
	rm -rf runs/demo .pytest_cache
