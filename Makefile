# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
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

test: install-test
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info .pytest_cache .hypothesis
