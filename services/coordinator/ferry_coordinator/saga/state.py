"""What a saga knows, typed: read from and written to the record's ``data`` in one place.

The stored JSON keeps the keys it always had (readers such as ``ferry migrations``, the
bench and the metrics read them); a key nobody set yet is left out, and keys this model
does not know are kept as they were.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ferry_common.messages.domain import VmSpec


class SagaState(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=False)

    # what the request brought (set by the coordinator when it stores the saga)
    vm: VmSpec | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    requested_by: str | None = None
    reason_requested: str | None = None
    why: dict[str, Any] | None = None  # an automatic migration's MoveReason (policy, figures, level)
    target_ready: bool | None = None  # the target said it keeps a receiving process of this shape
    epoch: int | None = None  # the plane's ownership epoch: the current one, the new one once complete
    # the trace a resumed saga continues
    trace_id: str | None = None
    trace_span_id: str | None = None
    request_span: list[str] | None = None  # the request's span (trace id, span id), which the root links to
    # what the steps learnt
    reservation_id: str | None = None
    elements: int | None = None
    element_ids: list[str] | None = None  # the staged graph's ids, which the event transfer names
    module_rounds: int | None = None
    modules_fetched: list[str] | None = None
    vm_stats: dict[str, Any] | None = None
    dirty_rounds: int | None = None
    dirty_applied: int | None = None
    queued_at_freeze: int | None = None
    events_moved: int | None = None
    final_dirty_applied: int | None = None
    new_epoch: int | None = None
    events_dispatched_on_target: int | None = None
    # past the point of no return: the guest runs on the target, recovery goes forward only
    vm_switched: bool | None = None
    # post-copy started: the guest runs on the target only (saga/postcopy.py)
    postcopy_started: bool | None = None
    migration_uri: str | None = None  # the stream's, to ask the source about it after a restart
    vm_state: dict[str, str] | None = None  # each host's view of the VM when a post-copy failed
    retries: dict[str, int] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    # how it failed, and how the clean-up went
    code: str | None = None
    reason: str | None = None
    failed_step: str | None = None
    target_cleanup: Literal["done", "queued"] | None = None

    @property
    def switched(self) -> bool:
        return bool(self.vm_switched)

    def failed(self, step: str, code: str, reason: str) -> None:
        self.failed_step, self.code, self.reason = step, code, reason

    def retried(self, step: str) -> int:
        """Count one more forward retry of ``step``; the count survives a restart."""
        self.retries[step] = self.retries.get(step, 0) + 1
        return self.retries[step]

    def summary(self) -> dict[str, Any]:
        """What the ``completed`` status tells its followers."""
        keys = ("elements", "events_moved", "events_dispatched_on_target", "dirty_rounds", "vm_stats", "timings_ms", "epoch")
        d = self.dump()
        return {k: d[k] for k in keys if k in d}

    @classmethod
    def load(cls, data: dict[str, Any]) -> SagaState:
        return cls.model_validate(data)

    def dump(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude_none=True)
        for key in ("retries", "timings_ms"):
            if not out.get(key):
                out.pop(key, None)  # absent until the first one, as always
        return out
