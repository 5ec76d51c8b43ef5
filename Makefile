# The README's two commands: `make demo` (install + main job) and `make test` (install + test suite).
# Everything is installed into .venv at the repository root; nothing is installed by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0: on a CPU-only machine whose pip finds the CPU wheel (this project's machines do) that
# build is taken; elsewhere PyPI's default build (CUDA on Linux) is installed, and used when a GPU is present.
TORCH_REQUIREMENT ?= torch==2.13.0
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=

.PHONY: demo test test-all venv deps dataset clean loader-sysdeps lint-imports check-wheel

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

venv: $(VENV)/bin/python

# Install torch first and on its own, so that no later requirement pulls a different (multi-GB) build.
# `make demo` needs the plot extra only; `make test` the dev extra (pytest, hypothesis, matplotlib, pillow).
EXTRAS ?= plot
deps: venv
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_REQUIREMENT)"
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

# The main job: the baseline and the invariance recipe side by side on the same budget, clean and FGSM accuracy,
# a verdict and runs/demo/demo.png (`regpipe demo --help`; e.g. DEMO_ARGS="--method saliency --epochs 20").
demo: deps dataset
	$(VENV)/bin/regpipe demo $(DEMO_ARGS)

# FFCV 1.0.2 builds from source: its setup.py asks pkg-config for opencv4 and libturbojpeg. As root this
# installs them with apt; otherwise it says what to install (the FFCV build then fails, naming them).
LOADER_APT := libturbojpeg0-dev libopencv-dev pkg-config
loader-sysdeps:
	@if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  echo "FFCV build dependencies found (opencv4, libturbojpeg)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(LOADER_APT) || \
	   (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(LOADER_APT))) >/dev/null; \
	else \
	  echo "FFCV needs system packages to build: run 'sudo apt-get install $(LOADER_APT)' (Debian/Ubuntu)"; \
	fi

# The whole suite except runs marked `slow` (RUN_SLOW=1 includes them). The dali and ffcv extras are
# installed so the loader adapters are tested with the real libraries (nvidia-dali-cuda120 is ~1 GB and
# runs its CPU pipelines without a GPU).
# The layer contracts of pyproject.toml, checked on a copy of the installed layout (kernels/ and loaders/
# inside regpipe/, as setuptools installs them), so that import-linter sees regpipe.kernels and regpipe.loaders.
IMPORT_TREE := build/import-tree
lint-imports: EXTRAS = dev
lint-imports: deps
	rm -rf $(IMPORT_TREE) && mkdir -p $(IMPORT_TREE)
	cp -r regpipe $(IMPORT_TREE)/regpipe && cp -r kernels loaders $(IMPORT_TREE)/regpipe/
	cd $(IMPORT_TREE) && PYTHONPATH=. $(abspath $(VENV))/bin/lint-imports $(abspath pyproject.toml) --no-cache

# The wheel as a user gets it: the editable install above reads the checkout, so it cannot show a module
# missing from the wheel. tools/check_wheel.py builds the sdist and a wheel from it, installs the wheel into
# a fresh venv outside the checkout (it sees .venv's packages through a .pth file: torch is not downloaded
# again), imports every module from there, runs `regpipe --version` and a one-epoch `regpipe train`, and
# checks that .venv was not touched. Every module is imported, so the loader extras are installed too.
check-wheel: EXTRAS = dev,dali,ffcv
check-wheel: loader-sysdeps deps dataset
	$(PY) tools/check_wheel.py

test: EXTRAS = dev,dali,ffcv
test: loader-sysdeps deps dataset lint-imports check-wheel
	$(PY) -m pytest -q $(if $(RUN_SLOW),-m "slow or not slow",)

clean:
	rm -rf $(VENV) runs .pytest_cache regpipe.egg-info

# `regpipe bench` against the peers (timm, torchvision, kornia) in their own environment: torchvision
# needs the torch build it was released with (pip resolves it; on Linux that is PyPI's CUDA build, ~5.5 GiB
# with its nvidia-* wheels, which also runs on CPU), so the main .venv and `make test` stay light.
# It lives under build/ (git-ignored). BENCH_ARGS: e.g. BENCH_ARGS="--device cuda" or "--quick".
PEERS_VENV ?= build/venv-peers
BENCH_ARGS ?=
.PHONY: bench-peers
bench-peers:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q torchvision timm kornia
	$(PEERS_VENV)/bin/python -m pip install -q -e .
	$(PEERS_VENV)/bin/regpipe bench --json benchmarks/bench-peers.json $(BENCH_ARGS)
