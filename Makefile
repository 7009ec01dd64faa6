# sagaflow developer and CI entry points. `make help` lists them.
#
# Works on a fresh machine with only python3 (>= 3.11), pip and venv: every
# target that needs tools depends on the virtualenv, which is (re)built when
# pyproject.toml changes. Tests and benchmarks need RabbitMQ and PostgreSQL;
# scripts/ensure-services.sh checks them (and starts local ones if installed).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after a successful install; re-install only when pyproject.toml or the lock is newer.
STAMP := $(VENV)/.sagaflow-installed
# The exact versions (with hashes) that `make venv` installs: CI's and everyone's.
# `make lock` writes it and requirements/services.lock; docs/install.md says how.
LOCK := requirements/ci.lock
# Extra arguments for `make lock`: LOCK_ARGS=--upgrade (newest of everything) or
# LOCK_ARGS="--upgrade-package orjson"; by default the pins that still fit are kept.
LOCK_ARGS ?=
# One lock for every platform and Python >= 3.11, with the hashes of every file.
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet \
  --custom-compile-command 'make lock'
# The auditor `make audit` runs (docs/releasing.md), pinned like everything else,
# and its extra arguments: AUDIT_ARGS="--ignore-vuln GHSA-..." for an accepted one.
PIP_AUDIT ?= pip-audit==2.10.1
AUDIT_ARGS ?=
# Extra arguments: `make test PYTEST_ARGS="-k compensation -x"`.
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Quiet pip's advice about root and about its own version (CI runs as root).
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore

.DEFAULT_GOAL := help
.PHONY: help venv deps lock audit demo test test-unit test-faults test-cluster lint types check bench fmt services browser node-deps clean

help:  ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(STAMP)  ## create .venv: the locked dev tools (requirements/ci.lock), sagaflow editable

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  found=$$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 || echo 'not found'); \
	  echo "error: sagaflow needs Python >= 3.11, but PYTHON=$(PYTHON) is: $$found" >&2; \
	  echo "       Install one (e.g. apt-get install python3.11) and run" \
	    "'make PYTHON=python3.11 ...'." >&2; \
	  exit 1; }
	@if [ -x $(BIN)/python ] && ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	  echo "$(VENV) has an old Python; recreating it" >&2; rm -rf $(VENV); fi
	@if [ ! -x $(BIN)/python ]; then \
	  echo "creating $(VENV) with $$($(PYTHON) --version)"; \
	  $(PYTHON) -m venv $(VENV) || { \
	    echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; \
	    rm -rf $(VENV); exit 1; }; fi
	$(BIN)/python -m pip install --quiet --require-hashes --requirement $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	@touch $(STAMP)

deps: venv  ## offline dependency checks: pip check, and the locks still satisfy pyproject.toml
	$(BIN)/python -m pip check
	$(BIN)/python requirements/check_lock.py

# uv reads PyPI (UV_DEFAULT_INDEX for a mirror), not pip's configuration. The
# services lock is constrained to CI's versions: the examples run what CI tested.
lock: venv  ## re-resolve requirements/*.lock from pyproject.toml (LOCK_ARGS=--upgrade)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) --output-file $(LOCK) $(LOCK_ARGS)
	$(BIN)/uv pip compile pyproject.toml --extra services $(LOCK_FLAGS) \
	  --constraint $(LOCK) --output-file requirements/services.lock $(LOCK_ARGS)

# Needs PyPI's JSON API for the vulnerability data: a release step, not part of
# `make check`. --strict fails when a package could not be looked up, so an
# index without that API cannot pass for a clean audit.
audit: venv  ## known vulnerabilities in the locked versions (needs internet: docs/releasing.md)
	$(BIN)/uv tool run --from '$(PIP_AUDIT)' pip-audit --strict --progress-spinner off \
	  --disable-pip --require-hashes --requirement $(LOCK) $(AUDIT_ARGS)

demo: venv  ## run a saga end to end in one process (in-memory; no servers needed)
	$(BIN)/sagaflow demo

services:  ## check RabbitMQ and PostgreSQL are up (start local ones if installed)
	@bash scripts/ensure-services.sh

browser:  ## install Debian's chromium for the dashboard's browser tests (once; needs root)
	@bash scripts/ensure-chromium.sh

node-deps:  ## npm ci for the Node.js example participant (services/*_node), from its lock
	@bash scripts/node-deps.sh

test: venv services browser node-deps  ## the whole suite: unit, contract, integration, e2e, faults
	$(BIN)/pytest tests -ra $(PYTEST_ARGS)

test-unit: venv  ## unit tests only (no servers needed)
	$(BIN)/pytest tests/unit -ra $(PYTEST_ARGS)

# Sagas per scenario: SAGAFLOW_FAULT_SAGAS (see docs/guarantees.md for the soak);
# SAGAFLOW_FAULT_SEED replays a run's random choices (each summary line prints it).
test-faults: venv services  ## fault-injection suite: kill and restart processes, RabbitMQ, PostgreSQL
	$(BIN)/pytest tests/faults tests/unit/test_envelope_fuzz.py -ra $(PYTEST_ARGS)

# The cluster scenarios start (and remove) three RabbitMQ nodes and a PostgreSQL
# primary with a standby of their own (docs/scaling.md); `make test` runs them too.
test-cluster: venv services  ## fault scenarios on a local 3-node RabbitMQ cluster and a PostgreSQL standby
	$(BIN)/pytest -p no:hypothesispytest tests/faults/cluster tests/integration/test_broker_nodes.py -ra $(PYTEST_ARGS)

lint: venv  ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: venv  ## mypy (strict) on the library
	$(BIN)/mypy sagaflow

check: deps lint types test  ## deps + lint + types + test: what CI runs

bench: venv services  ## the benchmark harness (bench/), against the real servers
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.parallel  # a parallel group against the same steps in sequence

fmt: venv  ## format and fix what ruff can fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove caches (keeps .venv; `rm -rf .venv` for a clean slate)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
