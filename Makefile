# Ferry: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv demo test test-fast lint typecheck bench bench-control bench-scale bench-sensor bench-placement bench-qemu bench-balance bench-drain soak chaos clean

help:
	@grep -E '^[a-z-]+:.*?## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,hypervisors,otlp]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install Ferry with its dev tools

demo: $(STAMP) ## Run the demo on the embedded in-process bus (nothing else needed)
	$(VENV)/bin/ferry demo

test: $(STAMP) ## Everything: unit, contract, integration (real RabbitMQ, PostgreSQL), QEMU, libvirt, deploy
	bash scripts/ensure-services.sh
	bash scripts/ensure-hypervisors.sh
	$(PY) -m pip install -q -r requirements-deploy.txt
	$(PY) -m pytest -q -ra

test-fast: $(STAMP) ## Only what runs on the in-process bus
	FERRY_ONLY_MEMORY=1 $(PY) -m pytest -q -m "not rabbitmq and not postgres and not qemu and not libvirt" tests/unit tests/contract tests/integration

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check apps libs services tests bench
	$(VENV)/bin/mypy libs/common/ferry_common apps/cli/ferry_cli apps/testing/ferry_testing services
	$(VENV)/bin/mypy --strict services/coordinator/ferry_coordinator/saga libs/common/ferry_common/errors.py libs/common/ferry_common/retry.py

bench: bench-control bench-scale bench-sensor bench-placement ## All benchmarks of the control plane

bench-control: $(STAMP) ## Concurrent migrations per second against the real RabbitMQ (hosts apart, then one process)
	bash scripts/ensure-services.sh
	$(PY) bench/control_plane.py --host-process
	$(PY) bench/control_plane.py

bench-scale: $(STAMP) ## 10k elements and 100k queued events: management-plane time
	$(PY) bench/scale.py

bench-sensor: $(STAMP) ## Sensor intake and dispatch rate
	$(PY) bench/sensor.py

bench-placement: $(STAMP) ## Placement decisions on a simulated fleet of 100 to 1,000 hosts (20 VMs each)
	$(PY) bench/placement.py

bench-drain: $(STAMP) ## Draining a host of 100 sim VMs under limits against ceil(VMs/outbound) x one migration
	bash scripts/ensure-services.sh
	$(PY) bench/drain.py

bench-qemu: $(STAMP) ## Bare QMP migration vs the full saga with real QEMU
	bash scripts/ensure-services.sh
	bash scripts/ensure-hypervisors.sh
	$(PY) bench/qemu_bare_vs_saga.py

bench-balance: $(STAMP) ## Fleet balancing simulation: 100 hosts, 2,000 VMs, none vs greedy vs Ferry (plot in docs/img)
	$(PY) bench/balance_sim.py

soak: $(STAMP) ## The fault-injection suite in its long mode
	bash scripts/ensure-services.sh
	FERRY_SOAK=1 $(PY) -m pytest -q tests/faults

CHAOS_SEED ?= 1
CHAOS_MIGRATIONS ?= 200
chaos: $(STAMP) ## Randomized chaos run: CHAOS_SEED=N CHAOS_MIGRATIONS=N (faults at random, then every invariant)
	bash scripts/ensure-services.sh
	$(PY) -m tests.faults.chaos --seed $(CHAOS_SEED) --migrations $(CHAOS_MIGRATIONS) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

include deploy/validate.mk
include scripts/contract.mk
