"""Every setting Ferry reads from the environment, typed, in one object.

An entry point (``ferry ...``, ``ferry service NAME``) builds :class:`Settings` once with
:func:`load_settings` and passes it down to what it builds; ``ferry config`` prints it. A
variable is ``FERRY_<FIELD>`` unless its field names another (``AMQP_URL``, ``OTEL_*``).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .runtime import gc_threshold

__all__ = ["Settings", "SettingsError", "env_name", "load_settings"]

MASK = "**********"


def _standard(variable: str, description: str, default: Any = None) -> Any:
    """A field read from a standard variable of its own name (``OTEL_*``), not ``FERRY_*``."""
    return Field(default=default, validation_alias=AliasChoices(variable, variable.lower()), description=description)


class Settings(BaseSettings):
    """Ferry's settings, from ``FERRY_*``, ``AMQP_URL`` and the standard ``OTEL_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", populate_by_name=True, extra="ignore", frozen=True)

    # ---- broker ------------------------------------------------------------------------
    amqp_url: SecretStr = Field(default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"), validation_alias=AliasChoices("AMQP_URL", "amqp_url"),
                                description="RabbitMQ URL (amqps:// for TLS); holds the password")
    amqp_ca_file: str | None = Field(default=None, description="PEM bundle the broker's certificate must chain to")
    amqp_cert_file: str | None = Field(default=None, description="this service's client certificate (mutual TLS)")
    amqp_key_file: str | None = Field(default=None, description="the key of FERRY_AMQP_CERT_FILE")
    amqp_coalesce: bool = Field(default=True, description="several small messages of one lane share an AMQP publish")
    # ---- this process ------------------------------------------------------------------
    host: str = Field(default_factory=lambda: os.uname().nodename, description="this host's name (ferry service)")
    identity: str | None = Field(default=None, description="this process's signing identity, e.g. host/host-a/sensor")
    health_port: int = Field(default=8080, ge=0, le=65535, description="port of /healthz, /readyz and /metrics")
    gc_threshold: str | None = Field(default=None, description="the collector's thresholds, e.g. 20000,20,50 (or 'default')")
    # ---- coordinator -------------------------------------------------------------------
    store_url: SecretStr = Field(default=SecretStr("sqlite:///ferry-coordinator.db"),
                                 description="saga store: sqlite:///PATH or postgresql://... (may hold a password)")
    saga_lease_s: float | None = Field(default=None, gt=0, description="a replica's hold on a saga (how soon a crashed one's are resumed)")
    saga_reply_s: float | None = Field(default=None, gt=0, description="the saga's wait for each answer")
    saga_status_poll_s: float | None = Field(default=None, gt=0, description="how often the saga polls a migration's status")
    progress_interval_s: float | None = Field(default=None, ge=0, description="a migration's progress statuses at most once per this")
    automation_level: Literal["manual", "partial", "full"] = Field(
        default="manual", description="what the balancer does by itself: manual recommends, partial acts on faults and maintenance, full on all")
    balance_interval_s: float | None = Field(default=None, gt=0, description="seconds between the balancer's evaluations (60)")
    # ---- host services -----------------------------------------------------------------
    driver: Literal["sim", "qemu", "libvirt"] = Field(default="sim", description="hypervisor driver of the adapter")
    state_dir: str = Field(default=".ferry/state", description="where host services keep their SQLite state ('' keeps it in memory)")
    allowed_sources: Annotated[tuple[str, ...], NoDecode] = Field(default=("*",), description="hosts this one accepts VMs from (comma-separated)")
    capacity_mib: int | None = Field(default=None, ge=0, description="memory this host offers to incoming VMs")
    inventory_interval_s: float = Field(default=1.0, gt=0, description="how often the adapter announces its VMs; also its heartbeat (not ready after 3 missed)")
    host_labels: str = Field(default="", description="labels placement's host selectors match, e.g. zone=a,disk=ssd")
    ledger_max: int | None = Field(default=None, ge=1, description="dispatched event ids each VM's audit trail keeps (service default 10000)")
    qemu_standby: str | None = Field(default=None, description="receiving QEMU processes kept ready per VM shape, e.g. 512:2=2,2048:4")
    qemu_tls_dir: str | None = Field(default=None, description="CA and host certificate for QEMU's migration stream over TLS")
    libvirt_migrate_tls: bool = Field(default=False, description="libvirt migrates with VIR_MIGRATE_TLS")
    guest_dir: str | None = Field(default=None, description="sources of the test guest (default: the repo's guest/)")
    guest_image: str | None = Field(default=None, description="the guest kernel image (default: built from FERRY_GUEST_DIR)")
    # ---- message signing ---------------------------------------------------------------
    auth: Literal["", "none", "ed25519"] = Field(default="", description="ed25519 to sign and verify; none or unset for neither")
    keys_dir: str | None = Field(default=None, description="key directory (keys, trust.json, permissions.json)")
    key_name: str | None = Field(default=None, description="which NAME.key to sign with (default: trust.json's choice)")
    permissions_file: str | None = Field(default=None, description="permissions JSON (default: FERRY_KEYS_DIR/permissions.json)")
    auth_max_age_s: float = Field(default=300.0, gt=0, description="oldest signed message accepted")
    auth_max_skew_s: float = Field(default=30.0, ge=0, description="how far ahead a sender's clock may be")
    auth_replay_window: int = Field(default=100_000, ge=1, description="message ids remembered against replays")
    # ---- tracing (the standard OpenTelemetry variables, read by the SDK too) -----------
    trace_collect: bool = Field(default=True, description="ship migration spans to the coordinator (ferry trace)")
    otel_sdk_disabled: bool = _standard("OTEL_SDK_DISABLED", "turn tracing off altogether", False)
    otel_service_name: str | None = _standard("OTEL_SERVICE_NAME", "service.name of this process's spans")
    otel_traces_exporter: str | None = _standard("OTEL_TRACES_EXPORTER", "otlp to export spans (or none)")
    otel_traces_sampler: str | None = _standard("OTEL_TRACES_SAMPLER", "the SDK's sampler (default parent-based always-on)")
    otel_resource_attributes: str | None = _standard(
        "OTEL_RESOURCE_ATTRIBUTES", "extra resource attributes of spans, e.g. k8s.node.name=...")
    otel_exporter_otlp_endpoint: str | None = _standard("OTEL_EXPORTER_OTLP_ENDPOINT", "OTLP collector (all signals)")
    otel_exporter_otlp_traces_endpoint: str | None = _standard(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTLP collector for traces")
    otel_exporter_otlp_headers: SecretStr | None = _standard(
        "OTEL_EXPORTER_OTLP_HEADERS", "headers for the OTLP collector (often a token)")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: Any) -> Any:
        # FERRY_X= (set but empty) means "not set" except where '' is a value (FERRY_STATE_DIR)
        field = cls.model_fields[info.field_name]
        if value == "" and field.annotation is not str and info.field_name != "auth":
            return field.get_default(call_default_factory=True)
        return value

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_mode(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("gc_threshold")
    @classmethod
    def _gc(cls, value: str | None) -> str | None:
        if value is not None:
            gc_threshold(value)  # raises ValueError with the expected form
        return value

    # ---- what modules that take a mapping of variables are handed ---------------------
    def signing_env(self) -> dict[str, str]:
        """The ``FERRY_AUTH*``/key variables, for :mod:`ferry_common.signing`'s ``environ=``."""
        return _present({
            "FERRY_AUTH": self.auth, "FERRY_IDENTITY": self.identity, "FERRY_KEYS_DIR": self.keys_dir,
            "FERRY_KEY_NAME": self.key_name, "FERRY_PERMISSIONS_FILE": self.permissions_file,
            "FERRY_AUTH_MAX_AGE_S": str(self.auth_max_age_s), "FERRY_AUTH_MAX_SKEW_S": str(self.auth_max_skew_s),
            "FERRY_AUTH_REPLAY_WINDOW": str(self.auth_replay_window),
        })

    def tracing_env(self) -> dict[str, str]:
        """The variables :func:`ferry_common.tracing.setup_tracing` reads, for its ``env=``."""
        return _present({
            "OTEL_SDK_DISABLED": "true" if self.otel_sdk_disabled else None,
            "FERRY_TRACE_COLLECT": "1" if self.trace_collect else "0",
            "OTEL_SERVICE_NAME": self.otel_service_name, "OTEL_TRACES_EXPORTER": self.otel_traces_exporter,
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otel_exporter_otlp_endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.otel_exporter_otlp_traces_endpoint,
        })

    def rows(self) -> list[dict[str, Any]]:
        """Each setting as ``variable``, ``value`` (secrets masked), ``source``, ``description``."""
        return [
            {"variable": env_name(name), "value": masked(getattr(self, name)),
             "source": "env" if name in self.model_fields_set else "default", "description": f.description or ""}
            for name, f in type(self).model_fields.items()
        ]


class SettingsError(ValueError):
    """A variable that does not parse; the message names each bad variable and why."""


def load_settings(**overrides: Any) -> Settings:
    """:class:`Settings` from the environment, or :class:`SettingsError` naming the variables."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"{_env_of(key)}={err.get('input')!r}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(lines)) from None


def env_name(field: str) -> str:
    """The environment variable of a field: its alias, else ``FERRY_<FIELD>``."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return "FERRY_" + field.upper()


def masked(value: Any) -> Any:
    """A secret as ``**********``; a secret URL keeps all but its password."""
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        parts = urlsplit(raw)
        if parts.scheme and "://" in raw:
            if parts.password is None:
                return raw
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{MASK}@{host}"))
        return MASK if raw else ""
    if isinstance(value, tuple):
        return ",".join(value)
    return value


def _env_of(key: str) -> str:
    for name, f in Settings.model_fields.items():
        alias = f.validation_alias
        if key == name or (isinstance(alias, AliasChoices) and key in alias.choices):
            return env_name(name)
    return key


def _present(values: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v not in (None, "")}
