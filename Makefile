# Chapar: one entry point for set-up, demo, tests and checks.
# Needs only python3, make and npm on the machine; everything else goes into .venv and
# node_modules inside this directory.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUF    := node_modules/.bin/buf
BUF_STAMP := node_modules/.installed

.PHONY: install lock demo test check lint typecheck buflint proto clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Writes what .venv holds now into constraints.txt, keeping its header.
lock: $(STAMP)
	{ grep '^#' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

$(BUF_STAMP): package.json
	npm install --no-audit --no-fund --silent
	touch $(BUF_STAMP)

demo: $(STAMP)
	$(VENV)/bin/chapar demo

test: $(STAMP) $(BUF_STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

buflint: $(BUF_STAMP)
	$(BUF) lint

check: lint typecheck buflint test

proto: $(STAMP)
	$(PY) -m client_sdk._codegen

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
