"""Offline validation of Ferry's deployment files (run through scripts/validate-deploy.sh).

Without Docker or a cluster, and without network access at validation time:

1. every kustomization under ``deploy/k8s/base`` and ``deploy/k8s/overlays/*`` is rendered
   (``kubectl kustomize``, or a standalone ``kustomize build``; ``$KUSTOMIZE`` overrides);
2. every rendered object, and every stand-alone manifest (``deploy/k8s/base/migrate-job.yaml``),
   is validated strictly (unknown fields rejected) against the Kubernetes OpenAPI schemas that
   the pinned ``kubernetes-validate`` ships, for each pinned Kubernetes version;
3. custom resources are validated against ``deploy/schemas/crds/`` (a CRD's
   ``openAPIV3Schema`` if its YAML is there, else the JSON schema naming the kind in
   ``x-kubernetes-group-version-kind``); a kind with no schema at all is an error;
4. Ferry's own rules: resources and probes on long-running containers, every referenced
   ConfigMap/Secret/ServiceAccount/PVC present in the same render, selectors that match a pod
   template, no namespace hard-coded in the base; each host service in a workload of its own
   with its own AMQP and key Secrets (``host_services.py``);
5. ``docker-compose.yml`` against the vendored Compose Specification schema
   (``deploy/schemas/compose-spec.json``), plus ``depends_on`` targets and healthchecks, and
   each host service per host a compose service of its own with its own RabbitMQ user.

Exit status 0 when everything is valid, 1 when anything is not (every problem is printed).
The explicit options (``--k8s``, ``--kustomization``, ``--compose``) validate only what
they name; ``tests/deploy/test_validate.py`` uses them on broken fixtures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import host_services  # deploy/tools: each host service its own workload, user and key
import jsonschema
import kubernetes_validate
import yaml
from k8s_rules import Report, check_rules, describe  # deploy/tools: Ferry's own rules

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
SCHEMAS_DIR = ROOT / "deploy" / "schemas"
CRD_DIR = SCHEMAS_DIR / "crds"
COMPOSE_SCHEMA = SCHEMAS_DIR / "compose-spec.json"

#: Kubernetes versions every manifest must be valid for (oldest and newest we support).
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")

#: Manifests that are not in any kustomization but are applied on their own.
STANDALONE_MANIFESTS = ("deploy/k8s/base/migrate-job.yaml",)

# ---- rendering ----------------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    """The command that renders a kustomization directory (appended), or None."""
    override = os.environ.get("KUSTOMIZE")
    if override:
        return (
            [*override.split(), "build"] if "kubectl" not in override else [override, "kustomize"]
        )
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(directory: Path, command: list[str]) -> list[dict[str, Any]]:
    """Render one kustomization; raise ``RuntimeError`` with kustomize's message on failure."""
    proc = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"exit status {proc.returncode}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file (``ValueError`` if one is not a mapping)."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ValueError(f"document {i} is a {type(doc).__name__}, not a mapping")
    return docs


def default_kustomizations() -> list[Path]:
    """The base and every overlay."""
    dirs = [K8S_DIR / "base"]
    overlays = K8S_DIR / "overlays"
    if overlays.is_dir():
        dirs += sorted(p for p in overlays.iterdir() if (p / "kustomization.yaml").is_file())
    return dirs


# ---- schemas ------------------------------------------------------------------------------


def _gvk_key(group: str, version: str, kind: str) -> str:
    return f"{group}/{version}/{kind}" if group else f"{version}/{kind}"


def load_crd_schemas(directory: Path = CRD_DIR) -> dict[str, dict[str, Any]]:
    """``group/version/kind`` -> JSON schema, from CRD YAML files and standalone JSON schemas.

    A CRD's ``openAPIV3Schema`` wins over a hand-written JSON schema of the same kind.
    """
    from_json: dict[str, dict[str, Any]] = {}
    from_crd: dict[str, dict[str, Any]] = {}
    if not directory.is_dir():
        return {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".json":
            schema = json.loads(path.read_text(encoding="utf-8"))
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                from_json[_gvk_key(gvk["group"], gvk["version"], gvk["kind"])] = schema
        elif path.suffix in (".yaml", ".yml"):
            for doc in load_documents(path):
                if doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for version in spec.get("versions", []):
                    schema = (version.get("schema") or {}).get("openAPIV3Schema")
                    if schema:
                        key = _gvk_key(spec["group"], version["name"], spec["names"]["kind"])
                        from_crd[key] = schema
    return {**from_json, **from_crd}


def gvk_of(obj: dict[str, Any]) -> str:
    """``group/version/kind`` (core group: ``version/kind``) of a manifest."""
    api_version = str(obj.get("apiVersion", ""))
    group, _, version = api_version.rpartition("/")
    return _gvk_key(group, version, str(obj.get("kind", "")))


def validate_object(
    obj: dict[str, Any],
    where: str,
    report: Report,
    crd_schemas: dict[str, dict[str, Any]],
    versions: Iterable[str],
) -> None:
    """Schema-validate one manifest (Kubernetes built-in kinds or a known custom resource)."""
    report.checked += 1
    label = f"{where}: {describe(obj)}"
    if not obj.get("apiVersion") or not obj.get("kind"):
        report.error(label, "missing apiVersion or kind")
        return
    key = gvk_of(obj)
    if key in crd_schemas:
        validator_cls = jsonschema.validators.validator_for(
            crd_schemas[key], jsonschema.Draft7Validator
        )
        validator = validator_cls(crd_schemas[key])
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in err.absolute_path) or "(root)"
            report.error(label, f"{path}: {err.message}")
        return
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path) or "(root)"
            report.error(label, f"[k8s {version}] {path}: {err.message}")
            return
        except kubernetes_validate.SchemaNotFoundError:
            report.error(
                label,
                f"no schema for {key} (not a Kubernetes {version} kind, and no CRD schema in "
                f"{CRD_DIR.relative_to(ROOT)})",
            )
            return


