# Nexus: `make run` serves, `make test` checks. Both set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo -n)

.PHONY: run test lint browser dist bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

run: $(VENV)/.runtime
	$(BIN)/python nexus.py serve $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The dashboard is tested in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null; }

test: lint browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Mock backends and Nexus on 127.0.0.1, measured side by side with direct connections.
# wrk drives the throughput test; without it the Python load generator does. BENCH_ARGS=--quick
bench: $(VENV)/.dev
	@command -v wrk >/dev/null 2>&1 || $(SUDO) apt-get install -y -q wrk >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q wrk >/dev/null 2>&1; } \
	  || echo "wrk could not be installed: throughput is measured with the Python load generator"
	$(BIN)/python tests/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
