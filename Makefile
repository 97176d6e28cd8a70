# The two commands a newcomer needs: `make run` (set up + start the API) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# uvicorn's httptools protocol with MiniVault's bounds on request heads, slow clients and connections.
GUARDED_PROTOCOL := app.web.connections:GuardedProtocol

.PHONY: run test lint format clean system-deps bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt requirements-embedded.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-embedded.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt pyproject.toml
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# newman runs the Postman collection in the tests.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Debian packages the tests use: docker-compose validates the compose files (offline), wrk drives
# the benchmark's smoke test, chromium and chromium-driver run tests/test_page.py, nginx checks the
# fleet's configuration (nginx -t), postgresql and redis-server are started by the replica tests.
# Installed when missing and root.
SYSTEM_PACKAGES := docker-compose wrk chromium chromium-driver nginx postgresql redis-server
system-deps:
	@missing=""; for package in $(SYSTEM_PACKAGES); do dpkg -s $$package >/dev/null 2>&1 || missing="$$missing $$package"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } || \
		echo "warning:$$missing missing and cannot be installed here; the tests that use them will fail"

run: $(VENV)/.runtime
	$(BIN)/python -m uvicorn app.main:app --host $(HOST) --port $(PORT) --http $(GUARDED_PROTOCOL) \
		--ws-per-message-deflate false

lint: $(VENV)/.dev
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy

test: lint node_modules/.installed system-deps
	$(BIN)/python -m pytest

# The benchmark (a few minutes): prints a markdown table, writes bench/results/latest.{json,md}.
# `make bench ARGS=--quick` runs one short round of each measurement.
bench: $(VENV)/.dev
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m bench.run $(ARGS)

format: $(VENV)/.dev
	$(BIN)/ruff format app tests bench
	$(BIN)/ruff check --fix app tests bench

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
