# Two entry points: `make up` runs the main job, `make test` runs the whole suite.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: up test soak lint bench-proxy bench-backup bench-wake clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/jobmesh up --demo-job demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -n 3 --durations=30

# Measurements that check nothing a test does not (latency percentiles): not in `test`.
soak: $(STAMP)
	$(VENV)/bin/python -m pytest -m soak -s

bench-proxy: $(STAMP)
	$(VENV)/bin/python bench/proxy.py

bench-backup: $(STAMP)
	$(VENV)/bin/python bench/backup.py

bench-wake: $(STAMP)
	$(VENV)/bin/python bench/wake.py

clean:
	rm -rf $(VENV) .pytest_cache .jobmesh
