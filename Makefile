# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: install demo test lint validate-deploy stack-test

# The CPU build of torch goes in first, so the project's torch range never pulls a CUDA build.
$(BIN)/xmr: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/xmr

install: $(BIN)/xmr

demo: install
	$(BIN)/xmr demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check training service tests benchmarks deploy
	$(BIN)/mypy
	$(BIN)/mypy deploy/stack/stack_test.py

# Offline checks of the Dockerfile, docker-compose.yml and deploy/ (pinned validators, no engine).
validate-deploy: install
	$(BIN)/pip install -q -r deploy/requirements-validate.txt
	bash deploy/validate.sh

# The local stack for real (deploy/stack/stack_test.py): a Docker engine (installed and started
# when none answers), the images, `docker compose up --wait`, the API through its port, then
# `down -v`. Synthetic markets unless STACK_DATA=dir; STACK_BUILDERS=classic,buildkit.
STACK_BUILDERS ?= classic
stack-test: install
	$(BIN)/pip install -q -r deploy/requirements-validate.txt
	$(BIN)/python deploy/stack/stack_test.py $(if $(STACK_DATA),--data $(STACK_DATA)) --builders $(STACK_BUILDERS)

# Reliability runs (benchmarks/RELIABILITY.md): schema fuzzing of a real server, Redis kill and
# reloads under load, then a soak with hostile input. Data: DATA=dir or XMR_DATA_DIR, else
# the synthetic markets. `make reliability SOAK_SECONDS=300`.
.PHONY: reliability
SOAK_SECONDS ?= 180
FUZZ_EXAMPLES ?= 200
DATA ?= $(XMR_DATA_DIR)
RELIABILITY_OUT ?= out/reliability
reliability: install
	mkdir -p $(RELIABILITY_OUT)
	$(BIN)/python benchmarks/fuzz.py $(if $(DATA),--data $(DATA)) --workdir $(RELIABILITY_OUT) --max-examples $(FUZZ_EXAMPLES)
	$(BIN)/python benchmarks/chaos.py $(if $(DATA),--data $(DATA)) --workdir $(RELIABILITY_OUT) --out $(RELIABILITY_OUT)/chaos.json
	$(BIN)/python benchmarks/soak.py $(if $(DATA),--data $(DATA)) --workdir $(RELIABILITY_OUT) --seconds $(SOAK_SECONDS) --out $(RELIABILITY_OUT)/soak.json
