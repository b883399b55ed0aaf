# Two commands for a new user (SPEC §14): `make demo` and `make test`. Each creates .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: venv
	$(BIN)/python -m job train --preset small --run-uri $(DEMO_RUN)

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/bench_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# The container's linters (tests/test_container.py runs them too); shellcheck: apt-get install shellcheck.
.PHONY: lint
lint: venv
	$(BIN)/hadolint Dockerfile
	shellcheck entrypoint.sh
