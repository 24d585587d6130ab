# Thin wrappers; the README shows the direct commands too.
PY ?= python
ARCH ?= resnet20
RECIPE ?= quickstart
DATA_DIR ?= ./data

.PHONY: install train test
install:
	$(PY) -m pip install -e ".[dev]"
train: install
	$(PY) experiments/run.py --arch $(ARCH) --recipe $(RECIPE) --data-dir $(DATA_DIR) --download
test: install
	$(PY) -m pytest -q
