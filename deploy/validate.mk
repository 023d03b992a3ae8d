# Offline validation of the deployment files (kustomize renders, Kubernetes and CRD schemas,
# docker-compose.yml against the Compose Specification). Include from the Makefile:
#   include deploy/validate.mk
PYTHON ?= .venv/bin/python

.PHONY: validate-deploy
validate-deploy: ## Validate deploy/ manifests and docker-compose.yml offline (no Docker, no cluster)
	PYTHON=$(PYTHON) bash scripts/validate-deploy.sh
