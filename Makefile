# sumstream: the everyday commands. `make up` runs the service, `make test` the tests.
.PHONY: up test check lint types layers broker broker-stop bench chaos bootstrap

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

# A seeded chaos run on a 3-node cluster of its own (at most 10 minutes; SEED=n, DURATION=s):
# the report goes to .data/chaos/, its last line is the verdict (docs/operations.md, "Chaos").
SEED ?= 1
DURATION ?= 240
chaos: bootstrap
	$(VENV)/python -m bench.chaos --seed $(SEED) --duration $(DURATION)
