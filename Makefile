# The two README commands: `make demo` and `make test`. Both create .venv and install the project.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= ./ldm-demo
QUALITY_WORKDIR ?= ./ldm-quality
PYTEST_FLAGS ?=

export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo quality test test-all test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	# One retry each: a package index that drops a connection fails an install that would pass.
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel || $(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]' || $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The whole pipeline end to end on the embedded default (no GPU, no hub, about 19 minutes on 2 cores: the U-Net trains for what its 19-minute budget leaves).
demo: $(STAMP)
	$(BIN)/ldm demo --workdir $(WORKDIR)

## The quality profile (configs/quality.yaml): the same pipeline with more data, a longer-trained CLIP
## and an hour of U-Net steps, sized for about 90 minutes on 2 cores (docs/TRAINING.md, turns 12,
## 16, 17 and 19).
quality: $(STAMP)
	$(BIN)/ldm demo --config configs/quality.yaml --workdir $(QUALITY_WORKDIR)

## The test suite CI runs (under 30 minutes on 2 cores): everything but the `nightly` end-to-end tests.
test: $(STAMP)
	$(BIN)/ruff check ldm pipelines serve tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --timeout 1200 --durations=25 -m "not nightly" $(PYTEST_FLAGS) tests

## Every test, the `nightly` ones too (retrain cycles, notebooks, autoscaling, `ray job submit` and
## `serve deploy` against a token-protected head, the GPU benchmark script on CPU, fault tolerance, the SD chain on S3 (tests/test_sd_chain.py: SD 1.x full, SD 2.x full and LoRA,
## the SD retrain cycle; `make test` keeps its SD 1.x LoRA leg without the resume),
## `mlflow models serve`): about an hour on 2 cores.
test-all: $(STAMP)
	$(BIN)/ruff check ldm pipelines serve tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --timeout 1200 $(PYTEST_FLAGS) tests

## A quick subset while you work: everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --timeout 600 -m "not slow" $(PYTEST_FLAGS) tests

lint: $(STAMP)
	$(BIN)/ruff check ldm pipelines serve tests benchmarks
	$(BIN)/mypy
	$(BIN)/ruff format --check ldm pipelines serve tests benchmarks

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
