"""Ed25519 message authentication: signatures, trust scopes, staleness, replay, permissions, keys."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry_common.bus.interfaces import Message
from ferry_common.clock import FakeClock
from ferry_common.errors import Unauthenticated
from ferry_common.security import NoAuth
from ferry_common.signing import (
    KEY_ID_HEADER,
    SENDER_HEADER,
    SIGNATURE_HEADER,
    Ed25519Authenticator,
    Permissions,
    Replayed,
    auth_factory_from_env,
    authenticator_from_env,
    generate_keypair,
    key_id,
    load_keyring,
    main,
)

COORD = Ed25519PrivateKey.generate()
HOST_A = Ed25519PrivateKey.generate()
HOST_B = Ed25519PrivateKey.generate()
ALICE = Ed25519PrivateKey.generate()
BOB = Ed25519PrivateKey.generate()

TRUST = {
    "coordinator": COORD.public_key(),
    "host/host-a/*": HOST_A.public_key(),
    "host/host-b/*": HOST_B.public_key(),
    "client/ops-alice": ALICE.public_key(),
    "client/bob": BOB.public_key(),
}
POLICY = {
    "MigrateRequest": ["client/ops-*", "coordinator"],
    "MigrationCancel": ["client/*"],
    "*": ["host/*", "coordinator"],
}


def auth(
    identity: str,
    key: Ed25519PrivateKey,
    clock: FakeClock,
    *,
    permissions: Permissions | None = None,
    **kw: float,
) -> Ed25519Authenticator:
    return Ed25519Authenticator(identity, key, TRUST, clock=clock, permissions=permissions, **kw)  # type: ignore[arg-type]


def msg(clock: FakeClock, **kw: object) -> Message:
    fields: dict[str, object] = {
        "routing_key": "host.host-a.sensor",
        "body": b'{"vm_id":"vm-1"}',
        "type": "FreezeEvents",
        "message_id": "m-1",
        "correlation_id": "c-1",
        "reply_to": "reply.coordinator.1234",
        "headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "timestamp": clock.now(),
    }
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def coord(clock: FakeClock) -> Ed25519Authenticator:
    return auth("coordinator", COORD, clock)


@pytest.fixture
def sensor_a(clock: FakeClock) -> Ed25519Authenticator:
    return auth("host/host-a/sensor", HOST_A, clock, permissions=Permissions(POLICY))


def reason(exc: pytest.ExceptionInfo[Unauthenticated]) -> str:
    return exc.value.reason


# ---- round trip and tampering -------------------------------------------------------------


def test_round_trip(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock))
    assert signed.headers[SENDER_HEADER] == "coordinator"
    assert signed.headers[KEY_ID_HEADER] == key_id(COORD.public_key())
    assert len(base64.b64decode(signed.headers[SIGNATURE_HEADER])) == 64
    assert signed.headers["traceparent"].startswith("00-")
    assert sensor_a.verify(signed) == "coordinator"


def test_sign_does_not_mutate_and_fills_timestamp(
    coord: Ed25519Authenticator, clock: FakeClock
) -> None:
    original = msg(clock, timestamp=0.0)
    signed = coord.sign(original)
    assert SIGNATURE_HEADER not in original.headers
    assert signed.timestamp == clock.now()


def test_sign_overrides_a_claimed_sender(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock, headers={SENDER_HEADER: "host/host-b/sensor"}))
    assert sensor_a.verify(signed) == "coordinator"


def test_tracing_headers_are_not_signed(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock))
    rewritten = signed.with_headers(
        traceparent="00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01", tracestate="a=b"
    )
    assert sensor_a.verify(rewritten) == "coordinator"
    # broker and dead-letter bookkeeping headers do not break the signature either
    assert sensor_a.verify(signed.with_headers(**{"x-delivery-count": "2"})) == "coordinator"


@pytest.mark.parametrize(
    "change",
    [
        {"body": b'{"vm_id":"vm-2"}'},
        {"routing_key": "host.host-b.sensor"},
        {"type": "CleanupSource"},
        {"correlation_id": "c-2"},
        {"correlation_id": None},
        {"reply_to": "reply.attacker.1"},
        {"reply_to": None},
        {"message_id": "m-2"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_tampering_is_rejected(
    change: dict[str, object],
    coord: Ed25519Authenticator,
    sensor_a: Ed25519Authenticator,
    clock: FakeClock,
) -> None:
    signed = coord.sign(msg(clock))
    with pytest.raises(Unauthenticated) as exc:
        sensor_a.verify(dataclasses.replace(signed, **change))  # type: ignore[arg-type]
    assert reason(exc) == f"bad signature from coordinator (key {key_id(COORD.public_key())})"


def test_tampered_timestamp_within_window_is_rejected(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock))
    with pytest.raises(Unauthenticated, match="bad signature"):
        sensor_a.verify(dataclasses.replace(signed, timestamp=signed.timestamp + 1.0))


def test_empty_string_and_none_are_distinct(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock, correlation_id=None))
    with pytest.raises(Unauthenticated, match="bad signature"):
        sensor_a.verify(dataclasses.replace(signed, correlation_id=""))


def test_missing_signature(sensor_a: Ed25519Authenticator, clock: FakeClock) -> None:
    with pytest.raises(Unauthenticated) as exc:
        sensor_a.verify(msg(clock, headers={SENDER_HEADER: "coordinator"}))
    assert reason(exc) == "missing signature (x-ferry-signature)"
    assert exc.value.code == "unauthenticated"


def test_malformed_and_non_canonical_signatures(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock))
    sig = signed.headers[SIGNATURE_HEADER]
    for bad in ("not base64!", base64.b64encode(b"short").decode(), sig.rstrip("=")):
        with pytest.raises(Unauthenticated, match="malformed signature from coordinator"):
            sensor_a.verify(signed.with_headers(**{SIGNATURE_HEADER: bad}))
    # 64 bytes leave 4 unused bits before "==": flipping them decodes to the same bytes
    last = sig[-3]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]
    variant = sig[:-3] + twin + "=="
    assert base64.b64decode(variant) == base64.b64decode(sig)
    with pytest.raises(Unauthenticated, match="malformed signature"):
        sensor_a.verify(signed.with_headers(**{SIGNATURE_HEADER: variant}))


# ---- who may sign as whom -----------------------------------------------------------------


def test_unknown_sender(sensor_a: Ed25519Authenticator, clock: FakeClock) -> None:
    mallory = Ed25519Authenticator("client/mallory", Ed25519PrivateKey.generate(), {}, clock=clock)
    with pytest.raises(Unauthenticated) as exc:
        sensor_a.verify(mallory.sign(msg(clock)))
    assert reason(exc) == "unknown sender client/mallory"


def test_unknown_key_for_known_sender(sensor_a: Ed25519Authenticator, clock: FakeClock) -> None:
    impostor = Ed25519Authenticator("coordinator", Ed25519PrivateKey.generate(), {}, clock=clock)
    with pytest.raises(
        Unauthenticated, match=r"^unknown key '[0-9a-f]{16}' for sender coordinator$"
    ):
        sensor_a.verify(impostor.sign(msg(clock)))


def test_host_key_cannot_sign_as_another_host(
    coord: Ed25519Authenticator, clock: FakeClock
) -> None:
    # host-a's key, legitimately trusted for host/host-a/*, claims to be host-b
    rogue = auth("host/host-b/sensor", HOST_A, clock)
    with pytest.raises(Unauthenticated) as exc:
        coord.verify(rogue.sign(msg(clock)))
    assert (
        reason(exc)
        == f"key {key_id(HOST_A.public_key())} may sign only as host/host-a/*, not as host/host-b/sensor"
    )
    # and host-a may sign as any of its own services
    assert (
        coord.verify(auth("host/host-a/managed-object", HOST_A, clock).sign(msg(clock)))
        == "host/host-a/managed-object"
    )


def test_sender_header_swapped_after_signing(coord: Ed25519Authenticator, clock: FakeClock) -> None:
    signed = auth("host/host-a/sensor", HOST_A, clock).sign(msg(clock))
    with pytest.raises(Unauthenticated, match="bad signature from host/host-a/sensor-2"):
        coord.verify(signed.with_headers(**{SENDER_HEADER: "host/host-a/sensor-2"}))
    with pytest.raises(Unauthenticated, match="may sign only as host/host-a/"):
        coord.verify(signed.with_headers(**{SENDER_HEADER: "host/host-b/sensor"}))


def test_malformed_sender(coord: Ed25519Authenticator, clock: FakeClock) -> None:
    signed = auth("host/host-a/sensor", HOST_A, clock).sign(msg(clock))
    with pytest.raises(Unauthenticated, match="malformed sender"):
        coord.verify(signed.with_headers(**{SENDER_HEADER: "host/host-a/*"}))


def test_own_key_is_trusted_for_own_identity(clock: FakeClock) -> None:
    solo = Ed25519Authenticator("coordinator", COORD, {}, clock=clock)
    assert solo.verify(solo.sign(msg(clock))) == "coordinator"


def test_key_rotation_accepts_both_keys(clock: FakeClock) -> None:
    new_a = Ed25519PrivateKey.generate()
    verifier = Ed25519Authenticator(
        "coordinator",
        COORD,
        {"host/host-a/*": [HOST_A.public_key(), new_a.public_key()]},
        clock=clock,
    )
    for key in (HOST_A, new_a):
        assert (
            verifier.verify(auth("host/host-a/sensor", key, clock).sign(msg(clock)))
            == "host/host-a/sensor"
        )


# ---- staleness --------------------------------------------------------------------------


async def test_stale_message(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock))
    await clock.advance(300)
    assert sensor_a.verify(signed) == "coordinator"  # exactly max_age still passes
    await clock.advance(0.5)
    with pytest.raises(Unauthenticated) as exc:
        sensor_a.verify(signed)
    assert reason(exc) == "stale message from coordinator: 300.5s old, limit 300s"


def test_future_message(sensor_a: Ed25519Authenticator, clock: FakeClock) -> None:
    ahead = FakeClock(start=clock.now() + 31)
    with pytest.raises(Unauthenticated) as exc:
        sensor_a.verify(auth("coordinator", COORD, ahead).sign(msg(ahead)))
    assert reason(exc) == "message from coordinator is 31.0s in the future, allowed skew 30s"
    within = FakeClock(start=clock.now() + 29)
    assert sensor_a.verify(auth("coordinator", COORD, within).sign(msg(within))) == "coordinator"


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), 0.0])
def test_invalid_timestamp(
    ts: float, coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = dataclasses.replace(coord.sign(msg(clock)), timestamp=ts)
    with pytest.raises(Unauthenticated, match="timestamp|stale"):
        sensor_a.verify(signed)


# ---- replay -------------------------------------------------------------------------------


def test_redelivery_before_accept_passes_replay_after_accept_fails(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    signed = coord.sign(msg(clock))
    assert sensor_a.verify(signed) == "coordinator"
    assert sensor_a.verify(signed) == "coordinator"  # broker redelivery: the handler never finished
    sensor_a.accepted(signed)
    with pytest.raises(Replayed) as exc:
        sensor_a.verify(signed)
    assert reason(exc) == "replayed message id m-1 from coordinator"
    assert exc.value.code == "unauthenticated"
    # the same id from another sender is a different message
    other = auth("host/host-b/sensor", HOST_B, clock).sign(msg(clock))
    assert sensor_a.verify(other) == "host/host-b/sensor"


def test_replay_window_is_bounded(coord: Ed25519Authenticator, clock: FakeClock) -> None:
    verifier = auth("host/host-a/sensor", HOST_A, clock, replay_window=3)
    messages = [coord.sign(msg(clock, message_id=f"m-{i}")) for i in range(5)]
    for m in messages:
        verifier.verify(m)
        verifier.accepted(m)
    assert verifier.remembered == 3
    assert verifier.verify(messages[0]) == "coordinator"  # evicted, oldest first
    with pytest.raises(Replayed):
        verifier.verify(messages[-1])


async def test_stale_ids_are_forgotten(
    coord: Ed25519Authenticator, sensor_a: Ed25519Authenticator, clock: FakeClock
) -> None:
    old = coord.sign(msg(clock, message_id="old"))
    sensor_a.accepted(old)
    await clock.advance(301)
    fresh = coord.sign(msg(clock, message_id="fresh"))
    sensor_a.accepted(fresh)
    assert sensor_a.remembered == 1
    with pytest.raises(Unauthenticated, match="stale"):  # still refused, by the staleness check
        sensor_a.verify(old)


# ---- permissions ----------------------------------------------------------------------------


def test_only_listed_clients_may_request_migrations(clock: FakeClock) -> None:
    coordinator = auth("coordinator", COORD, clock, permissions=Permissions(POLICY))
    request = msg(clock, routing_key="migration.requested", type="MigrateRequest", reply_to=None)
    assert (
        coordinator.verify(auth("client/ops-alice", ALICE, clock).sign(request))
        == "client/ops-alice"
    )
    with pytest.raises(Unauthenticated) as exc:
        coordinator.verify(auth("client/bob", BOB, clock).sign(request))
    assert reason(exc) == "client/bob is not permitted to send MigrateRequest"
    with pytest.raises(
        Unauthenticated, match="host/host-a/sensor is not permitted to send MigrateRequest"
    ):
        coordinator.verify(auth("host/host-a/sensor", HOST_A, clock).sign(request))


def test_host_cannot_cancel_unless_permitted(clock: FakeClock) -> None:
    cancel = msg(clock, routing_key="migration.cancel", type="MigrationCancel", reply_to=None)
    strict = auth("coordinator", COORD, clock, permissions=Permissions(POLICY))
    with pytest.raises(
        Unauthenticated, match="host/host-a/sensor is not permitted to send MigrationCancel"
    ):
        strict.verify(auth("host/host-a/sensor", HOST_A, clock).sign(cancel))
    assert strict.verify(auth("client/bob", BOB, clock).sign(cancel)) == "client/bob"
    lenient = auth(
        "coordinator",
        COORD,
        clock,
        permissions=Permissions({**POLICY, "MigrationCancel": ["client/*", "host/host-a/*"]}),
    )
    assert (
        lenient.verify(auth("host/host-a/sensor", HOST_A, clock).sign(cancel))
        == "host/host-a/sensor"
    )


def test_uncovered_types_are_denied(clock: FakeClock) -> None:
    verifier = auth(
        "coordinator", COORD, clock, permissions=Permissions({"MigrateRequest": ["client/*"]})
    )
    with pytest.raises(Unauthenticated, match="not permitted to send Done"):
        verifier.verify(auth("host/host-a/sensor", HOST_A, clock).sign(msg(clock, type="Done")))


def test_untyped_messages_are_typed_by_routing_key(clock: FakeClock) -> None:
    verifier = auth("coordinator", COORD, clock, permissions=Permissions(POLICY))
    host = auth("host/host-a/sensor", HOST_A, clock)
    # the router would type this as MigrateRequest: so must the permission check
    with pytest.raises(Unauthenticated, match="not permitted to send MigrateRequest"):
        verifier.verify(host.sign(msg(clock, routing_key="migration.requested", type="")))
    with pytest.raises(
        Unauthenticated, match="not permitted to send untyped message on 'host.x.y'"
    ):
        verifier.verify(host.sign(msg(clock, routing_key="host.x.y", type="")))


def test_permissions_reject_bad_config() -> None:
    with pytest.raises(ValueError):
        Permissions({"MigrateRequest": "client/*"})  # type: ignore[dict-item]


# ---- key files and environment ---------------------------------------------------------------


def _keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    for name in ("coordinator", "host-a", "ops-alice"):
        generate_keypair(d, name)
    (d / "trust.json").write_text(
        json.dumps(
            {
                "coordinator": "coordinator.pub",
                "host/host-a/*": "host-a.pub",
                "client/ops-alice": ["ops-alice.pub"],
            }
        )
    )
    return d


def test_key_files_round_trip(tmp_path: Path, clock: FakeClock) -> None:
    d = _keydir(tmp_path)
    assert stat.S_IMODE(os.stat(d / "host-a.key").st_mode) == 0o600
    with pytest.raises(FileExistsError):
        generate_keypair(d, "host-a")  # never clobber a key
    ring = load_keyring(d)
    assert set(ring.private_keys) == {"coordinator", "host-a", "ops-alice"}
    assert key_id(ring.private_keys["host-a"].public_key()) == key_id(
        ring.trusted["host/host-a/*"][0]
    )
    coord = Ed25519Authenticator(
        "coordinator", ring.private_key("coordinator"), ring.trusted, clock=clock
    )
    host = Ed25519Authenticator(
        "host/host-a/sensor", ring.private_key("host-a"), ring.trusted, clock=clock
    )
    assert coord.verify(host.sign(msg(clock))) == "host/host-a/sensor"
    with pytest.raises(LookupError):
        ring.private_key()  # three keys here: the service must say which


def test_kubernetes_secret_layout(tmp_path: Path, clock: FakeClock) -> None:
    # a Secret mount: files are symlinks into a hidden, timestamped directory
    src = _keydir(tmp_path)
    mount = tmp_path / "mount"
    data = mount / "..2026_01_01_00_00_00.000"
    data.mkdir(parents=True)
    for name in ("host-a.key", "coordinator.pub", "host-a.pub", "ops-alice.pub", "trust.json"):
        (data / name).write_bytes((src / name).read_bytes())
    os.chmod(data / "host-a.key", 0o400)
    (mount / "..data").symlink_to(data.name)
    for name in os.listdir(data):
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "permissions.json").write_text(json.dumps(POLICY))
    env = {
        "FERRY_AUTH": "ed25519",
        "FERRY_KEYS_DIR": str(mount),
        "FERRY_IDENTITY": "host/host-a/sensor",
    }
    host = authenticator_from_env(clock=clock, environ=env)
    assert isinstance(host, Ed25519Authenticator)
    assert host.permissions is not None and not host.permissions.allows(
        "host/host-a/x", "MigrationCancel"
    )
    coord = Ed25519Authenticator(
        "coordinator", load_keyring(src).private_key("coordinator"), {}, clock=clock
    )
    assert host.verify(coord.sign(msg(clock))) == "coordinator"


def test_authenticator_from_env(tmp_path: Path, clock: FakeClock) -> None:
    assert isinstance(authenticator_from_env(environ={}), NoAuth)
    assert isinstance(authenticator_from_env(environ={"FERRY_AUTH": "none"}), NoAuth)
    with pytest.raises(ValueError, match="FERRY_KEYS_DIR"):
        authenticator_from_env(environ={"FERRY_AUTH": "ed25519"})
    with pytest.raises(ValueError, match="expected"):
        authenticator_from_env(environ={"FERRY_AUTH": "hmac"})
    d = _keydir(tmp_path)
    env = {
        "FERRY_AUTH": "ed25519",
        "FERRY_KEYS_DIR": str(d),
        "FERRY_IDENTITY": "client/ops-alice",
        "FERRY_KEY_NAME": "ops-alice",
        "FERRY_AUTH_MAX_AGE_S": "60",
    }
    alice = authenticator_from_env(clock=clock, environ=env)
    assert isinstance(alice, Ed25519Authenticator) and alice.max_age_s == 60
    coord = authenticator_from_env(
        clock=clock,
        environ={**env, "FERRY_IDENTITY": "coordinator", "FERRY_KEY_NAME": "coordinator"},
    )
    request = alice.sign(msg(clock, routing_key="migration.requested", type="MigrateRequest"))
    assert coord.verify(request) == "client/ops-alice"  # default policy lets clients request


def test_init_keydir_and_factory_pick_each_identitys_key(tmp_path: Path, clock: FakeClock) -> None:
    assert (
        main(
            [
                "init",
                str(tmp_path / "k"),
                "--host",
                "host-a",
                "--host",
                "host-b",
                "--client",
                "ops-alice",
            ]
        )
        == 0
    )
    trust = json.loads((tmp_path / "k" / "trust.json").read_text())
    assert trust == {
        "coordinator": "coordinator.pub",
        "host/host-a/*": "host-a.pub",
        "host/host-b/*": "host-b.pub",
        "client/ops-alice": "client-ops-alice.pub",
    }
    env = {"FERRY_AUTH": "ed25519", "FERRY_KEYS_DIR": str(tmp_path / "k")}
    factory = auth_factory_from_env(clock=clock, environ=env)
    coord, sensor_b, alice = (
        factory(i) for i in ("coordinator", "host/host-b/sensor", "client/ops-alice")
    )
    ring = load_keyring(tmp_path / "k")
    assert isinstance(sensor_b, Ed25519Authenticator)
    assert sensor_b.key_id == key_id(ring.public_keys["host-b"])
    assert coord.verify(sensor_b.sign(msg(clock))) == "host/host-b/sensor"
    request = alice.sign(msg(clock, routing_key="migration.requested", type="MigrateRequest"))
    assert coord.verify(request) == "client/ops-alice"
    with pytest.raises(LookupError):
        factory("client/mallory")  # no key is trusted for it and there are several to choose from
    assert isinstance(auth_factory_from_env(environ={"FERRY_AUTH": "none"})("coordinator"), NoAuth)
    assert main(["keygen", str(tmp_path / "k"), "extra"]) == 0
    assert (tmp_path / "k" / "extra.key").exists()


# ---- random mutations never verify -------------------------------------------------------------

_text = st.text(min_size=0, max_size=40)
_MUTATIONS = st.one_of(
    st.tuples(st.just("routing_key"), _text),
    st.tuples(st.just("type"), _text),
    st.tuples(st.just("message_id"), st.text(min_size=1, max_size=40)),
    st.tuples(st.just("correlation_id"), st.none() | _text),
    st.tuples(st.just("reply_to"), st.none() | _text),
    st.tuples(st.just("body"), st.binary(max_size=64)),
    st.tuples(st.just("timestamp"), st.floats(min_value=-30, max_value=30).filter(bool)),
    st.tuples(st.sampled_from([SENDER_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER]), st.none() | _text),
    st.tuples(
        st.just("resign-as"),
        st.sampled_from(["host/host-b/sensor", "coordinator", "client/ops-alice"]),
    ),
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=st.lists(_MUTATIONS, min_size=1, max_size=3))
def test_random_mutations_never_verify(mutations: list[tuple[str, object]]) -> None:
    clock = FakeClock()
    signer = auth("host/host-a/sensor", HOST_A, clock)
    verifier = auth("coordinator", COORD, clock)
    original = signer.sign(msg(clock))
    m = original
    for what, value in mutations:
        if what == "resign-as":
            # a host re-signing someone else's message with its own key under a foreign name
            m = auth(str(value), HOST_A, clock).sign(m)
        elif what == "timestamp":
            m = dataclasses.replace(m, timestamp=m.timestamp + float(value))  # type: ignore[arg-type]
        elif what.startswith("x-ferry-"):
            headers = dict(m.headers)
            if value is None:
                headers.pop(what, None)
            else:
                headers[what] = str(value)
            m = dataclasses.replace(m, headers=headers)
        else:
            m = dataclasses.replace(m, **{what: value})  # type: ignore[arg-type]
    signed_fields = (
        "routing_key",
        "type",
        "message_id",
        "correlation_id",
        "reply_to",
        "body",
        "timestamp",
    )
    unchanged = all(getattr(m, f) == getattr(original, f) for f in signed_fields) and all(
        m.headers.get(h) == original.headers.get(h)
        for h in (SENDER_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER)
    )
    if unchanged:
        assert verifier.verify(m) == "host/host-a/sensor"
    else:
        with pytest.raises(Unauthenticated):
            verifier.verify(m)


# ---- through the endpoint ----------------------------------------------------------------------


async def test_endpoint_signs_verifies_and_dead_letters_forgeries() -> None:
    from ferry_common.bus.interfaces import QueueSpec
    from ferry_common.bus.memory import MemoryBus
    from ferry_common.endpoint import Context, Endpoint, Router
    from ferry_common.messages.commands import HealthCheck as Check

    bus = MemoryBus()
    bus.ensure_dead_letter_queue()
    coord_auth = Ed25519Authenticator("coordinator", COORD, TRUST, permissions=Permissions(POLICY))
    host_auth = Ed25519Authenticator(
        "host/host-a/sensor", HOST_A, TRUST, permissions=Permissions(POLICY)
    )
    coordinator = Endpoint(bus, "coordinator", auth=coord_auth)
    host = Endpoint(bus, "host/host-a/sensor", auth=host_auth)
    seen: list[str | None] = []

    async def on_check(_: Check, ctx: Context) -> None:
        seen.append(ctx.sender)

    router = Router()
    router.add(Check, on_check)
    await host.serve(QueueSpec("ferry.host-a.sensor", ("host.host-a.sensor",)), router)
    sent = await coordinator.send("host.host-a.sensor", Check())
    forged = dataclasses.replace(sent, message_id="forged-id")
    await bus.publish(forged)
    await bus.publish(sent)  # a replay of the handled message
    for _ in range(50):
        await asyncio.sleep(0)
        if len(bus.dead_letters) >= 2:
            break
    assert seen == ["coordinator"]
    reasons = bus.dead_letter_reasons()
    assert any(r.startswith("bad signature from coordinator") for r in reasons), reasons
    assert any(r.startswith("replayed message id") for r in reasons), reasons
    await host.close()
