"""Every message on the wire is one of these pydantic models; see :mod:`.registry`."""

from .registry import REGISTRY, decode, encode, model_for, type_name

__all__ = ["REGISTRY", "decode", "encode", "model_for", "type_name"]
