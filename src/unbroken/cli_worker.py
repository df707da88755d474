"""The ``unbroken worker APP`` command: run an application's engine as a worker (layer: edges).

``APP`` is ``module:attribute`` naming an ``Engine`` whose workflows the module registers;
the module is imported with the working directory first on ``sys.path``, as ``python -m``
would. The worker opens the engine (recovery, timers, retention and periodic recovery of
dead owners' executions come with it) and claims queued work until SIGTERM or SIGINT; then
it stops claiming, its in-flight executions stop at their next await (they stay queued for
another worker) and it exits 0.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

import click

from .cli import _fail, main
from .engine import Engine
from .worker import run_worker

__all__ = ["load_app", "worker"]


def load_app(spec: str) -> Engine:
    """The ``Engine`` that ``module:attribute`` names (the attribute may be dotted).

    Raises:
        click.UsageError: the spec is malformed or names no engine.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise click.UsageError(f"APP must look like module:attribute, not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import {module_name!r}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise click.UsageError(f"{module_name!r} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not isinstance(found, Engine):
        raise click.UsageError(f"{spec} is a {type(found).__name__}, not an unbroken Engine")
    return found


async def _serve(engine: Engine, queues: Sequence[str], concurrency: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with engine:
            click.echo(
                f"unbroken worker (pid {os.getpid()}) on {engine.storage.display_url}: "
                f"queues {', '.join(queues)}, concurrency {concurrency}",
                err=True,
            )
            stats = await run_worker(engine, queues=queues, concurrency=concurrency, stop=stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    click.echo(
        f"unbroken worker (pid {os.getpid()}) stopped: {stats.claimed} claimed, "
        f"{stats.ended} ended",
        err=True,
    )


@main.command()
@click.argument("app")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    default=("default",),
    show_default=True,
    help="A queue to take work from (repeat for several).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Executions this worker runs at once.",
)
@click.pass_context
def worker(ctx: click.Context, app: str, queues: tuple[str, ...], concurrency: int) -> None:
    """Run queued work (engine.enqueue) of APP, a module:attribute naming an Engine.

    Opens the engine on its own database (so --db does not apply), resumes orphaned
    executions, then claims executions of the queues until SIGTERM or SIGINT. A queue's
    queue_concurrency limit holds across all workers; --concurrency bounds this one.
    In-flight executions stop at their next await on shutdown and wait for another worker.
    """
    if isinstance(ctx.find_root().obj, str):
        raise click.UsageError("worker uses the engine's own database; --db does not apply")
    engine = load_app(app)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(engine, queues, concurrency))
    except ValueError as exc:  # a malformed queue name or argument
        _fail(ctx, str(exc))
