"""Disks of adopted libvirt domains across a migration, by the VM's storage mode.

``shared``: both hosts see the disk at the same path (NFS, a cluster file system); nothing is
copied. Admission proves the directory is the same one, as Nova does with a test file: the
target's daemon creates a probe volume there and the source's daemon must see it. libvirt
itself knows only some shared file systems by type and calls a migration of any other disk
"unsafe"; once the probe proved the sharing (and the cache mode is ``none`` or ``directsync``,
so the target reads no stale pages) the migration is made with ``VIR_MIGRATE_UNSAFE``. ``copy``: the disk is local
to each host and libvirt copies it live with the memory (``VIR_MIGRATE_NON_SHARED_DISK``: the
target's QEMU serves NBD, the source mirrors every writable disk into it); the target's file is
created first, at the same path and size, and a path that already exists there is refused at
admission (it would be overwritten, and may be the source's own file on a share).

Files are looked at and created through the target daemon's storage API (a directory pool over
the disk's directory), so what counts is what that daemon sees: on one machine the test daemons
see different files at the same path under their private ``/var/lib/libvirt``.

Functions here block (libvirt calls): the driver runs them on its threads.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ferry_common.messages.commands import Refusal

_POOLS = threading.RLock()  # a transient pool per directory: two checks must not create it twice


def _lv() -> Any:
    import libvirt

    return libvirt


def migration_options(params: dict[str, Any], persistent: bool) -> tuple[int, dict[str, Any]]:
    """Flags and migration parameters for an adopted domain: defined on the target if it is
    persistent (undefined on the source only at the saga's teardown), disks copied in ``copy``
    mode; in ``shared`` mode admission proved the sharing libvirt may not recognise."""
    lv = _lv()
    flags = lv.VIR_MIGRATE_PERSIST_DEST if persistent else 0
    extra: dict[str, Any] = {}
    if params.get("storage", "shared") == "shared" and params.get("disks"):
        flags |= lv.VIR_MIGRATE_UNSAFE
    if params.get("storage") == "copy":
        targets = [d["target"] for d in params.get("disks") or [] if d.get("target")]
        if targets:
            flags |= lv.VIR_MIGRATE_NON_SHARED_DISK
            extra[lv.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = targets
    return flags, extra


@contextmanager
def _pool(conn: Any, directory: str, *, build: bool) -> Iterator[Any | None]:
    """The daemon's pool over ``directory``: an existing one, or a transient one made for the
    call and stopped after it (files stay). None if the directory does not exist and not ``build``."""
    lv = _lv()
    with _POOLS:
        try:
            pool = conn.storagePoolLookupByTargetPath(directory)
        except lv.libvirtError:
            pool = None
        if pool is not None:
            if not pool.isActive():
                pool.create(0)
            pool.refresh(0)
            yield pool
            return
        name = "ferry-" + hashlib.sha256(directory.encode()).hexdigest()[:12]
        xml = f"<pool type='dir'><name>{name}</name><target><path>{_xml(directory)}</path></target></pool>"
        try:
            pool = conn.storagePoolCreateXML(xml, lv.VIR_STORAGE_POOL_CREATE_WITH_BUILD if build else 0)
        except lv.libvirtError:
            if build:
                raise
            yield None  # no such directory in the daemon's view
            return
        try:
            yield pool
        finally:
            pool.destroy()


def _xml(text: str) -> str:
    from xml.sax.saxutils import quoteattr

    return quoteattr(text)[1:-1]


def _volume(pool: Any, path: str) -> Any | None:
    try:
        return pool.storageVolLookupByName(os.path.basename(path))
    except _lv().libvirtError:
        return None


def exists(conn: Any, path: str) -> bool:
    """Whether the daemon of ``conn`` sees a file at ``path``."""
    with _pool(conn, os.path.dirname(path), build=False) as pool:
        return pool is not None and _volume(pool, path) is not None


def shared_with(conn: Any, source_uri: str, directory: str) -> bool:
    """Whether the daemon at ``source_uri`` sees a probe file made in ``directory`` by the
    daemon of ``conn``: the directory is one, shared, not two that look alike."""
    lv = _lv()
    name = f"ferry-probe-{uuid.uuid4().hex}.raw"
    with _pool(conn, directory, build=False) as pool:
        if pool is None:
            return False
        probe = pool.createXML(f"<volume><name>{name}</name><capacity unit='bytes'>0</capacity>"
                               "<target><format type='raw'/></target></volume>", 0)
        try:
            source = lv.open(source_uri)
            try:
                with _pool(source, directory, build=False) as theirs:
                    return theirs is not None and _volume(theirs, f"{directory}/{name}") is not None
            finally:
                source.close()
        finally:
            probe.delete(0)


def refusals(conn: Any, vm_id: str, mode: str, disks: list[dict[str, Any]],
             source_uri: str | None = None) -> list[Refusal]:
    out = []
    for d in disks:
        path = d.get("path") or ""
        if d.get("type", "file") != "file" or not path:
            if mode == "copy":
                out.append(Refusal(code="disk_unsupported", reason=f"vm {vm_id}: disk {d.get('target')} is not "
                                   "a file; only file disks are copied"))
            continue
        there = exists(conn, path)
        if mode == "shared" and not there:
            out.append(Refusal(code="disk_missing", reason=f"vm {vm_id}: disk {path} (shared storage) "
                               "does not exist on the target"))
        elif mode == "shared" and source_uri and not shared_with(conn, source_uri, os.path.dirname(path)):
            out.append(Refusal(code="disk_not_shared", reason=f"vm {vm_id}: disk {path} exists on the target, "
                               "but its directory is not the source's (a file made there is not seen there)"))
        elif mode == "shared" and d.get("cache", "default") not in ("none", "directsync"):
            out.append(Refusal(code="disk_cache_unsafe", reason=f"vm {vm_id}: disk {path} on shared storage has "
                               f"cache mode {d.get('cache')!r}; only none or directsync are safe to migrate"))
        elif mode == "copy" and there:
            out.append(Refusal(code="disk_exists", reason=f"vm {vm_id}: disk {path} already exists on the "
                               "target; copying would overwrite it"))
    return out


def precreate(conn: Any, disks: list[dict[str, Any]]) -> list[str]:
    """Create each disk's file on the target, empty, at its path, size and format; the paths
    created (a disk already there was created by an earlier call for this migration)."""
    lv = _lv()
    created = []
    for d in disks:
        path = d.get("path") or ""
        if not path:
            continue
        with _pool(conn, os.path.dirname(path), build=True) as pool:
            assert pool is not None  # built if missing
            if _volume(pool, path) is not None:
                continue
            xml = (f"<volume><name>{_xml(os.path.basename(path))}</name>"
                   f"<capacity unit='bytes'>{int(d.get('capacity') or 0)}</capacity>"
                   f"<target><format type='{_xml(d.get('format') or 'raw')}'/></target></volume>")
            try:
                pool.createXML(xml, 0)
            except lv.libvirtError as exc:
                raise RuntimeError(f"cannot create disk {path} on the target: {exc}") from exc
            created.append(path)
    return created


def remove(conn: Any, paths: list[str]) -> None:
    """Delete disks :func:`precreate` made (a migration that did not complete)."""
    lv = _lv()
    for path in paths:
        with _pool(conn, os.path.dirname(path), build=False) as pool:
            vol = None if pool is None else _volume(pool, path)
            if vol is not None:
                try:
                    vol.delete(0)
                except lv.libvirtError:
                    pass  # gone meanwhile
