# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: demo test test-deps install install-test deps bench bench-deps bench-speed bench-quality bench-qc clean

KERNELS := setup.py flatd/stack/_kernels.c flatd/stack/_kernels_body.h

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The install compiles flatd's kernels (C): a compiler and the Python headers, installed
# with apt-get when missing (as root, or through sudo).
deps:
	@if command -v cc >/dev/null 2>&1 && $(PYTHON) -c "import os, sysconfig; \
		raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get install -y gcc python3-dev || { $$SUDO apt-get update && $$SUDO apt-get install -y gcc python3-dev; }; \
	else echo "deps: a C compiler (cc) and the Python headers are needed to build flatd's kernels" >&2; exit 1; fi

# compileall: an editable install leaves flatd's modules as source, and where
# PYTHONDONTWRITEBYTECODE is set (CI, containers) every run compiles them again (about
# half a second of each run-once); a wheel's install compiles them, and so does this.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(KERNELS) | deps
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m compileall -q flatd
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	rm -rf $(DEMO)
	$(BIN)/flatd demo $(DEMO)
	$(BIN)/flatd run-once --config $(DEMO)/flatd.yaml
	@echo
	@echo "Masters made:"
	@find $(DEMO)/captures -path '*/masters/*' -name '*.fits' | sort | sed 's/^/  /'
	@echo "Inputs moved to:"
	@find $(DEMO)/captures -type d -name 'originals-*' | sort | sed 's/^/  /'

# The status page's browser test runs headless Chromium: installed with apt-get when it is
# missing (as root, or through sudo without a password prompt). Where it cannot be
# installed, the test is skipped and says why; `make test` goes on either way.
test-deps:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo "sudo -n"); \
		APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"; \
		$$APT install -y chromium || { $$APT update && $$APT install -y chromium; } \
		|| echo "test-deps: chromium could not be installed: the status page's browser test will be skipped" >&2; \
	else echo "test-deps: no chromium and no apt-get: the status page's browser test will be skipped" >&2; fi

test: install-test test-deps
	$(BIN)/python -m pytest -q

# Siril (siril-cli), the peer both benchmarks measure flatd against: installed with
# apt-get when it is missing (as root, or through sudo). Without apt-get the benchmarks
# run without their Siril rows.
bench-deps:
	@if command -v siril-cli >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get install -y siril || { $$SUDO apt-get update && $$SUDO apt-get install -y siril; }; \
	else echo "bench-deps: siril-cli not found and no apt-get: the benchmarks will skip Siril" >&2; fi

bench: install bench-deps
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench.py

# Issue 10's figures: every method against Siril's same job, the read floor, start-up
# (bench/speed.py; SPEED_ARGS="--rounds 5" and the like pass options through).
bench-speed: install bench-deps
	$(BIN)/python bench/speed.py $(SPEED_ARGS)

bench-quality: install bench-deps
	$(BIN)/python bench/quality.py

# Issue 12's figures: the quality checks on seeded clean and faulty sessions, and what they
# add to a run of 32 flats of 3264 x 2448 (bench/qc.py; QC_ARGS="--parts clean,faults" and
# the like pass options through; the time part needs bench/speed.py's cached flats).
bench-qc: install
	$(BIN)/python bench/qc.py $(QC_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info .pytest_cache .hypothesis flatd/stack/_kernels*.so