# ---- compose ------------------------------------------------------------------------------


def validate_compose(path: Path, report: Report, schema_path: Path = COMPOSE_SCHEMA) -> None:
    """Validate a compose file against the vendored Compose Specification schema, and more."""
    report.checked += 1
    where = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        report.error(where, f"not YAML: {exc}")
        return
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--schemafile",
            str(schema_path),
            "--disable-formats",
            "*",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        report.error(where, "compose schema:\n" + (proc.stdout + proc.stderr).strip())
        return
    services: dict[str, Any] = (data or {}).get("services") or {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, cond in deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps):
            if dep not in services:
                report.error(where, f"service {name} depends on unknown service {dep}")
            elif (cond or {}).get("condition") == "service_healthy" and not services[dep].get(
                "healthcheck"
            ):
                report.error(
                    where, f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )
    host_services.check_compose(services, where, report.error)


# ---- main ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    """Validate what ``args`` names (everything by default)."""
    report = Report()
    versions = tuple(args.kubernetes_version or KUBERNETES_VERSIONS)
    crd_schemas = load_crd_schemas(Path(args.crd_dir))
    explicit = bool(args.k8s or args.kustomization or args.compose)

    kustomizations = [Path(p) for p in args.kustomization] if explicit else default_kustomizations()
    standalone = (
        [Path(p) for p in args.k8s] if explicit else [ROOT / p for p in STANDALONE_MANIFESTS]
    )
    composes = [Path(p) for p in args.compose] if explicit else [ROOT / "docker-compose.yml"]

    base_objs: list[dict[str, Any]] = []
    if kustomizations:
        command = kustomize_command()
        if command is None:
            report.error(
                "kustomize",
                "neither kubectl nor kustomize is on PATH (set KUSTOMIZE=/path/to/kustomize): "
                "cannot render the kustomizations",
            )
        else:
            for directory in kustomizations:
                where = str(
                    directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory
                )
                try:
                    objs = render(directory, command)
                except (RuntimeError, subprocess.TimeoutExpired, yaml.YAMLError) as exc:
                    report.error(where, f"kustomize failed: {exc}")
                    continue
                if not objs:
                    report.error(where, "renders to nothing")
                for obj in objs:
                    validate_object(obj, where, report, crd_schemas, versions)
                is_base = directory.resolve() == (K8S_DIR / "base").resolve()
                if is_base:
                    base_objs = objs
                check_rules(objs, where, report, is_base=is_base)
    if standalone and not base_objs and (command := kustomize_command()) is not None:
        try:  # stand-alone manifests refer to objects of the base: know them
            base_objs = render(K8S_DIR / "base", command)
        except (RuntimeError, subprocess.TimeoutExpired, yaml.YAMLError):
            pass
    for path in standalone:
        where = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        try:
            objs = load_documents(path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            report.error(where, str(exc))
            continue
        for obj in objs:
            validate_object(obj, where, report, crd_schemas, versions)
        check_rules(objs, where, report, known=base_objs)
    for path in composes:
        validate_compose(path, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--k8s",
        action="append",
        default=[],
        metavar="FILE",
        help="validate this stand-alone manifest file (repeatable)",
    )
    parser.add_argument(
        "--kustomization",
        action="append",
        default=[],
        metavar="DIR",
        help="render and validate this kustomization (repeatable)",
    )
    parser.add_argument(
        "--compose",
        action="append",
        default=[],
        metavar="FILE",
        help="validate this compose file (repeatable)",
    )
    parser.add_argument(
        "--kubernetes-version",
        action="append",
        metavar="X.Y.Z",
        help=f"validate against this version (repeatable; default {', '.join(KUBERNETES_VERSIONS)})",
    )
    parser.add_argument("--crd-dir", default=str(CRD_DIR), help="schemas of custom resources")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    args = parser.parse_args(argv)
    start = time.monotonic()
    report = run(args)
    elapsed = time.monotonic() - start
    if report.errors:
        print(f"validate-deploy: {len(report.errors)} problem(s):", file=sys.stderr)
        for err in report.errors:
            print(f"  - {err}", file=sys.stderr)
        print(
            f"validate-deploy: FAILED ({report.checked} documents, {elapsed:.1f}s)", file=sys.stderr
        )
        return 1
    if not args.quiet:
        print(f"validate-deploy: OK ({report.checked} documents, {elapsed:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
