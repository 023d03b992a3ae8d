# Offline validation of the deployment files (kustomize renders, Kubernetes and CRD schemas,
# docker-compose.yml against the Compose Specification, Prometheus rules and their unit tests). Include from the Makefile:
#   include deploy/validate.mk
PYTHON ?= .venv/bin/python

.PHONY: validate-deploy
validate-deploy: ## Validate deploy/ manifests, docker-compose.yml and the alerting rules (promtool) offline
	PYTHON=$(PYTHON) bash scripts/validate-deploy.sh
