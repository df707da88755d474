"""How a worker or enqueuer process of bench/workers.py talks to the driver.

The child prints marked lines on stdout (``@@bench ready``, ``@@bench committed <time>``)
and waits for the driver's ``go`` line on stdin; everything else it prints (the systems'
own logs) is ignored by the driver.
"""

from __future__ import annotations

import asyncio
import sys
import time

MARK = "@@bench"
QUEUE = "bench"
STEPS = 3


def say(*words: object) -> None:
    print(MARK, *words, flush=True)


def wait_go() -> bool:
    """Block until the driver says ``go``; False when it closed stdin instead."""
    return sys.stdin.readline().strip() == "go"


async def wait_go_async() -> bool:
    return await asyncio.to_thread(wait_go)


def stamp() -> float:
    """Wall time, comparable between the processes of one machine."""
    return time.time()
