# The two commands a newcomer needs:  make dev   and   make test
# Everything else is for operators and contributors.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

# Under CI (CI=true) property tests draw the same examples on every run (tests/conftest.py).
ifeq ($(CI),true)
export HYPOTHESIS_PROFILE ?= ci
endif

.PHONY: dev tools test test.unit test.integration test.e2e test.chaos test.soak lint preflight install \
        build.proto check.proto migrate.create migrate.local.up migrate.local.down \
        migrate.proxy.up bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## External tools some tests need (promtool, buf, ...), into .tools/ (see .ci/install-tools).
tools:
	bash .ci/install-tools

preflight: install
	@$(BIN)/python -m paymentsvc.preflight

## Run the whole stack on embedded defaults (own Kafka-compatible broker and fake Stripe;
## own Postgres and Redis where the machine has none: README, "the machine's, or embedded").
dev: preflight
	$(BIN)/paymentsvc dev

## Run every test tier. Sets up the virtualenv first if needed.
test: preflight
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test.unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test.integration: preflight
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

## The checks of the contract for downstream teams (buf, the AsyncAPI CLI: make tools).
.PHONY: test.contract
test.contract: install
	$(BIN)/python -m pytest tests/contract $(PYTEST_ARGS)

test.e2e: preflight
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

## The whole suite 5 times in a row with one core busy (flaky tests show here): .ci/soak [RUNS]
test.soak: preflight
	bash .ci/soak $(or $(RUNS),5)

test.chaos: preflight
	$(BIN)/python -m pytest tests/chaos -s $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check domain paymentsvc services shared tests bench examples
	$(BIN)/mypy
	PYTHONPATH=gen $(BIN)/lint-imports

## Regenerate gen/payment/v1 from proto/ (the generated code is committed).
build.proto: install
	rm -rf gen/payment
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=gen --pyi_out=gen --grpc_python_out=gen proto/payment/v1/*.proto
	rm -f gen/payment/v1/events_pb2_grpc.py
	touch gen/payment/__init__.py gen/payment/v1/__init__.py

## Fail if gen/ is not what build.proto would make from proto/.
check.proto: install
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp proto/payment/v1/*.proto && \
	rm -f $$tmp/payment/v1/events_pb2_grpc.py && touch $$tmp/payment/__init__.py $$tmp/payment/v1/__init__.py && \
	diff -r -x __pycache__ $$tmp/payment gen/payment && echo "generated protobuf code is current" || \
	{ echo "gen/ is stale: run make build.proto and commit the result"; exit 1; }

## The Kubernetes manifests (infra/k8s), offline: both overlays rendered, validated against
## the Kubernetes schemas, checked against the code and scanned by checkov (allow-list with
## reasons). `make test` runs the same file; here a missing tool fails instead of skipping.
.PHONY: check.k8s
check.k8s: install tools
	CI=true $(BIN)/python -m pytest tests/unit/test_k8s_manifests.py $(PYTEST_ARGS)

## Migrations (yoyo, plain SQL in migrations/).
migrate.create: install
	@test -n "$(name)" || { echo "usage: make migrate.create name=add_something"; exit 2; }
	$(BIN)/paymentsvc migration-create $(name)

migrate.local.up: install
	$(BIN)/paymentsvc migrate

migrate.local.down: install
	$(BIN)/paymentsvc migrate --down --steps 1

# Against the host in DATABASE_URL (e.g. a Cloud SQL proxy), with the password given.
# libpq reads PGPASSWORD, so the password is never part of a printed command line.
migrate.proxy.up: install
	@test -n "$(password)" || { echo "usage: make migrate.proxy.up password=..."; exit 2; }
	@PGPASSWORD='$(password)' $(BIN)/paymentsvc migrate

## Run every benchmark at full size (make test runs each in a small smoke mode: tests/bench).
bench: preflight
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/project.py
	$(BIN)/python bench/grpc_checks.py
	$(BIN)/python bench/usage.py
	$(BIN)/python bench/write_shapes.py
	$(BIN)/python bench/tracing.py
	$(BIN)/python bench/batch_cpu.py
	$(BIN)/python bench/interceptor.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .dev
