# Two commands on a fresh machine with only Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# First run only: a virtual environment with tidesim and its runtime (torch), dask and test extras.
# pip prints each package as it goes; torch is the largest download. Later runs skip this step.
$(STAMP): pyproject.toml
	@echo "== first-run set-up: creating $(VENV) and installing tidesim with torch, dask and the test tools"
	@echo "== (only once; about 1-2 minutes with a fast network, torch is the largest download)"
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VENV) && \
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -e '.[runtime,dask,test]' \
	  | grep --line-buffered -E '^(Collecting|Successfully installed|ERROR)' ; \
	status=$${PIPESTATUS[0]}; \
	[ $$status -eq 0 ] || { echo "== set-up failed (pip exit $$status); run make again to retry"; exit $$status; }; \
	echo "== set-up done in $$(( $$(date +%s) - start )) s"
	@touch $(STAMP)

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
