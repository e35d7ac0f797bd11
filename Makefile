# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each sets itself up on a fresh machine: a virtualenv in .venv with the CPU build of torch
# (override TORCH_SPEC on a GPU machine, e.g. TORCH_SPEC=torch).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu bench setup clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/memlayers demo

# Triton kernels run under the interpreter on machines without a GPU.
test: $(STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(BIN)/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(BIN)/python -m pytest tests -q -p no:cacheprovider

test-gpu: $(STAMP)
	$(BIN)/python -m pytest tests -q -m gpu

bench: $(STAMP)
	$(BIN)/python bench/run.py --op all

clean:
	rm -rf $(VENV) build *.egg-info
