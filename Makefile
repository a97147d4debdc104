# make test : build egnn into .venv and run the test suite (what CI runs)
# make demo : build egnn into .venv and run the end-to-end demo on the shipped HfO2 data
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.egnn-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench clean
install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the local CPU wheel; an unpinned resolve would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton,pyscf]"
	# fairchem-core for tests/test_fairchem.py (egnn.interop.fairchem), ~45 s: without its declared
	# dependencies (a torch pin and CUDA-only packages a CPU run never imports), only those its
	# models and data import; setuptools < 81 keeps pkg_resources for torchtnt. Optional: where it
	# cannot be installed, the fairchem tests skip and say why
	( $(PY) -m pip install -q --no-deps "fairchem-core==2.24.*" && \
	  $(PY) -m pip install -q "setuptools>=64,<81" wandb hydra-core torchtnt submitit monty huggingface-hub backoff ) \
	  || echo "fairchem-core not installed: tests/test_fairchem.py will be skipped"
	# EquiformerV2 is in fairchem-core 1.x only: 1.10 and torch-geometric (pure Python) into the
	# gitignored folder .fairchem1, which only tests/fairchem1_check.py puts on sys.path (~5 s).
	# Optional too: without it the EquiformerV2 tests skip and say why
	$(PY) -m pip install -q --no-deps --upgrade --target .fairchem1 "fairchem-core==1.10.0" "torch-geometric>=2.5" \
	  || echo "fairchem-core 1.10 not installed in .fairchem1: the EquiformerV2 tests will be skipped"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m egnn demo --out out/demo

clean:
	rm -rf build dist *.egg-info egnn/_C*.so out
