# Two entry points: `make up` runs the main job, `make test` runs the whole suite.
# Both create .venv when it is missing and install the project into it.
# `up` installs what running the mesh needs; `test` adds the test extras (and S3, Kubernetes).
PYTHON ?= python3
VENV := .venv
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: up test soak lint bench-proxy bench-backup bench-wake clean

$(RUNTIME): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

up: $(RUNTIME)
	@echo "the jobmesh CLI: $(CURDIR)/$(VENV)/bin/jobmesh"
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
