PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test bench bench-quick lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q -e '.[test,dev]'

run: install
	$(PY) -m perfect_runner --flows examples/example_flows.py --run-all

test: install
	$(PY) -m pytest -q

bench: $(PY)
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	$(PY) bench/run_all.py

bench-quick: $(PY)
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	$(PY) bench/run_all.py --quick

lint: install
	$(VENV)/bin/ruff check perfect_runner tests examples bench

clean:
	rm -rf reports perfect-logs .pytest_cache
