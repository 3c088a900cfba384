# Every target sets up what it needs: a virtual environment in .venv with the pinned, tested versions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= torch,tf,dev
STAMP := $(VENV)/.installed-$(shell echo "$(EXTRAS)" | tr ',' '-')
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint bench demo functions constraints clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/python -m ruff check plugin tests bench functions

bench: setup
	$(BIN)/python bench/inference_overhead.py

functions: setup
	$(BIN)/preannotate functions render

constraints: setup
	( echo "# Versions tested together (pip install -c constraints.txt ...). Regenerate with make constraints."; \
	  $(BIN)/python -m pip freeze --exclude-editable ) > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
