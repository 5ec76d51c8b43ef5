# The README's two commands: `make demo` (install + main job) and `make test` (install + test suite).
# Everything is installed into .venv at the repository root; nothing is installed by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0: on a CPU-only machine whose pip finds the CPU wheel (this project's machines do) that
# build is taken; elsewhere PyPI's default build (CUDA on Linux) is installed, and used when a GPU is present.
TORCH_SPEC ?= torch==2.13.0
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

.PHONY: demo test test-all venv deps dataset clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

venv: $(VENV)/bin/python

# Install torch first and on its own, so that no later requirement pulls a different (multi-GB) build.
# `make demo` needs the plot extra only; `make test` the dev extra (pytest, hypothesis, matplotlib, pillow).
EXTRAS ?= plot
deps: venv
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)]"

# Debian's dataset-fashion-mnist package puts the idx files under $(FASHION_MNIST_DIR).
dataset:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," \
	       "or put the four idx .gz files in a folder and pass DEMO_ARGS='--data-dir DIR'"; \
	fi

demo: deps dataset
	$(VENV)/bin/regpipe train $(DEMO_ARGS)

# The whole suite except runs marked `slow` (RUN_SLOW=1 includes them).
test: EXTRAS = dev
test: deps dataset
	$(PY) -m pytest -q $(if $(RUN_SLOW),-m "slow or not slow",)

clean:
	rm -rf $(VENV) runs .pytest_cache
