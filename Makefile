# Thin wrappers; the README shows the direct commands too.
PY ?= python
ARCH ?= densenet_bc
DATA_DIR ?= ./data

.PHONY: install train test
install:
	$(PY) -m pip install -e ".[dev]"
train: install
	$(PY) experiments/run.py --arch $(ARCH) --data-dir $(DATA_DIR) --download
test: install
	$(PY) -m pytest -q
