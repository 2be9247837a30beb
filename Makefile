# CT2MRTranslation: set-up, demo and test commands (see README.md).
#
#   make setup   creates .venv with the ct2mr engine (editable), its dependencies and the test tools
#   make demo    sets up, then translates a public chest CT with the default model
#   make test    sets up, then runs every test (the Slicer front end on a real MRML scene from slicer-core)
#   make test-fast  the same without the tests marked slow
#
# TORCH picks the PyTorch build: the default takes the CPU wheel 2.13.0 (found on disk here); on a CUDA machine use
# e.g. `make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu126"`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.ct2mr-installed

$(VENV)/.ct2mr-installed: training/pyproject.toml requirements-test.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements-test.txt -e "training[test]" -r requirements-test.txt
	touch $@

demo: setup
	$(VENV)/bin/ct2mr demo --output demo_output

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
