# Quick start: `make demo` (check + speed comparison on this machine) and `make test` (the suite).
# Both create .venv/ from a fresh clone: pinned dev versions (torch 2.13.0 CPU build, triton 3.8.0,
# transformers 5.18.0) from requirements-*.txt, then fused_attn in editable mode.  `make test`
# also runs the Hugging Face tests under transformers 4.57.6 in a second venv (.venv-hf4).
PYTHON   ?= python3.11
VENV     ?= .venv
VENV_HF4 ?= .venv-hf4
PY        = $(VENV)/bin/python
PY_HF4    = $(VENV_HF4)/bin/python
STAMP     = $(VENV)/.installed
STAMP_HF4 = $(VENV_HF4)/.installed
HF_TESTS  = tests/test_hf_models.py tests/test_hf_minilm.py tests/test_hf_register.py tests/test_hf_routes.py \
            tests/test_padding_free.py tests/test_padding_free_patch.py tests/test_padding_free_layers.py \
            tests/test_hf_flattened.py tests/test_hf_modern.py tests/test_concurrency.py tests/test_hf_accelerate.py \
            tests/test_distributed.py tests/test_fuzz_hf.py tests/test_hf_deberta.py tests/test_padding_free_interface.py
JOBS     ?= 2

.PHONY: demo test test-main test-hf4 test-asan test-gpu gpu-check triton-cache fuzz compile-sweep bench clean

$(STAMP): requirements-dev.txt requirements-hf.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-hf.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(STAMP_HF4): requirements-dev.txt requirements-hf4.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_HF4)
	$(PY_HF4) -m pip install -q -r requirements-dev.txt -r requirements-hf4.txt
	$(PY_HF4) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m benchmarks.demo

test: test-main test-hf4

test-main: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) tests

# the HF integration tests again under transformers 4.x (the old BertSelfAttention protocol)
test-hf4: $(STAMP_HF4)
	$(PY_HF4) -m pytest -q -n $(JOBS) $(HF_TESTS)

# The C++ CPU kernel (the cpu engine) and the CUDA kernels under the CPU emulation (the cuda-emu
# engine), both built with AddressSanitizer: an out-of-bounds access to a tensor stops the run
# with a report (out/asan/).  Opt-in, ~10 min.
# (Not tests/test_cuda_emu.py: its failing launches throw, which preloaded ASan cannot intercept.)
ASAN_TESTS = tests/test_forward.py tests/test_backward.py tests/test_masks.py tests/test_bad_inputs.py \
             tests/test_limits.py
test-asan: $(STAMP)
	mkdir -p out/asan && rm -f out/asan/report.*
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:log_path=$(CURDIR)/out/asan/report \
	  FUSED_ATTN_EMU_ASAN=1 FUSED_ATTN_ASAN=1 $(PY) -m pytest -q -n $(JOBS) -k "cuda-emu or cpu" $(ASAN_TESTS) \
	  || (cat out/asan/report.* 2>/dev/null; exit 1)

# Randomised differential testing, long form (`make test` runs a fixed slice: tests/test_fuzz.py):
# N cases per engine against the fp32 oracle, forward and gradients; a summary, and a one-line
# reproducer per failure.  N=10000 took 4-8 min on the cpu engine and 8 min on cuda-emu with 2
# shared cores; triton-interp 29 min (5.7 cases/s with the cores busy; 1.4 before
# tests/_triton_interp.speed_up and per-case tile sizes: 300 cases back to back, 208 s -> 61 s).
# Interpreted / emulated engines run smaller shapes; each engine stops starting cases after
# FUZZ_TIME seconds.  Then the integrations under load (tests/fuzz_hf.py; `make test` runs a slice:
# tests/test_fuzz_hf.py): FUZZ_HF_N random HF batches / thread / patch-unpatch race cases against
# eager, ~2.5 s a case, stopping after FUZZ_TIME seconds too.
N         ?= 10000
SEED      ?= 0
FUZZ_ENGINES ?= cpu,cuda-emu,triton-interp
FUZZ_TIME ?= 1800
FUZZ_HF_N ?= 500
fuzz: $(STAMP)
	$(PY) tests/fuzz.py --engine $(FUZZ_ENGINES) --n $(N) --seed $(SEED) --jobs $(JOBS) --time-limit $(FUZZ_TIME)
	$(PY) -W ignore::UserWarning tests/fuzz_hf.py --n $(FUZZ_HF_N) --seed $(SEED) --time-limit $(FUZZ_TIME)

# The kernel variants the fuzzer's cases reach, compiled for sm_90 with the tiles an H100 gets, through the
# public API and Triton's real launch path (a stand-in driver; nothing runs).  Opt-in: ~15 s a case.
SWEEP_N ?= 100
compile-sweep: $(STAMP)
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(PY) -u tests/_triton_offline_sweep.py $(SWEEP_N)

# On a GPU machine with torch/triton already installed (no venv): the CUDA-marked tests, in GPU_JOBS
# processes where pytest-xdist is installed (the first launch of each Triton kernel variant compiles it:
# one process spends most of the run compiling).
GPU_JOBS ?= 8
test-gpu:
	python -m pytest -q -m cuda $$(python -c "import xdist" 2>/dev/null && echo "-n $(GPU_JOBS)") tests

# One device call (10 min): every GPU number and check, by value, each step in its own time box, in at most
# GPU_BUDGET seconds (benchmarks/gpu_check.py; `python -m benchmarks.gpu_check --dry-run` shows the plan).
# With the machine's own python (no venv); BUNDLE=$$OUT copies summary.md and a tar.gz there after each step.
OUT        ?= out/gpu_check
GPU_BUDGET ?= 540
GPU_PYTHON ?= $(shell command -v python >/dev/null 2>&1 && echo python || echo python3)
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --out $(OUT) --budget $(GPU_BUDGET) $(if $(BUNDLE),--bundle $(BUNDLE))

# The Triton cache of gpu-check's steps (kernels, host, sanitizer, flex, local, deberta, hf), compiled here for
# the GPU machine's Triton (3.6.0, Python 3.12, sm_90) with the stand-in driver: .triton-prebuilt.tar.gz
# (~3 MB, git-ignored; carry it to the device call).  Needs triton==3.6.0 beside torch and transformers in a
# venv of its own (~2 min to make, 4-6 min to build on 2 shared cores, ~5 GB of memory at most).
VENV36 ?= .venv-triton36
$(VENV36)/.installed:
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/pip install -q torch==2.13.0 triton==3.6.0 numpy packaging transformers==5.18.0
	touch $@
triton-cache: $(VENV36)/.installed
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(VENV36)/bin/python -u -m benchmarks.triton_cache build \
	  --out .triton-prebuilt.tar.gz

bench: $(STAMP)
	$(PY) -m benchmarks --preset cpu-small --out out/bench

clean:
	rm -rf $(VENV) $(VENV_HF4) build *.egg-info
