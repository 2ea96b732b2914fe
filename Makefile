# Two entry points: `make demo` and `make test` (system test packages, ruff, mypy, then pytest).
# Each creates .venv and installs what it needs (Open MPI and mpi4py come from PyPI wheels, so no system MPI is required).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Open MPI refuses to start as root unless told; CI containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/dsn demo

# The quality gates first (lint, types), then the suite; the import contracts run inside it.
test: $(VENV)/.installed-test
	sh scripts/install-test-deps.sh
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

PEERS ?= ../shared/peers

bench: $(VENV)/.installed-test
	sh scripts/install-bench-deps.sh
	$(BIN)/python bench/line_rate.py --peers $(PEERS)
	$(BIN)/python bench/gateway_throughput.py --messages 16000 --producers 1,2,4 --io-threads 1,2 --cases l7+plain,l7+curve
	$(BIN)/python bench/gateway_throughput.py --producers 4 --lanes 1,2,4 --repeat 2 --cases l7+plain,l7+curve
	$(BIN)/python bench/gateway_flood.py
	$(BIN)/python bench/counting.py --peers $(PEERS)
	$(BIN)/python bench/pictures.py
	$(BIN)/python bench/end_to_end.py
	$(BIN)/python bench/controlplane_tokens.py
	$(BIN)/python bench/controlplane_load.py
	sh scripts/install-test-deps.sh  # PostgreSQL, for the replicas
	$(BIN)/python bench/controlplane_replicas.py
	$(BIN)/python bench/site_failover.py

clean:
	rm -rf $(VENV) .dsn .pytest_cache .hypothesis
