"""Storage backends behind one protocol (layer: storage)."""

from __future__ import annotations

from .base import SCHEMA_VERSION, Storage
from .url import open_storage

__all__ = ["SCHEMA_VERSION", "Storage", "open_storage"]
