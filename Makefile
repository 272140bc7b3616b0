# Two entry points, both of which set everything up from nothing:
#   make demo   -> .venv with Python 3.12, then `metaprior run harmonic --out runs/harmonic`
#   make test   -> .venv with Python 3.12 and the dev extras, then the whole test suite
#   make lint   -> ruff check + ruff format --check (run by .ci/run before the tests)
#   make notebook-outputs -> execute the notebooks committed with their outputs, in place (full size)
# (notebooks and every experiment's --quick run included).

# pyenv machines: .python-version pins 3.12, so `python3.12` resolves through the shim.
PYTHON ?= python3.12
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
# test workers (pytest-xdist); 0 runs in one process
PYTEST_WORKERS ?= 2

# notebooks committed with their outputs (a reader on the web sees the results)
NOTEBOOK_OUTPUTS ?= notebooks/your_own_model.ipynb

.PHONY: demo test lint format setup clean notebook-outputs

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 12), "metaprior needs Python 3.12, got " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/metaprior run harmonic --out runs/harmonic $(ARGS)

test: $(STAMP)
	METAPRIOR_DATA=$${METAPRIOR_DATA:-$(abspath ../shared/data)} $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

notebook-outputs: $(STAMP)
	$(BIN)/python notebooks/execute.py $(NOTEBOOK_OUTPUTS)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
