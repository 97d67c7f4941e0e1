# Every task a person or CI runs. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
MAKEFLAGS += --no-print-directory

UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen
SERVICES := auth catalog chat
SOURCES := libs/kit/src/kit services/auth/src/auth services/catalog/src/catalog services/chat/src/chat gateway/src/gateway
TESTS := libs/kit/tests services/auth/tests services/catalog/tests services/chat/tests gateway/tests

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: install
install: ## Install uv (if missing) and every package into .venv
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install -q "uv==$(UV_VERSION)"
	@$(UV) sync --frozen --all-packages --quiet

.PHONY: fmt
fmt: install ## Format and auto-fix
	@$(RUN) ruff format .
	@$(RUN) ruff check --fix .

.PHONY: check
check: install ## Lint, format check and type check
	@$(RUN) ruff check .
	@$(RUN) ruff format --check .
	@$(RUN) mypy $(SOURCES) tests bench
	@# each suite on its own: every suite has a conftest.py of the same name
	@for suite in $(TESTS); do $(RUN) mypy $$suite; done

.PHONY: unit
unit: install ## Each service's tests against real PostgreSQL and Redis
	@for suite in $(TESTS); do echo "== $$suite"; $(RUN) pytest -q $$suite; done

PROMTOOL := $(CURDIR)/.tools/bin/promtool

.PHONY: tools
tools: ## promtool (from Debian's prometheus package) into .tools/bin, if missing
	@test -x $(PROMTOOL) || observability/install-promtool.sh $(CURDIR)/.tools

.PHONY: e2e
e2e: install tools ## The compose stack through the gateway, and the observability profile's files
	@PROMTOOL=$(PROMTOOL) $(RUN) pytest -q tests/e2e

.PHONY: test
test: check unit e2e ## Everything CI runs: lint, types, unit and end-to-end tests

.PHONY: up
up: ## Start the stack with three chat replicas
	docker compose up --build --scale chat=3 --wait

.PHONY: down
down: ## Stop the stack and drop its volumes
	docker compose down --volumes --remove-orphans

.PHONY: logs
logs: ## Follow the stack's logs
	docker compose logs -f

.PHONY: migrate
migrate: ## Run every service's migrations against the running stack
	docker compose run --rm migrate-auth
	docker compose run --rm migrate-catalog
	docker compose run --rm migrate-chat

.PHONY: revision
revision: install ## New migration: make revision SERVICE=catalog MESSAGE="add x"
	@cd services/$(SERVICE) && $(RUN) alembic revision -m "$(MESSAGE)"

.PHONY: bench
bench: install ## Benchmarks side by side; writes bench/results.md and .json
	@$(RUN) python bench/run.py

.PHONY: clean
clean: ## Remove caches, tools and the virtual environment
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
