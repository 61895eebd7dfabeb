# Two commands on a fresh machine with only Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[runtime,dask,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tidesim demo

lint: $(STAMP)
	$(BIN)/ruff check tidesim runtime tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
