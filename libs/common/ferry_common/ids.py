"""Identifiers."""

from __future__ import annotations

import uuid


def new_id() -> str:
    """A random identifier for messages, migrations and reservations."""
    return uuid.uuid4().hex
