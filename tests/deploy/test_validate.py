"""scripts/validate-deploy.sh accepts the repository's deployment files and rejects broken ones.

Runs in the normal test run (a few seconds, offline). The script installs its Python tools
from requirements-deploy.txt when they are missing; rendering kustomizations needs kubectl
(kustomize built in) or kustomize on PATH, else those cases are skipped with a reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate-deploy.sh"
FIXTURES = ROOT / "tests" / "deploy" / "fixtures"

HAVE_KUSTOMIZE = bool(
    os.environ.get("KUSTOMIZE") or shutil.which("kubectl") or shutil.which("kustomize")
)
needs_kustomize = pytest.mark.skipif(
    not HAVE_KUSTOMIZE, reason="neither kubectl nor kustomize on PATH (set KUSTOMIZE)"
)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the validation script with this interpreter's environment."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_kustomize
def test_repository_deploy_files_are_valid() -> None:
    proc = run_script()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validate-deploy: OK" in proc.stdout
    assert "self-test OK" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["--k8s", "broken-deployment.yaml"],
            ["containerPort: 'http' is not of type 'integer'", "needs a livenessProbe"],
            id="k8s-schema",
        ),
        pytest.param(
            ["--k8s", "broken-rabbitmqcluster.yaml"],
            ["'replica' was unexpected", "spec.persistence.storage"],
            id="crd-schema",
        ),
        pytest.param(
            ["--k8s", "unknown-kind.yaml"],
            ["no schema for example.com/v1/Gadget"],
            id="unknown-kind",
        ),
        pytest.param(
            ["--kustomization", "broken-kustomization"],
            [
                "references Secret/not-in-the-render",
                "needs resources.requests and resources.limits",
                "matches no pod template",
            ],
            id="rules",
            marks=needs_kustomize,
        ),
        pytest.param(
            ["--compose", "broken-compose.yml"],
            ["compose schema", "$.services.app.ports: 8080 is not of type 'array'"],
            id="compose-schema",
        ),
        pytest.param(
            ["--k8s", "broken-host-services.yaml"],
            [
                "DaemonSet/all-in-one: runs `ferry service host`",
                "runs managed_object, sensor but not hypervisor_adapter",
                "managed_object, sensor share the RabbitMQ (AMQP) Secret shared-amqp",
                "managed_object, sensor share the key Secret shared-key",
            ],
            id="host-services-k8s",
        ),
        pytest.param(
            ["--compose", "broken-compose-host.yml"],
            [
                "host-a runs `ferry service host`",
                "host host-b runs managed_object, sensor but not migration_policy",
                "connect as the same RabbitMQ user 'ferry-host-b'",
            ],
            id="host-services-compose",
        ),
    ],
)
def test_broken_fixture_is_rejected(args: list[str], expected: list[str]) -> None:
    proc = run_script(args[0], str(FIXTURES / args[1]))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


@needs_kustomize
def test_valid_standalone_manifest_passes() -> None:
    # migrate-job.yaml refers to the base's ConfigMaps and Secrets: the base render supplies them.
    proc = run_script("--k8s", str(ROOT / "deploy" / "k8s" / "base" / "migrate-job.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_passes() -> None:
    proc = run_script("--compose", str(ROOT / "docker-compose.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
