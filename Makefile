# Two commands for a new user (SPEC §14): `make demo` and `make test`. Each creates .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The main job end to end on the embedded default: train (resumes if run again), prove the
# checkpoints, measure the model against baselines, say where the run stands, and end with the
# evaluation's table (model beside the all-black and mean-frame baselines, and the goals).
demo: venv
	$(BIN)/python -m job train --preset small --run-uri $(DEMO_RUN)
	$(BIN)/python -m job verify --preset small --run-uri $(DEMO_RUN)
	$(BIN)/python -m job evaluate --preset small --run-uri $(DEMO_RUN)
	$(BIN)/python -m job status $(DEMO_RUN)
	$(BIN)/python -c 'import sys; from job.eval.report import print_summary; print_summary(sys.argv[1])' $(DEMO_RUN)

# Two test processes (pytest-xdist, a file per process at a time), then the few drills that need
# the machine to themselves, alone.
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -m serial

# Bench-only requirements (Lightning, for bench/bench_vs_lightning.py): pinned, and they change
# none of the pins of requirements*.txt, so they go into the same venv.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	touch $(BENCH_STAMP)

# Every bench/bench_*.py prints JSON lines; they go to stdout and are appended to bench/results.jsonl.
# A script that fails is recorded as {"bench": ..., "error": ...} and fails the target at the end.
bench: venv $(BENCH_STAMP)
	@failed=0; for script in bench/bench_*.py; do \
		echo "== $$script" >&2; \
		if ! $(BIN)/python $$script > bench/.last.jsonl; then \
			failed=1; echo "{\"bench\": \"$$script\", \"error\": \"exited non-zero\"}" >> bench/.last.jsonl; \
		fi; \
		cat bench/.last.jsonl; cat bench/.last.jsonl >> bench/results.jsonl; \
	done; rm -f bench/.last.jsonl; exit $$failed

clean:
	rm -rf $(VENV) runs .pytest_cache

# The container's linters (tests/unit/test_container.py runs them too); shellcheck: apt-get install shellcheck.
.PHONY: lint
lint: venv
	$(BIN)/hadolint Dockerfile
	shellcheck entrypoint.sh

# The image drill (issue 14): builds the image for real (Debian base made with debootstrap, the
# CPU torch wheel) and runs its containers against a local S3; needs root. docs/deploy.md.
.PHONY: image-test
image-test: venv
	tests/drills/container/drill.sh
