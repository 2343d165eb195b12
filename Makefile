# sumstream: the everyday commands. `make up` runs the service, `make test` the tests.
.PHONY: up test check lint types layers broker broker-stop bench bootstrap

VENV := .venv/bin

bootstrap:
	scripts/bootstrap

up: bootstrap
	$(VENV)/sumstream up

test:
	scripts/test

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

types: bootstrap
	$(VENV)/mypy pipeline gateway

# The import contracts of pyproject.toml [tool.importlinter]: which layer may import which.
layers: bootstrap
	$(VENV)/lint-imports

check: lint types layers test

broker: bootstrap
	$(VENV)/sumstream broker start

broker-stop: bootstrap
	$(VENV)/sumstream broker stop

bench: bootstrap
	$(VENV)/python -m bench.run
