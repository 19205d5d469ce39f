# Everything runs from the project's own virtualenv (.venv) and Dagster instance (data/dagster).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DAGSTER_HOME is this folder (it holds dagster.yaml); the sqlite storage lives in data/dagster.
export DAGSTER_HOME := $(CURDIR)
export IMG2DS_DAGSTER_STORAGE := $(CURDIR)/data/dagster

.PHONY: setup demo dev test lint system-packages clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Serve the bundled sample photos on 127.0.0.1 and download them through the Dagster assets.
demo: setup
	$(BIN)/img2ds demo

# The Dagster UI and daemon (sensors, backfills) on http://127.0.0.1:3000
dev: setup
	mkdir -p data/inbox
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/dg dev -h 127.0.0.1 -p 3000

lint: setup
	$(BIN)/ruff check img2ds_dagster tests benchmarks
	$(BIN)/ruff format --check img2ds_dagster tests benchmarks
	$(BIN)/mypy

# The Debian packages the tests run (PostgreSQL, Java, Chromium, nginx, apache2, squid), when missing.
system-packages:
	bash tests/system-packages.sh

test: lint system-packages
	$(BIN)/python -m pytest -q

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
