"""The operating commands of the ``unbroken`` command line: ``cancel``, ``resolve`` and
``prune`` (layer: edges).

They change the database directly, with no application running, through the same
functions the engine uses: ownership locks (INV-15) before a cancel, ``waiting.settle`` for
a promise, ``Storage.prune`` with the configured retention policy. A resolver token never
reaches any output, error message included (INV-9), nor does a promise's value.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any

import click

from .cli import EXIT_ERROR, EXIT_NOT_FOUND, _echo_json, _fail, _printable, _storage, main
from .config import load_config
from .errors import (
    ExecutionLocked,
    PromiseRejected,
    UnbrokenError,
    UnknownPromise,
)
from .journal import ExecutionStatus, PromiseState
from .ownership import ownership_for
from .payloads import open_payloads
from .retention import policy_from
from .waiting import settle

__all__ = ["cancel", "prune", "resolve"]

TOKEN_ENV = "UNBROKEN_RESOLVER_TOKEN"

_SECRET_MIN = 4  # shorter arguments would mangle ordinary words of a usage message


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _hide(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` (longest first) replaced by ``***``."""
    for secret in sorted({s for s in secrets if len(s) >= _SECRET_MIN}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@main.command()
@click.argument("execution_id")
@click.pass_context
def cancel(ctx: click.Context, execution_id: str) -> None:
    """Cancel a running execution; it never resumes (INV-16').

    Works with no application running: takes the execution's ownership lock, so an
    execution a live process still owns is refused (cancel it there with engine.cancel, or
    stop that process first). An execution that already ended is left as it is.
    """
    shown = _printable(execution_id)
    with _storage(ctx) as storage:
        record = storage.get_execution(execution_id)
        if record is None:
            _fail(ctx, f"no execution with id {execution_id!r}", EXIT_NOT_FOUND)
        if record.status is not ExecutionStatus.RUNNING:
            click.echo(f"{shown} is already {record.status.value}")
            return
        try:
            lock = ownership_for(storage).acquire(execution_id)
        except ExecutionLocked as exc:
            holder = f"pid {exc.holder_pid}" if exc.holder_pid else "an unknown pid"
            _fail(
                ctx,
                f"refused: execution {execution_id!r} is owned by a live process ({holder}); "
                "cancel it there or stop that process first",
                EXIT_NOT_FOUND,
            )
        ended = False
        try:
            won = storage.finalize_execution(execution_id, ExecutionStatus.CANCELED, _now_ms())
            ended = True  # canceled now, or ended meanwhile
            after = storage.get_execution(execution_id) if not won else None
        finally:
            lock.release(ended=ended)
    if won:
        click.echo(f"canceled {shown}")
    else:  # it ended between the read and the lock: first terminal write wins
        status = after.status.value if after is not None else "gone"
        click.echo(f"{shown} is already {status}")


class _SecretArgsCommand(click.Command):
    """A command whose usage errors never repeat the arguments given (tokens, values)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as usual; scrub every given value from a usage error's message."""
        given = [a.partition("=")[2] if a.startswith("-") else a for a in args]
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise click.UsageError(_hide(exc.message, given), exc.ctx or ctx) from None


def _parse_value(ctx: click.Context, text: str) -> Any:
    """``--value`` as JSON; a usage error names the problem, never the text."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        _fail(ctx, f"--value is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except (ValueError, RecursionError) as exc:
        _fail(ctx, f"--value is not valid JSON: {type(exc).__name__}: {exc}")


@main.command(cls=_SecretArgsCommand)
@click.argument("promise_id")
@click.option(
    "--token",
    metavar="T",
    help=f"The promise's resolver token (64 lowercase hex characters). Default: ${TOKEN_ENV}, "
    "which keeps it out of shell history.",
)
@click.option("--value", metavar="JSON", help="Resolve with this JSON value.")
@click.option("--reject", metavar="MESSAGE", help="Reject instead: the waiter gets StepFailed.")
@click.pass_context
def resolve(
    ctx: click.Context,
    promise_id: str,
    token: str | None,
    value: str | None,
    reject: str | None,
) -> None:
    """Resolve (--value JSON) or reject (--reject MESSAGE) a durable promise.

    The workflow waiting on it continues with the value, or sees StepFailed when it was
    rejected, in whichever process runs it (within promise_poll_interval_secs). The token
    comes from --token or, when that is omitted, from the UNBROKEN_RESOLVER_TOKEN
    environment variable; it is checked like the engine checks it and never printed.
    Exit codes: 0 settled (or already settled), 1 unknown promise or a token that does not
    authenticate, 2 a malformed token or value.
    """
    if (value is None) == (reject is None):
        raise click.UsageError("give exactly one of --value JSON and --reject MESSAGE", ctx)
    if token is None:
        token = os.environ.get(TOKEN_ENV)
        if token is None:
            raise click.UsageError(f"no resolver token: give --token T or set {TOKEN_ENV}", ctx)
    token = token.strip()
    if reject is not None:
        state, payload = PromiseState.REJECTED, {"type": "Rejected", "message": reject}
    else:
        assert value is not None
        state, payload = PromiseState.RESOLVED, _parse_value(ctx, value)
    code, message = EXIT_ERROR, ""
    with _storage(ctx) as storage:
        try:
            payloads = open_payloads(storage, load_config(None), read_only=True)
            settled = settle(
                storage, payloads, promise_id, token, payload, state=state, now_ms=_now_ms()
            )
        except UnknownPromise:
            code, message = (
                EXIT_NOT_FOUND,
                f"no promise with id {promise_id!r} can be settled (unknown, or its execution "
                "was canceled, pruned or restarted)",
            )
        except PromiseRejected:
            code, message = (
                EXIT_NOT_FOUND,
                f"refused: the resolver token does not authenticate for promise {promise_id!r}",
            )
        except UnbrokenError as exc:  # InvalidArgument: a malformed token (exit 2)
            message = str(exc)
        except Exception as exc:  # never a traceback, and never the token
            message = f"unexpected {type(exc).__name__}: {exc}"
    if message:
        _fail(ctx, _hide(message, [token, value or "", reject or ""]), code)
    shown = _printable(promise_id)
    if not settled:
        click.echo(f"{shown} was already settled")
    else:
        click.echo(f"{'rejected' if state is PromiseState.REJECTED else 'resolved'} {shown}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Count what would be pruned; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (and nothing else).")
@click.pass_context
def prune(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Delete ended executions past their retention now (running ones never).

    Applies the configured policy, as an engine's retention service does: completed
    executions past ttl_completed_secs, failed, aborted and canceled ones past
    ttl_failed_secs, then the oldest ended ones over max_executions or max_journal_bytes
    (UNBROKEN_TTL_COMPLETED_SECS and the like override the configuration file). The
    lock files of the pruned executions are removed too, unless in use.
    """
    policy = policy_from(load_config(None))
    with _storage(ctx) as storage:
        discard = ownership_for(storage).discard  # the lock files of pruned executions
        report = storage.prune(policy, _now_ms(), dry_run=dry_run, on_pruned=discard)
    if as_json:
        _echo_json({"dry_run": dry_run, **asdict(report)})
        return
    verb = "would prune" if dry_run else "pruned"
    noun = "execution" if report.executions == 1 else "executions"
    rows = "journal row" if report.journal_rows == 1 else "journal rows"
    click.echo(
        f"{verb} {report.executions} {noun} ({report.journal_rows} {rows}): "
        f"{report.by_ttl} by TTL, {report.by_count_cap} by count cap, "
        f"{report.by_size_cap} by size cap"
    )
