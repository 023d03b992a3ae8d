"""Ferry's own rules over rendered Kubernetes objects (step 4 of ``validate_deploy.py``):
resources and probes on long-running containers, every referenced ConfigMap/Secret/
ServiceAccount/PVC present in the same render, selectors that match a pod template, no
namespace hard-coded in the base, each host service in a workload of its own."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import host_services  # deploy/tools: each host service its own workload, user and key

WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "CronJob"}
LONG_RUNNING_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet"}


@dataclass
class Report:
    """Problems found, by source."""

    errors: list[str] = field(default_factory=list)
    checked: int = 0

    def error(self, where: str, message: str) -> None:
        """Record one problem."""
        self.errors.append(f"{where}: {message}")


def describe(obj: dict[str, Any]) -> str:
    """``Kind/name`` of a manifest for messages."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or (meta.get("generateName", "") + "*") or "?"
    return f"{obj.get('kind', '?')}/{name}"


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload, if it is one."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    if kind in WORKLOAD_KINDS:
        return ((spec.get("template") or {}).get("spec")) or {}
    if kind == "Pod":
        return spec
    return None


def _walk_env_refs(container: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for src in container.get("envFrom") or []:
        if "configMapRef" in src and not src["configMapRef"].get("optional"):
            yield "ConfigMap", src["configMapRef"]["name"]
        if "secretRef" in src and not src["secretRef"].get("optional"):
            yield "Secret", src["secretRef"]["name"]
    for var in container.get("env") or []:
        ref = var.get("valueFrom") or {}
        if "configMapKeyRef" in ref and not ref["configMapKeyRef"].get("optional"):
            yield "ConfigMap", ref["configMapKeyRef"]["name"]
        if "secretKeyRef" in ref and not ref["secretKeyRef"].get("optional"):
            yield "Secret", ref["secretKeyRef"]["name"]


def references(pod: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, name) of every object a pod spec needs to exist in its namespace."""
    if pod.get("serviceAccountName"):
        yield "ServiceAccount", pod["serviceAccountName"]
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        yield from _walk_env_refs(c)
    for vol in pod.get("volumes") or []:
        if "configMap" in vol and not vol["configMap"].get("optional"):
            yield "ConfigMap", vol["configMap"]["name"]
        if "secret" in vol and not vol["secret"].get("optional"):
            yield "Secret", vol["secret"]["secretName"]
        if "persistentVolumeClaim" in vol:
            yield "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]
        for src in (vol.get("projected") or {}).get("sources") or []:
            if "configMap" in src and not src["configMap"].get("optional"):
                yield "ConfigMap", src["configMap"]["name"]
            if "secret" in src and not src["secret"].get("optional"):
                yield "Secret", src["secret"]["name"]


def check_rules(
    objs: list[dict[str, Any]],
    where: str,
    report: Report,
    *,
    is_base: bool = False,
    known: Iterable[dict[str, Any]] = (),
) -> None:
    """Ferry's deployment rules over one rendered set of objects (``known``: also present)."""
    present = {(o.get("kind"), (o.get("metadata") or {}).get("name")) for o in [*objs, *known]}
    for obj in objs:
        label = f"{where}: {describe(obj)}"
        meta = obj.get("metadata") or {}
        if is_base and meta.get("namespace"):
            report.error(label, "the base must be namespace-agnostic (metadata.namespace set)")
        pod = pod_spec(obj)
        if pod is None:
            continue
        for kind, name in references(pod):
            if (kind, name) not in present:
                report.error(label, f"references {kind}/{name}, which is not in the same render")
        for c in pod.get("containers") or []:
            cl = f"{label} container {c.get('name')}"
            res = c.get("resources") or {}
            if not res.get("requests") or not res.get("limits"):
                report.error(cl, "needs resources.requests and resources.limits")
            if obj.get("kind") in LONG_RUNNING_KINDS:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        report.error(cl, f"needs a {probe}")
        selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if obj.get("kind") in LONG_RUNNING_KINDS:
            labels = ((obj["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                report.error(label, "spec.selector.matchLabels does not match the pod template")
    templates = [
        ((o["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        for o in objs
        if o.get("kind") in LONG_RUNNING_KINDS and isinstance(o.get("spec"), dict)
    ]
    for obj in objs:
        if obj.get("kind") not in ("Service", "PodDisruptionBudget"):
            continue
        spec = obj.get("spec") or {}
        selector = spec.get("selector") or {}
        if obj["kind"] == "PodDisruptionBudget":
            selector = selector.get("matchLabels") or {}
        if selector and not any(all(t.get(k) == v for k, v in selector.items()) for t in templates):
            report.error(
                f"{where}: {describe(obj)}", f"selector {selector} matches no pod template"
            )
    host_services.check_k8s(objs, where, report.error, pod_spec)
