# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo ui test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Generate a mock DESI data drop and materialise every asset through Dagster on it.
demo: install
	$(VENV)/bin/desi-anomaly demo --out demo-out

# The Dagster UI (webserver + daemon) on 127.0.0.1:3000, over the demo's instance and outputs.
ui: install
	mkdir -p demo-out/.dagster
	cp dagster.yaml demo-out/.dagster/dagster.yaml
	DAGSTER_HOME=$(CURDIR)/demo-out/.dagster \
	DESI_ANOMALY_DATA_ROOT=$(CURDIR)/demo-out/data \
	DESI_ANOMALY_STORAGE_ROOT=$(CURDIR)/demo-out \
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
