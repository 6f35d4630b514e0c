# Every target sets up .venv itself, so each works on a fresh clone.
# Without a GPU: the CPU build of torch and a triton/numpy pair whose interpreter works
# (see README "What runs where"). With a GPU, the machine's own torch/triton are used.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
CPU_PINS := torch==2.13.0 triton==3.9.0 "numpy==2.4.*"
# The GPU machines' Triton (bench/GPU.md, "On the GPU machines' Triton"), with the CPU build of torch:
# a second environment for the AOT check and the static performance report (compiles need no GPU and
# no interpreter). The project is installed into it editable, without its dependencies.
VENV36 := .venv-triton36
VPY36  := $(VENV36)/bin/python
TRITON36_PINS := torch==2.13.0 triton==3.6.0 "numpy==2.4.*"
PERF_OUT ?= bench/results/static
PYTEST_ARGS ?=
OUT ?= bench/results/latest

.PHONY: test test-all bench aot aot-check aot-check-triton36 perf perf-triton36 gpu clean

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

$(VENV36)/.installed: pyproject.toml Makefile
	test -x $(VPY36) || $(PYTHON) -m venv $(VENV36)
	$(VPY36) -m pip install -q --upgrade pip
	$(VPY36) -m pip install -q $(TRITON36_PINS)
	$(VPY36) -m pip install -q --no-deps -e .
	touch $@

# The same AOT check under Triton 3.6 (what the H100/H200 machines run).
aot-check-triton36: $(VENV36)/.installed
	$(VPY36) -m gradkernels.aot check --failures-only

# The static performance report (bench/GPU.md, "Static performance report"), written under
# bench/results/static/ with the Triton version in the name; ~4-5 min per Triton on 2 cores (2026-11-30).
perf: $(VENV)/.installed
	$(VPY) -m gradkernels.aot perf --arch 80,90 --picked-only \
		--json $(PERF_OUT)/perf-triton-$$($(VPY) -c 'import triton; print(triton.__version__)').json \
		--table $(PERF_OUT)/perf-triton-$$($(VPY) -c 'import triton; print(triton.__version__)').txt

perf-triton36: $(VENV36)/.installed
	$(VPY36) -m gradkernels.aot perf --arch 80,90 --picked-only \
		--json $(PERF_OUT)/perf-triton-$$($(VPY36) -c 'import triton; print(triton.__version__)').json \
		--table $(PERF_OUT)/perf-triton-$$($(VPY36) -c 'import triton; print(triton.__version__)').txt

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
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache
