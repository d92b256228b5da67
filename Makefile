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

# The main job first (the shipped tiny-shapes VLM captions and answers questions about fresh images, then a real
# photo), then the shipped score models and the shipped ControlNet.
demo: $(STAMP)
	$(BIN)/mmwb env
	$(BIN)/python pipelines/shapes_demo.py --out $(OUT)
	$(BIN)/python pipelines/runtime_demo.py --out $(OUT)
	$(BIN)/mmwb sample --sampler heun --steps 24 --n 2000 --out $(OUT)/sde_checkerboard.png
	$(BIN)/mmwb sample --model assets/models/sde-digits --sampler heun --steps 12 --n 64 --out $(OUT)/sde_digits.png
	$(BIN)/mmwb sample --model assets/models/sde-digits --label all --sampler heun --steps 24 --n 50 --quality \
	  --out $(OUT)/sde_digits_0_to_9.png
	$(BIN)/mmwb generate --control-image assets/models/shapes-controlnet-canny/example_control.png \
	  --preprocess canny --prompt "a small purple star, a large purple triangle and a large red circle" \
	  --num-images 4 --guidance-scale 3 --out $(OUT)/controlnet

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
