# The public contract's document, docs/asyncapi.yaml, is generated from the message registry
# (scripts/gen_asyncapi.py); `make lint` fails when the committed one is stale. Included from
# the Makefile (after its variables): include scripts/contract.mk
.PHONY: asyncapi lint-contract

lint: lint-contract

lint-contract: $(STAMP) ## Lint the contract's generator and the deploy tools; fail if docs/asyncapi.yaml is stale
	$(VENV)/bin/ruff check scripts deploy
	$(VENV)/bin/mypy --strict scripts/gen_asyncapi.py libs/common/ferry_common/messages/contract.py
	$(PY) scripts/gen_asyncapi.py --check

asyncapi: $(STAMP) ## Regenerate docs/asyncapi.yaml from the message registry (make lint checks it is current)
	$(PY) scripts/gen_asyncapi.py
