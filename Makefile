# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv (Python >= 3.11) and install the package with the tested pins first.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
DEMO_OUT ?= demo_output
PYTEST_ARGS ?=

.PHONY: all setup test test-all demo lint typecheck check clean

all: test

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,distributed]'
	@touch $(STAMP)

setup: $(STAMP)

# Fast suite (what CI runs): everything except tests marked slow or gpu.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# Everything, including slow tests (and gpu tests when a GPU is present).
test-all: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/simsearch-wsi demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check simsearch_wsi tests benchmarks
	$(BIN)/ruff format --check simsearch_wsi tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache *.egg-info
