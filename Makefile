# DiffEx: `make demo` runs the pipeline on built-in synthetic data, `make test` runs the tests.
# Both create the virtual environment in .venv when it is missing and install the project.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffex-installed
PYTHON ?= python3
# Test processes (pytest-xdist): each uses one thread; 2 fits the 2-core CI machine.
TEST_WORKERS ?= 2

.PHONY: demo test lint install browser clean

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

# The report's browser tests drive Debian's chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "warning: chromium is missing (apt-get install chromium); browser tests will skip"

# The test workers run one thread each; their OpenMP threads sleep when idle.
test: $(STAMP) lint browser
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf runs/demo .pytest_cache
