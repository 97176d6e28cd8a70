# The two commands a newcomer needs: `make run` (set up + start the API) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint format clean system-deps

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

# docker-compose (Debian's, works offline) validates the compose files; installed when missing and root.
system-deps:
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		apt-get install -y -qq docker-compose >/dev/null; } || \
		echo "warning: docker-compose is missing and cannot be installed here; the compose tests will fail"

run: $(VENV)/.runtime
	$(BIN)/python -m uvicorn app.main:app --host $(HOST) --port $(PORT) --ws-per-message-deflate false

lint: $(VENV)/.dev
	$(BIN)/ruff check app tests
	$(BIN)/ruff format --check app tests

test: lint node_modules/.installed system-deps
	$(BIN)/python -m pytest

format: $(VENV)/.dev
	$(BIN)/ruff format app tests
	$(BIN)/ruff check --fix app tests

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
