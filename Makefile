PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip runs again only when pyproject.toml changed since the last install.
INSTALLED := $(VENV)/.installed
INSTALLED_BENCH := $(VENV)/.installed-bench

.PHONY: install run test bench bench-quick lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

$(INSTALLED_BENCH): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	touch $@

install: $(INSTALLED)

run: install
	$(PY) -m perfect_runner --flows examples/example_flows.py --run-all

test: install
	$(PY) -m pytest -q

bench: $(INSTALLED_BENCH)
	$(PY) bench/run_all.py

bench-quick: $(INSTALLED_BENCH)
	$(PY) bench/run_all.py --quick

lint: install
	$(VENV)/bin/ruff check perfect_runner tests examples bench

clean:
	rm -rf reports perfect-logs .pytest_cache
