# Two commands do all the set-up on a fresh machine:
#   make run    train the tiny world end to end (the main job)
#   make test   lint + the whole test suite, notebooks included (two lanes side by side: tests/lanes.sh)
#   make test-fast  lint + the unit tests only: no notebooks, browser, launcher or long training tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast lint bench notebooks clean-outputs

# torch is installed first and pinned: on CPU machines 2.13.0 resolves to the CPU build, and nothing
# installed after it may pull the multi-GB CUDA build. GPU users use environment.yml instead.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,notebooks]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash run_zero2.sh

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	PATH="$(abspath $(BIN)):$$PATH" bash tests/lanes.sh

# The quick lane for development: deselects the slow markers registered in pyproject.toml.
test-fast: lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q tests -m "not notebook and not browser and not launcher and not training and not serving"

# Speed, padded vs packed, side by side (not part of `make test`); figures and results.json in benchmarks/out.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.packing

# Strip executed outputs before committing notebooks.
clean-outputs: $(STAMP)
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb
