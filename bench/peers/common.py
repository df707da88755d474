"""What every adapter shares: the run environment, payloads and result records.

Each adapter module exposes ``run(workloads, params, env) -> list[dict]`` (async or not;
``params`` maps each workload to its parameters; each result names its workload) and is
imported only inside its own ``bench/run_one.py`` process, so no two systems ever share
a process, an event loop or a connection pool.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Env",
    "Skip",
    "payload",
    "record",
    "require_known",
    "size_label",
]

_PAYLOADS: dict[int, str] = {}


class Skip(Exception):
    """The system does not support this workload or backend; the message says why."""


@dataclass(frozen=True, slots=True)
class Env:
    """Where a run stores its data.

    ``db_url`` is a fresh database made for this run alone (a SQLite file in ``workdir``,
    or a PostgreSQL database the driver created and drops afterwards).
    """

    backend: str  # "sqlite" | "postgres"
    db_url: str
    workdir: Path
    restate_ingress: str = ""
    restate_admin: str = ""


def payload(size: int) -> str:
    """A step result of ``size`` bytes (ASCII, so every system's JSON encodes it as is)."""
    text = _PAYLOADS.get(size)
    if text is None:
        text = _PAYLOADS[size] = "x" * size
    return text


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def record(
    case: str,
    unit: str,
    value: float,
    *,
    durability: str = "",
    samples: list[float] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One measured figure of one run.

    ``value`` is what the driver aggregates across repetitions (median, min, max);
    ``samples`` are the run's own per-item figures when it has several.
    """
    out: dict[str, Any] = {"case": case, "unit": unit, "value": value, "durability": durability}
    if samples:
        out["samples"] = [round(s, 3) for s in samples]
        out["run_median"] = statistics.median(samples)
    if note:
        out["note"] = note
    return out


def require_known(workloads: list[str], fns: dict[str, Any]) -> None:
    """Refuse (``Skip``) a run that asks for a workload the adapter does not implement."""
    unknown = [w for w in workloads if w not in fns]
    if unknown:
        raise Skip(f"unknown workload(s) {unknown}")


def tagged(workload: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in results:
        r["workload"] = workload
    return results


def now() -> float:
    return time.perf_counter()
