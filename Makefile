# `make demo` and `make test` each set everything up from a fresh clone (a .venv with mmwb and its extras, at the
# exact versions in constraints.txt that the suite last passed with), reinstalling only when pyproject.toml or the
# lock changed, then run the main job or the whole test suite. `make test-latest` runs the same suite against the
# newest releases in a venv of its own; `make lock` does that and, when it passes, rewrites constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
LATEST := .venv-latest
OUT ?= out/demo
PIP := python -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint clean test-latest lock

install: $(STAMP)

# The build backend goes into the venv at its locked version (no build isolation), so every package the two
# commands install is in the lock.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) -c $(LOCK) setuptools wheel
	$(BIN)/$(PIP) -c $(LOCK) --no-build-isolation -e '.[dev]'
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

# The newest releases pyproject.toml allows, in a fresh venv of their own: drift shows here first, on purpose.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/$(PIP) --upgrade setuptools wheel
	$(LATEST)/bin/$(PIP) --upgrade --no-build-isolation -e '.[dev]'
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest

# Rewrite the lock from the venv that test-latest just passed in (pip itself is not locked: the venv brings it).
lock: test-latest
	{ echo "# The exact versions \`make test\` passed with: written by \`make lock\` on $$(date -u +%F)"; \
	  echo "# ($$($(LATEST)/bin/python -c 'import platform; print(platform.python_implementation(), platform.python_version(), platform.system(), platform.machine())')). Ranges for users stay in pyproject.toml."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) out .pytest_cache .ruff_cache
