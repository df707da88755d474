"""Engine configuration: defaults, config file, environment, arguments (layer: engine).

Precedence, lowest first: the defaults below, ``unbroken.toml`` (or ``[tool.unbroken]`` in
``pyproject.toml``) in the working directory, ``UNBROKEN_*`` environment variables (the
key in upper case, e.g. ``UNBROKEN_JOURNAL_FLUSH_INTERVAL_MS``; the URL is
``UNBROKEN_DATABASE_URL``), then keyword arguments of ``Engine(...)``.

``queue_concurrency`` maps queue names to the most executions of that queue owned at once
across all workers: a table in the file (``[tool.unbroken.queue_concurrency]``), a mapping
in Python, or ``UNBROKEN_QUEUE_CONCURRENCY="default=8,emails=2"``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_DATABASE_URL", "Config", "load_config"]

DEFAULT_DATABASE_URL = "sqlite:///unbroken.db"


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of an engine, with its default."""

    database_url: str = DEFAULT_DATABASE_URL
    sqlite_synchronous: str = "NORMAL"
    """``NORMAL`` survives a process crash; ``FULL`` also survives power loss."""
    journal_flush_interval_ms: int = 10
    journal_max_batch: int = 256
    journal_ack_timeout_ms: int = 5000
    journal_ack_every_step: bool = False
    """Acknowledge every step's outcome (idempotent and at-least-once ones too) before the
    step returns, as guarded steps always are: a crash right after a step returns loses
    nothing, at one commit per step (``UNBROKEN_JOURNAL_ACK_EVERY_STEP``)."""
    sync_step_inline_us: int = 0
    """Opt-in: a sync step function whose last 8 runs in worker threads each returned,
    without raising, within this many microseconds runs on the event loop's thread,
    skipping the hand-over to a thread and back (tens of µs); a run there over the limit
    or that raises sends it back to show itself quick again, one over ten times the limit
    for good. 0 (default): sync step functions always run in worker threads. Not for
    functions that can wait for work of the loop itself (a queue async tasks fill): on the
    loop's thread they would wait forever."""
    max_payload_bytes: int = 1_048_576
    max_steps_per_execution: int = 10_000
    replay_segment_steps: int = 100
    promise_poll_interval_secs: float = 1.0
    stale_owner_secs: float = 10.0
    ttl_completed_secs: int = 7 * 86_400
    """Completed executions are pruned this long after they finished."""
    ttl_failed_secs: int = 30 * 86_400
    """Failed, aborted and canceled executions are pruned this long after they ended."""
    max_executions: int = 10_000
    """Keep at most this many executions (oldest terminal ones go first; 0 = no cap)."""
    max_journal_bytes: int = 1 << 30
    """Keep stored payloads under this size (oldest terminal executions go; 0 = no cap)."""
    prune_batch_size: int = 500
    prune_interval_secs: float = 3600.0
    stale_running_after_secs: int = 0
    """Abort a ``running`` execution of an unregistered workflow with no live owner after
    this long without progress (0 = never; registered ones are resumed, not swept)."""
    encrypt_payloads: bool = True
    """Seal every payload (XChaCha20-Poly1305); ``false`` only on local SQLite, with a WARN."""
    key_file: str = ""
    """A key file (``UNBROKEN_KEY_FILE``); default: ``UNBROKEN_KEY`` or ``<database>.key``."""
    queue_concurrency: dict[str, int] = field(default_factory=dict)
    """Queue name → the most executions of that queue running at once across all workers
    (a queue not named here has no limit)."""
    worker_poll_interval_secs: float = 1.0
    """How often an idle worker looks for queued work (with jitter) when no notification
    wakes it; one cheap query per interval."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or value < 0):
                raise ConfigurationError(f"setting {f.name!r} must be a non-negative number")
        object.__setattr__(self, "queue_concurrency", _limits(self.queue_concurrency, "setting"))
        if self.sqlite_synchronous.upper() not in ("NORMAL", "FULL"):
            raise ConfigurationError("setting 'sqlite_synchronous' must be NORMAL or FULL")


_KEYS = {f.name: f.type for f in fields(Config)}


def load_config(
    url: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from every source, in precedence order.

    Raises:
        ConfigurationError: an unknown key, or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    values.update(_from_file(cwd or Path.cwd()))
    values.update(_from_env(os.environ if environ is None else environ))
    for key, value in (overrides or {}).items():
        values[_check_key(key, "Engine argument")] = value
    if url is not None:
        values["database_url"] = url
    try:
        return dataclasses.replace(Config(), **values)
    except TypeError as exc:
        raise ConfigurationError(f"invalid configuration: {exc}") from None


def _check_key(key: str, source: str) -> str:
    if key not in _KEYS:
        raise ConfigurationError(f"unknown setting {key!r} in {source}")
    return key


def _limits(raw: object, source: str) -> dict[str, int]:
    """Queue limits from a mapping or ``"queue=limit,queue=limit"``; each a positive int."""
    what = "setting 'queue_concurrency'" + ("" if source == "setting" else f" in {source}")
    if isinstance(raw, str):
        pairs: list[tuple[object, object]] = []
        for item in filter(None, (part.strip() for part in raw.split(","))):
            text, sep, amount = item.partition("=")
            if not sep or not text.strip():
                raise ConfigurationError(f"{what} must look like 'default=8,emails=2'")
            pairs.append((text.strip(), amount.strip()))
    elif isinstance(raw, Mapping):
        pairs = list(raw.items())
    else:
        raise ConfigurationError(f"{what} must map queue names to limits")
    limits: dict[str, int] = {}
    for name, limit in pairs:
        try:
            value = -1 if isinstance(limit, bool) else int(str(limit))
        except ValueError:
            value = -1
        if not isinstance(name, str) or not name or value < 1:
            raise ConfigurationError(f"{what}: the limit of {name!r} must be a positive integer")
        limits[name] = value
    return limits


def _coerce(key: str, raw: object, source: str) -> object:
    kind = _KEYS[key]
    if key == "queue_concurrency":
        return _limits(raw, source)
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigurationError(f"setting {key!r} in {source} must be true or false")
        return text in ("true", "1", "yes", "on")
    try:
        if kind == "int":
            return int(str(raw))
        if kind == "float":
            return float(str(raw))
    except ValueError:
        raise ConfigurationError(f"setting {key!r} in {source} must be a number") from None
    return str(raw)


def _from_env(environ: Mapping[str, str]) -> dict[str, object]:
    found: dict[str, object] = {}
    for key in _KEYS:
        name = "UNBROKEN_" + key.upper()
        if name in environ:
            found[key] = _coerce(key, environ[name], name)
    return found


def _from_file(cwd: Path) -> dict[str, object]:
    table: Mapping[str, object] = {}
    source = ""
    own = cwd / "unbroken.toml"
    project = cwd / "pyproject.toml"
    try:
        if own.is_file():
            source = str(own)
            table = tomllib.loads(own.read_text("utf-8"))
        elif project.is_file():
            source = f"[tool.unbroken] of {project}"
            tool = tomllib.loads(project.read_text("utf-8")).get("tool", {})
            table = tool.get("unbroken", {}) if isinstance(tool, dict) else {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read configuration file {source}: {exc}") from None
    return {
        _check_key(key, source): _coerce(key, value, source) for key, value in table.items()
    }
