# The two commands a newcomer needs: `make run` and `make test`.
# Both create .venv on first use; it is rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= ./var

.PHONY: venv run test lint typecheck bench-upload clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: venv
	$(BIN)/taskvision serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

# The whole suite: static checks first (seconds), then every test, in TEST_WORKERS processes
# (pytest-xdist; each test file stays in one process, with its module fixtures). 0 runs them in
# this process, one at a time.
TEST_WORKERS ?= 2
test: venv lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

bench-upload: venv
	$(BIN)/python bench/upload.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
