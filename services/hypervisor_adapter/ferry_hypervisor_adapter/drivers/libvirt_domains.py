"""Domains a libvirt host already runs, taken under Ferry's management: adoption, release, and
what admission must know of them.

An adopted domain carries Ferry's metadata (the VM's spec with ``params.adopted`` and
``params.storage``) in its live and persistent definitions, so the adapter's inventory lists it
and the metadata moves with it. What admission checks (disks, host devices, CPU) is read afresh
from the live definition whenever the spec is built: it is the hypervisor's word, not a copy.

Functions here block (libvirt calls): the driver runs them on its threads.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from ferry_common.messages.commands import Refusal
from ferry_common.messages.domain import VmSpec
from ferry_common.messages.public import AdoptableVm

from . import libvirt_storage as storage

METADATA_NS = "https://ferry.invalid/xmlns/vm/1"
METADATA_KEY = "ferry"
STORAGE_MODES = ("shared", "copy")
DEFAULT_STORAGE = "shared"  # never overwrites a disk: a path missing on the target is refused
_STATES = {1: "running", 2: "running", 3: "paused", 4: "running", 5: "shutoff", 6: "shutoff", 7: "paused"}


class AdoptionError(Exception):
    """The domain cannot be adopted (or released); the message says why."""


def _lv() -> Any:
    import libvirt

    return libvirt


def lookup(conn: Any, ref: str) -> Any:
    """The domain named ``ref``, or whose UUID it is; :class:`AdoptionError` if none."""
    lv = _lv()
    try:
        uuid.UUID(ref)
    except ValueError:
        by_uuid = False
    else:
        by_uuid = True
    try:
        return conn.lookupByUUIDString(ref) if by_uuid else conn.lookupByName(ref)
    except lv.libvirtError:
        raise AdoptionError(f"no domain {ref!r} on this host") from None


def ferry_spec(dom: Any, daemon_uri: str | None = None) -> VmSpec | None:
    """The spec in the domain's Ferry metadata, None for a domain Ferry does not manage; an
    adopted one is completed with its hardware as the live definition has it, and with
    ``daemon_uri`` (how other hosts' daemons reach this one: a target checks through it that
    a shared disk's directory is the same one)."""
    lv = _lv()
    try:
        raw = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
    except lv.libvirtError:
        return None
    text = ElementTree.fromstring(raw).text
    if not text:
        return None
    spec = VmSpec.model_validate(json.loads(text))
    if not spec.params.get("adopted"):
        return spec
    return _with_hardware(dom, spec, daemon_uri)


def _with_hardware(dom: Any, spec: VmSpec, daemon_uri: str | None) -> VmSpec:
    facts = describe(dom.XMLDesc(0))
    if daemon_uri:
        facts["source_daemon"] = daemon_uri
    for disk in facts["disks"]:
        try:
            disk["capacity"] = int(dom.blockInfo(disk["target"])[0])
        except _lv().libvirtError:
            disk["capacity"] = 0
    facts["persistent"] = bool(dom.isPersistent())
    if facts["persistent"]:
        # a device in the persistent definition is passed through at the next start: that
        # definition goes to the target too, where the device is not
        stored = describe(dom.XMLDesc(_lv().VIR_DOMAIN_XML_INACTIVE))["hostdevs"]
        facts["hostdevs"] = sorted({*facts["hostdevs"], *stored})
    memory_mib = max(1, int(dom.maxMemory()) // 1024)
    return spec.model_copy(update={"memory_mib": memory_mib, "vcpus": facts.pop("vcpus"),
                                   "params": {**spec.params, **facts}})


def describe(xml: str) -> dict[str, Any]:
    """What admission and the migration need of a domain definition: its disks (those a
    migration must carry: writable, not shareable), host devices, CPU, type and machine."""
    root = ElementTree.fromstring(xml)
    os_type = root.find("os/type")
    cpu = root.find("cpu")
    disks = []
    for d in root.findall("devices/disk"):
        if d.get("device", "disk") != "disk" or d.find("readonly") is not None or d.find("shareable") is not None:
            continue
        src, target, driver = d.find("source"), d.find("target"), d.find("driver")
        path = None if src is None else (src.get("file") or src.get("dev"))
        disks.append({"target": target.get("dev") if target is not None else "", "path": path or "",
                      "type": d.get("type", "file"),
                      "format": driver.get("type", "raw") if driver is not None else "raw",
                      "cache": driver.get("cache", "default") if driver is not None else "default"})
    hostdevs = [
        " ".join(filter(None, (h.get("type"), _address(h)))) for h in root.findall("devices/hostdev")
    ]
    vcpu = root.findtext("vcpu") or "1"
    return {
        "domain_type": root.get("type", "qemu"),
        "arch": os_type.get("arch", "x86_64") if os_type is not None else "x86_64",
        "machine": os_type.get("machine", "") if os_type is not None else "",
        "cpu": {"mode": cpu.get("mode", "custom"), "model": cpu.findtext("model") or ""} if cpu is not None else {},
        "disks": disks,
        "hostdevs": hostdevs,
        "vcpus": max(1, int(vcpu.strip())),
    }


def _address(hostdev: ElementTree.Element) -> str:
    addr = hostdev.find("source/address")
    if addr is not None:
        return ":".join(v for k, v in sorted(addr.attrib.items()) if k != "type")
    vendor, product = hostdev.find("source/vendor"), hostdev.find("source/product")
    if vendor is not None and product is not None:
        return f"{vendor.get('id')}:{product.get('id')}"
    return ""


def adopt(conn: Any, ref: str, storage_mode: str) -> tuple[VmSpec, bool]:
    """Take the defined domain ``ref`` under management; ``(spec, already)``. Adopting one that
    is adopted already answers its spec (``already``): a replayed command changes nothing."""
    if storage_mode not in STORAGE_MODES:
        raise AdoptionError(f"storage mode {storage_mode!r}: expected one of {', '.join(STORAGE_MODES)}")
    dom = lookup(conn, ref)
    existing = ferry_spec(dom)
    if existing is not None:
        if not existing.params.get("adopted"):
            raise AdoptionError(f"domain {dom.name()!r} was created by Ferry; it is managed already")
        return existing, True
    if not dom.isPersistent():
        raise AdoptionError(f"domain {dom.name()!r} is transient: only defined domains can be adopted")
    spec = VmSpec(vm_id=dom.name(), memory_mib=max(1, int(dom.maxMemory()) // 1024), driver="libvirt",
                  params={"adopted": True, "storage": storage_mode})
    _set_metadata(dom, json.dumps(spec.model_dump(mode="json")))
    return ferry_spec(dom) or spec, False


def release(conn: Any, name: str) -> bool:
    """Remove Ferry's metadata from an adopted domain, which runs on and stays defined; False
    if it was not adopted (already released: a replay)."""
    lv = _lv()
    try:
        dom = conn.lookupByName(name)
    except lv.libvirtError:
        return False
    spec = ferry_spec(dom)
    if spec is None:
        return False
    if not spec.params.get("adopted"):
        raise AdoptionError(f"vm {name!r} was created by Ferry, not adopted: destroy it instead")
    _set_metadata(dom, None)
    return True


def _set_metadata(dom: Any, text: str | None) -> None:
    lv = _lv()
    flags = lv.VIR_DOMAIN_AFFECT_CONFIG | (lv.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    body = None if text is None else f"<vm>{escape(text)}</vm>"
    dom.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, body, METADATA_KEY if body else None, METADATA_NS, flags)


def adoptable(conn: Any) -> list[AdoptableVm]:
    """Defined domains without Ferry's metadata, running or not."""
    lv = _lv()
    out = []
    for dom in conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_PERSISTENT):
        try:
            if ferry_spec(dom) is not None:
                continue
            state, max_kib, _mem, vcpus, _cpu = dom.info()
            out.append(AdoptableVm(name=dom.name(), uuid=dom.UUIDString(), state=_STATES.get(state, "shutoff"),
                                   memory_mib=int(max_kib) // 1024, vcpus=int(vcpus)))
        except lv.libvirtError:
            continue  # it went away meanwhile
    return out


def refusals(conn: Any, spec: VmSpec) -> list[Refusal]:
    """Why ``spec`` (an adopted domain as its source described it) cannot run on the host of
    ``conn``: host devices, a CPU model this hypervisor cannot provide, disks (by storage mode)."""
    params = spec.params
    out = []
    if params.get("hostdevs"):
        out.append(Refusal(code="host_device", reason=f"vm {spec.vm_id} passes through host devices "
                           f"({', '.join(params['hostdevs'])}): they cannot be migrated"))
    cpu = params.get("cpu") or {}
    if cpu.get("mode", "custom") in ("custom", "host-passthrough") and (cpu.get("model") or cpu.get("mode") != "custom"):
        why = _cpu_missing(conn, params, cpu)
        if why:
            out.append(Refusal(code="cpu_unsupported", reason=f"vm {spec.vm_id}: {why}"))
    out.extend(storage.refusals(conn, spec.vm_id, params.get("storage", DEFAULT_STORAGE), params.get("disks") or [],
                                params.get("source_daemon")))
    return out


def _cpu_missing(conn: Any, params: dict[str, Any], cpu: dict[str, Any]) -> str | None:
    """Why this host's hypervisor cannot give the guest its CPU, from its domain capabilities."""
    caps = ElementTree.fromstring(conn.getDomainCapabilities(None, params.get("arch", "x86_64"), None,
                                                             params.get("domain_type", "qemu"), 0))
    if cpu.get("mode") == "host-passthrough":
        mode = caps.find("cpu/mode[@name='host-passthrough']")
        ok = mode is not None and mode.get("supported") == "yes"
        return None if ok else "host-passthrough CPU is not supported by the target's hypervisor"
    model = cpu["model"]
    for m in caps.findall("cpu/mode[@name='custom']/model"):
        if m.text == model:
            return None if m.get("usable", "yes") != "no" else f"CPU model {model} is not usable on the target"
    return f"the target's hypervisor has no CPU model {model}"
