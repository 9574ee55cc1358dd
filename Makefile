# rlhfkit: the two commands of the README are `make demo` and `make test`.
# Both set up a virtual environment in $(VENV) first (idempotent).
#
# torch: a torch that is already importable (for example a CUDA build installed system-wide) is kept;
# the venv sees it through --system-site-packages. Otherwise $(TORCH) is installed first, so the
# unpinned `torch>=2.1` of pyproject.toml never pulls a multi-GB CUDA build on a CPU machine.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlhfkit-installed

.PHONY: setup demo test lint bench labelstudio clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/rlhfkit demo

test: setup
	$(BIN)/python -m ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_sft.py

# Label Studio, a server beside rlhfkit (rlhfkit only writes and reads its JSON), in its own venv: its pins would
# move rlhfkit's (numpy, pyarrow). sentry-sdk 3 dropped an option label-studio 1.23 passes it at start-up.
# tests/test_data_labelstudio.py runs a real server from it (skipped without it).
labelstudio:
	test -x .venv-labelstudio/bin/python || $(PYTHON) -m venv .venv-labelstudio
	.venv-labelstudio/bin/python -m pip install --quiet "label-studio==1.23.2" "sentry-sdk<3"

clean:
	rm -rf $(VENV) .venv-labelstudio runs .pytest_cache .ruff_cache
