# Every target sets up .venv itself, so each works on a fresh clone.
# Without a GPU: the CPU build of torch and a triton/numpy pair whose interpreter works
# (see README "What runs where"). With a GPU, the machine's own torch/triton are used.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
CPU_PINS := torch==2.13.0 triton==3.9.0 "numpy==2.4.*"
PYTEST_ARGS ?=
OUT ?= bench/results/latest

.PHONY: test test-all bench aot aot-check gpu clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: using the index's torch/triton"; \
	else \
		$(VPY) -m pip install -q $(CPU_PINS); \
	fi
	$(VPY) -m pip install -q -e '.[test,bench,transformers]'
	touch $@

# The default suite: kernels under Triton's interpreter when no GPU is present (the AOT report's fast
# subset included).
test: $(VENV)/.installed
	$(VPY) -m pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

# The full AOT compile report for sm_80/sm_90 (every kernel, config the autotuner can pick, dtype):
# exits 1 when one fails. CI runs it after `make test`.
aot-check: $(VENV)/.installed
	$(VPY) -m gradkernels.aot check --failures-only

# Everything, slow tests (full AOT report, torch.compile) included.
test-all: $(VENV)/.installed
	$(VPY) -m pytest -n 2 -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VPY) -m gradkernels.bench all --out $(OUT)

aot: $(VENV)/.installed
	$(VPY) -m gradkernels.aot check

# On a CUDA machine without network: see bench/gpu_run.sh and README.
gpu:
	bash bench/gpu_run.sh $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
