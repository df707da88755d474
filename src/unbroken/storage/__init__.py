"""Storage backends behind one protocol (layer: storage)."""

from __future__ import annotations

from .base import SCHEMA_VERSION, Signer, Storage
from .url import open_storage

__all__ = ["SCHEMA_VERSION", "Signer", "Storage", "open_storage"]
