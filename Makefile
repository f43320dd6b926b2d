# Two entry points: `make up` runs the main job, `make test` runs the whole suite.
# Both create .venv when it is missing and install the project into it.
# `up` installs what running the mesh needs; `test` adds the test extras (and S3, Kubernetes).
PYTHON ?= python3
VENV := .venv
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: up test browser soak lint bench-proxy bench-txpool bench-backup bench-wake bench-scale bench-status-page clean

# uv installs what pip would, from the same index, in seconds rather than minutes (a fresh
# venv with the test extras: 9 s against pip's 175 s here); pip does it when uv cannot be had.
UV := $(VENV)/bin/uv
# Bytecode is compiled at install time: with PYTHONDONTWRITEBYTECODE set (as here), every
# process would otherwise compile each module it imports from source, every time (an agent's
# imports: 1.0 s against 0.43 s). `compile` does the same for our own sources, which change.
install = if test -x $(UV); then $(UV) pip install --quiet --compile-bytecode \
	--python $(VENV)/bin/python $(1); \
	else $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(1); fi
compile = $(VENV)/bin/python -m compileall -q -j 0 router agent controller jobmesh bench tests \
	> /dev/null

$(RUNTIME): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv \
		|| echo "uv is not installable here: installing with pip"
	$(call install,-e .)
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(call install,-e '.[test]')
	touch $(STAMP)

up: $(RUNTIME)
	@$(compile)
	@echo "the jobmesh CLI: $(CURDIR)/$(VENV)/bin/jobmesh"
	$(VENV)/bin/jobmesh up --demo-job demo

# The status page's browser tests drive Debian's chromium with Playwright (whose own
# browser download is never used); as root (CI) it is installed here when missing.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the status page's browser tests ..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			> /dev/null; \
	else echo "chromium is missing and only root can install it (apt-get install" \
		"chromium): the browser tests will fail"; fi

test: $(STAMP) browser
	@$(compile)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -n 3 --dist worksteal --durations=30

# Measurements that check nothing a test does not (latency percentiles): not in `test`.
soak: $(STAMP)
	$(VENV)/bin/python -m pytest -m soak -s

bench-proxy: $(STAMP)
	$(VENV)/bin/python bench/proxy.py

bench-txpool: $(STAMP)
	$(VENV)/bin/python bench/txpool.py

bench-backup: $(STAMP)
	$(VENV)/bin/python bench/backup.py

bench-status-page: $(STAMP) browser
	$(VENV)/bin/python bench/status_page.py

bench-wake: $(STAMP)
	$(VENV)/bin/python bench/wake.py

bench-scale: $(STAMP)
	$(VENV)/bin/python bench/scale.py

clean:
	rm -rf $(VENV) .pytest_cache .jobmesh
