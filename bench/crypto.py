"""Cost of sealing and opening a payload with unbroken's XChaCha20-Poly1305 cipher.

Usage: python bench/crypto.py [--quick] [--out bench/results/DATE-crypto.json]

Measures, with timeit, the wall time in µs of one ``seal`` and one ``open`` (including the
AAD the payload layer builds for each call) for 1 KiB and 64 KiB payloads; each figure is
the median per-call time over several repetitions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import timeit
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from unbroken.cipher import Key, XChaChaCipher, aad

SIZES = {"1KiB": 1024, "64KiB": 64 * 1024}
CALLS = {"1KiB": 20_000, "64KiB": 2_000}
IDEM = bytes(range(32))


def _measure(fn: Any, number: int, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    samples = [t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeats)]
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "repeats": repeats,
        "calls_per_repeat": number,
    }


def run(quick: bool) -> dict[str, Any]:
    """Run every workload; return the results."""
    repeats = 3 if quick else 7
    cipher = XChaChaCipher(Key.generate(1), Key.generate(0))
    results: dict[str, Any] = {}
    for label, size in SIZES.items():
        plaintext = bytes(i % 251 for i in range(size))
        number = CALLS[label] // (10 if quick else 1)
        blob = cipher.seal(plaintext, aad("bench", 0, 1, "result", IDEM))

        def seal(p: bytes = plaintext) -> bytes:
            return cipher.seal(p, aad("bench", 0, 1, "result", IDEM))

        def open_(b: bytes = blob) -> bytes:
            return cipher.open(b, aad("bench", 0, 1, "result", IDEM))

        results[f"seal_{label}_us"] = _measure(seal, number, repeats)
        results[f"open_{label}_us"] = _measure(open_, number, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repetitions")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args()
    results = run(args.quick)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cipher": "XChaCha20-Poly1305 (PyNaCl/libsodium)",
        "results": results,
    }
    print(f"{'workload':<16} {'median':>10} {'min':>10} {'max':>10}")
    for name, r in results.items():
        print(f"{name:<16} {r['median']:>10.2f} {r['min']:>10.2f} {r['max']:>10.2f}")
    default = Path(__file__).parent / "results" / f"{datetime.now(UTC):%Y-%m-%d}-crypto.json"
    out = args.out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
