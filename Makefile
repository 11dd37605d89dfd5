# Quick start: `make demo` (check + speed comparison on this machine) and `make test` (the suite).
# Both create .venv/ from a fresh clone: pinned dev versions (torch 2.13.0 CPU build, triton 3.8.0,
# transformers 5.18.0) from requirements-*.txt, then fused_attn in editable mode.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test test-gpu bench clean

$(STAMP): requirements-dev.txt requirements-hf.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt -r requirements-hf.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m fused_attn.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# On a GPU machine with torch/triton already installed (no venv): the CUDA-marked tests.
test-gpu:
	python -m pytest -q -m cuda tests

clean:
	rm -rf $(VENV) build *.egg-info
