# Every task a person or CI runs. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
MAKEFLAGS += --no-print-directory

UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen
SERVICES := auth catalog chat
SOURCES := libs/kit/src/kit libs/kit-testing/src/kit_testing services/auth/src/auth services/catalog/src/catalog services/chat/src/chat gateway/src/gateway
TESTS := libs/kit/tests services/auth/tests services/catalog/tests services/chat/tests gateway/tests tests/config tests/deploy
WEB := gateway/src/gateway/web
# Debian packages, installed only when missing (CI runs as root on Debian)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
BACKUP_DIR ?= backups

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

.PHONY: install
install: ## Install uv, Node and npm (if missing), every package into .venv, the npm test tools
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install -q "uv==$(UV_VERSION)"
	@$(UV) sync --frozen --all-packages --quiet
	@command -v npm >/dev/null 2>&1 || { apt-get update -qq && $(APT_INSTALL) nodejs npm >/dev/null; }
	@[ node_modules/.package-lock.json -nt package-lock.json ] \
		|| npm ci --no-audit --no-fund --loglevel=error

.PHONY: browser
browser: ## A Chromium for the browser tests: BROWSER_EXECUTABLE, the system's, or Debian's package
	@if [ -n "$${BROWSER_EXECUTABLE:-}" ] || command -v chromium >/dev/null 2>&1 \
		|| command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && $(APT_INSTALL) chromium >/dev/null; \
	else $(RUN) playwright install chromium; fi

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
	@# the web client is plain ES modules: at least each one must parse
	@for module in $$(find $(WEB) gateway/tests/js -name '*.js'); do node --check $$module; done

.PHONY: unit
unit: install ## Each service's tests against real PostgreSQL and Redis
	@for suite in $(TESTS); do echo "== $$suite"; $(RUN) pytest -q $$suite; done
	@echo "== gateway/tests/js"; node --test gateway/tests/js/

PROMTOOL := $(CURDIR)/.tools/bin/promtool

.PHONY: tools
tools: ## promtool (from Debian's prometheus package) into .tools/bin, if missing
	@test -x $(PROMTOOL) || observability/install-promtool.sh $(CURDIR)/.tools

.PHONY: e2e
e2e: install browser tools ## The compose stack through the gateway, the web client in Chromium, the observability profile's files
	@PROMTOOL=$(PROMTOOL) $(RUN) pytest -q tests/e2e

.PHONY: swarm-test
swarm-test: install ## The stack on a single-node swarm: journey, a killed task, scaling, a rolling update
	@$(RUN) pytest -q tests/swarm

.PHONY: test
test: check unit e2e swarm-test ## Everything CI runs: lint, types, unit, end-to-end and swarm tests

.PHONY: up
up: ## Start the stack with three chat replicas
	docker compose up --build --scale chat=3 --wait

.PHONY: down
down: ## Stop the stack; its data and secrets stay in their volumes
	docker compose down --remove-orphans

.PHONY: destroy
destroy: ## Stop the stack and DELETE its volumes: databases, Redis, secrets
	docker compose down --volumes --remove-orphans

.PHONY: backup
backup: ## Dump every service database to backups/<UTC time>/ (BACKUP_DIR=...)
	@sh ops/backup.sh "$(BACKUP_DIR)"

.PHONY: restore
restore: ## Replace every service database with a backup: make restore BACKUP=<dir>
	@test -n "$(BACKUP)" || { echo "usage: make restore BACKUP=$(BACKUP_DIR)/<UTC time>" >&2; exit 2; }
	@sh ops/restore.sh "$(BACKUP)"

.PHONY: build
build: ## Build every service image, tagged TAG (dev unless set)
	docker compose build auth catalog chat gateway

.PHONY: push
push: build ## Tag and push every image: make push REGISTRY=host[:port][/path] [TAG=...] [DRY_RUN=1]
	@sh deploy/swarm/push.sh

.PHONY: swarm-up
swarm-up: ## Build, make a single-node swarm if there is none, deploy the stack STACK (bazaar)
	@sh deploy/swarm/up.sh

.PHONY: swarm-down
swarm-down: ## Remove the stack, keep its volumes and secrets; leave the swarm if swarm-up made it
	@sh deploy/swarm/down.sh

.PHONY: swarm-destroy
swarm-destroy: ## Remove the stack and DELETE its volumes and secrets
	@SWARM_DESTROY=1 sh deploy/swarm/down.sh

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

# `make bench PARTS="gateway scale"` runs only those parts
PARTS ?=

.PHONY: bench
bench: install ## Benchmarks side by side; writes bench/results.md and .json
	@# wrk drives every HTTP benchmark; nginx is the gateway's reference proxy
	@for tool in wrk nginx; do \
		if ! PATH="$$PATH:/usr/sbin" command -v $$tool >/dev/null 2>&1; then \
			echo "bench: installing $$tool (Debian package)"; \
			apt-get update -qq && RUNLEVEL=1 $(APT_INSTALL) $$tool >/dev/null; \
		fi; \
	done
	@PATH="$$PATH:/usr/sbin" $(RUN) python bench/run.py $(PARTS)

.PHONY: clean
clean: ## Remove caches, tools and the virtual environment
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
