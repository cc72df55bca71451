# The only entry points: make run / make test / make check / make bench.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The main job: the reference architecture on this machine (`make run ARGS=--demo-load`).
run: $(STAMP)
	$(BIN)/netstack up $(ARGS)

# scripts/test-deps installs the Debian packages tests start for real (PostgreSQL,
# redis-server, Chromium) when missing; the tests start and stop them.
test: $(STAMP)
	scripts/test-deps
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/check
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/test

check: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/check

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/bench

clean:
	rm -rf $(VENV) .coverage .coverage.* htmlcov .mypy_cache .ruff_cache .pytest_cache
