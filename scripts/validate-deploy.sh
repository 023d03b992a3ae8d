#!/usr/bin/env bash
# Validate Ferry's deployment files offline: kustomize renders, Kubernetes schemas (strict),
# custom resource schemas, Ferry's deployment rules, docker-compose.yml against the
# vendored Compose Specification schema, and the Prometheus alerting rules with their unit
# tests (promtool, installed from Debian's prometheus package when missing). No Docker, no cluster, no network at validation time.
#
#   scripts/validate-deploy.sh                # everything, then the negative self-test
#   scripts/validate-deploy.sh --k8s FILE     # only FILE (also --kustomization DIR, --compose FILE)
#
# Tools: kubectl (kustomize built in) or kustomize on PATH, or KUSTOMIZE=/path; the Python
# tools come from requirements-deploy.txt and are installed into $PYTHON's environment when
# missing. PYTHON defaults to the project's .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

if ! "$PYTHON" -c 'import kubernetes_validate, check_jsonschema, yaml' 2>/dev/null; then
  echo "validate-deploy: installing tools from requirements-deploy.txt into $("$PYTHON" -c 'import sys; print(sys.prefix)')" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -r requirements-deploy.txt
fi

VALIDATOR=(env PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$ROOT/deploy/tools/validate_deploy.py")

if [[ $# -gt 0 ]]; then
  exec "${VALIDATOR[@]}" "$@"
fi

"${VALIDATOR[@]}"

# Alerting rules: their syntax, and their unit tests (promtool, from Debian's prometheus)
bash "$ROOT/scripts/ensure-promtool.sh"
promtool check rules "$ROOT/deploy/prometheus/ferry-alerts.yaml"
promtool test rules "$ROOT/deploy/prometheus/ferry-alerts.test.yaml"

# Negative self-test: the validator must reject each deliberately broken fixture.
FIXTURES="$ROOT/tests/deploy/fixtures"
status=0
for args in \
  "--k8s $FIXTURES/broken-deployment.yaml" \
  "--k8s $FIXTURES/broken-rabbitmqcluster.yaml" \
  "--k8s $FIXTURES/unknown-kind.yaml" \
  "--kustomization $FIXTURES/broken-kustomization" \
  "--compose $FIXTURES/broken-compose.yml" \
  "--k8s $FIXTURES/broken-host-services.yaml" \
  "--compose $FIXTURES/broken-compose-host.yml"; do
  # shellcheck disable=SC2086  # word splitting of $args is intended
  if "${VALIDATOR[@]}" --quiet $args >/dev/null 2>&1; then
    echo "validate-deploy: SELF-TEST FAILED: accepted a broken fixture ($args)" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "validate-deploy: self-test OK (7 broken fixtures rejected)"
exit $status
