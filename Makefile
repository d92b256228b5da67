# `make demo` and `make test` each set everything up from a fresh clone (a .venv with mmwb and its extras),
# reinstalling only when pyproject.toml changed, then run the main job or the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/mmwb env
	$(BIN)/python pipelines/runtime_demo.py --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
