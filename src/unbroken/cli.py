"""The ``unbroken`` command line (layer: edges).

Every command works on the database directly, with no application running: it opens the
storage synchronously, never creates a missing database file, and prints metadata only:
payload bytes never leave the database (INV-5). ``--json`` puts only JSON on stdout.

Exit codes: 0 ok, 1 not found or refused, 2 usage or database error. Errors are one line on stderr
(``error: ...``), never a traceback, and a database URL's password is never printed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .cipher import XChaChaCipher
from .config import load_config
from .errors import NotAnUnbrokenDatabase, StorageError, UnbrokenError
from .journal import EntryKind, ExecutionRecord, ExecutionStatus, StepInfo, ms_to_datetime
from .keys import KeyRing, read_key_file, rotated, without_previous, write_key_file
from .payloads import OUTSIDE_STEPS, key_file_path, open_payloads
from .storage import Storage
from .storage.url import open_storage, redact_url

__all__ = ["main"]

EXIT_NOT_FOUND = 1
EXIT_ERROR = 2

_PASSWORDS = re.compile(r"://[^/?#@:]*:(?P<a>[^/?#@]+)@|[?&]password=(?P<q>[^&#]+)", re.I)


class _Group(click.Group):
    """A group whose commands report failures as one ``error:`` line, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn any failure into ``error: ...`` and exit code 2."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except UnbrokenError as exc:
            _fail(ctx, str(exc))
        except BrokenPipeError:
            # The reader went away (``unbroken list | head``): stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(EXIT_ERROR) from None
        except Exception as exc:  # never a traceback; the type says where to look
            _fail(ctx, f"unexpected {type(exc).__name__}: {exc}")


def _fail(ctx: click.Context, message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr (passwords scrubbed) and exit with ``code``."""
    url = ctx.find_root().obj if isinstance(ctx.find_root().obj, str) else None
    click.echo(f"error: {_scrub(message, url)}", err=True)
    raise click.exceptions.Exit(code)


def _scrub(text: str, url: str | None) -> str:
    """``text`` with the URL redacted and any password it carries replaced by ``***``."""
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    for match in _PASSWORDS.finditer(url):
        secret = match["a"] or match["q"]
        if secret and len(secret) >= 3:  # shorter ones would mangle ordinary words
            text = text.replace(secret, "***")
    return text


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    help="Database URL, e.g. sqlite:///unbroken.db (relative) or sqlite:////var/app/u.db "
    "(absolute). Default: $UNBROKEN_DATABASE_URL, then the config file, then "
    "sqlite:///unbroken.db.",
)
@click.version_option(__version__, "--version", prog_name="unbroken")
@click.pass_context
def main(ctx: click.Context, db_url: str | None) -> None:
    """Inspect and operate unbroken's durable executions.

    Commands work on the database directly, with no application running, and print
    metadata only: step results and other payloads stay in the database.
    """
    ctx.obj = db_url


def _database_url(ctx: click.Context) -> str:
    """``--db``, else the URL precedence of the configuration."""
    url = ctx.find_root().obj
    if not isinstance(url, str):
        url = load_config(None).database_url
        ctx.find_root().obj = url  # so errors can scrub it
    return url


@contextmanager
def _storage(ctx: click.Context) -> Iterator[Storage]:
    """The open storage of the database URL; a missing database file is an error."""
    storage = open_storage(_database_url(ctx), create=False)
    try:
        storage.open()
    except StorageError as exc:
        if isinstance(exc, NotAnUnbrokenDatabase) or exc.op != "open":
            raise
        _fail(ctx, f"{exc}; choose the database with --db URL or UNBROKEN_DATABASE_URL")
    try:
        yield storage
    finally:
        storage.close()


# -- formatting ---------------------------------------------------------------------


def _iso(ms: int | None) -> str | None:
    """Unix milliseconds as ISO-8601 UTC (``2025-01-31T12:00:00.000Z``), or ``None``."""
    if ms is None:
        return None
    return ms_to_datetime(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _when(ms: int | None) -> str:
    """Unix milliseconds as a short UTC time for tables."""
    return "-" if ms is None else ms_to_datetime(ms).strftime("%Y-%m-%d %H:%M:%S")


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so a name cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> None:
    """Print an aligned table; columns whose index is in ``right`` align right."""
    cells = [list(headers), *([_printable(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        click.echo(line.rstrip())


def _echo_json(value: Any) -> None:
    """Print ``value`` as the only thing on stdout."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


# -- commands -----------------------------------------------------------------------

_STATUSES = [status.value for status in ExecutionStatus]


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (and nothing else).")
@click.option("--status", type=click.Choice(_STATUSES), help="Only executions in this status.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="At most this many executions.",
)
@click.pass_context
def list_(ctx: click.Context, as_json: bool, status: str | None, limit: int) -> None:
    """List executions, newest first."""
    with _storage(ctx) as storage:
        wanted = ExecutionStatus(status) if status is not None else None
        found = storage.list_executions(status=wanted, limit=limit)
    if as_json:
        _echo_json(
            [
                {
                    "execution_id": e.execution_id,
                    "workflow": e.workflow,
                    "status": e.status.value,
                    "steps": e.steps,
                    "created_at": _iso(e.created_at_ms),
                    "finalized_at": _iso(e.finalized_at_ms),
                }
                for e in found
            ]
        )
        return
    if not found:
        click.echo(f"no executions{f' with status {status}' if status else ''}")
        return
    rows = [
        (
            e.execution_id,
            e.workflow,
            e.status.value,
            str(e.steps),
            _when(e.created_at_ms),
            _when(e.finalized_at_ms),
        )
        for e in found
    ]
    headers = ("EXECUTION ID", "WORKFLOW", "STATUS", "STEPS", "CREATED (UTC)", "FINALIZED (UTC)")
    _table(headers, rows, right=(3,))


REVEAL_WARNING = (
    "warning: --reveal prints decrypted payloads (inputs, step results, outputs, errors); "
    "they may hold personal data or secrets"
)


@main.command()
@click.argument("execution_id")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (and nothing else).")
@click.option(
    "--reveal", is_flag=True, help="Also print decrypted payloads (after a warning on stderr)."
)
@click.pass_context
def show(ctx: click.Context, execution_id: str, as_json: bool, reveal: bool) -> None:
    """Show an execution and the metadata of its journal rows (payloads only with --reveal).

    Each journal row shows its sequence number, step id, step name, effect class, kind
    (result, error, intent, control, checkpoint), generation, payload size in bytes and the
    first 8 bytes of its idempotency key in hex.
    """
    with _storage(ctx) as storage:
        record = storage.get_execution(execution_id)
        rows = storage.list_steps(execution_id) if record is not None else []
        if record is None:
            _fail(ctx, f"no execution with id {execution_id!r}", EXIT_NOT_FOUND)
        revealed = _reveal(storage, record) if reveal else None
    if as_json:
        document = _execution_json(record, rows)
        if revealed is not None:
            document["payloads"] = {k: _as_json(v) for k, v in revealed.items()}
        _echo_json(document)
        return
    _show_text(record, rows)
    if revealed is not None:
        click.echo()
        for label, text in revealed.items():
            click.echo(f"{label}: {text}")


def _reveal(storage: Storage, record: ExecutionRecord) -> dict[str, str | None]:
    """Every payload of an execution as its stored JSON text, under a label."""
    click.echo(REVEAL_WARNING, err=True)
    payloads = open_payloads(storage, load_config(None), read_only=True)
    eid = record.execution_id
    out: dict[str, str | None] = {}
    for label, blob, kind in (
        ("inputs", record.inputs, "inputs"),
        ("output", record.output, "output"),
        ("error", record.error, "execution_error"),
    ):
        if blob is not None:
            out[label] = payloads.reveal(
                blob,
                execution_id=eid,
                generation=0,
                step_id=OUTSIDE_STEPS,
                kind=kind,
                idem_key=b"",
            )
    for generation in range(record.generation + 1):
        for e in storage.read_segment(eid, generation, 0, 2**31):
            if e.payload is not None:
                out[f"gen {generation} step {e.step_id} {e.kind.value} ({e.name})"] = (
                    payloads.reveal(
                        e.payload,
                        execution_id=eid,
                        generation=generation,
                        step_id=e.step_id,
                        kind=e.kind.value,
                        idem_key=e.idem_key,
                    )
                )
    return out


def _as_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _steps_done(record: ExecutionRecord, rows: Sequence[StepInfo]) -> int:
    """Steps with a result or an error in the current generation (as ``list`` counts)."""
    done = (EntryKind.RESULT, EntryKind.ERROR)
    return sum(1 for r in rows if r.generation == record.generation and r.kind in done)


def _execution_json(record: ExecutionRecord, rows: Sequence[StepInfo]) -> dict[str, Any]:
    """``show --json``: the execution's metadata and its journal rows' metadata."""
    return {
        "execution_id": record.execution_id,
        "workflow": record.workflow,
        "status": record.status.value,
        "generation": record.generation,
        "steps": _steps_done(record, rows),
        "created_at": _iso(record.created_at_ms),
        "updated_at": _iso(record.updated_at_ms),
        "finalized_at": _iso(record.finalized_at_ms),
        "error_type": record.error_type,
        "journal": [
            {
                "seq": r.seq,
                "step_id": r.step_id,
                "name": r.name,
                "effect_class": r.effect_class,
                "kind": r.kind.value,
                "generation": r.generation,
                "payload_bytes": r.payload_bytes,
                "idempotency_key_prefix": r.idem_key_prefix,
                "created_at": _iso(r.created_at_ms),
            }
            for r in rows
        ],
    }


def _show_text(record: ExecutionRecord, rows: Sequence[StepInfo]) -> None:
    """``show``: the execution's metadata, then a table of its journal rows."""
    fields = [
        ("execution", record.execution_id),
        ("workflow", record.workflow),
        ("status", record.status.value),
        ("generation", str(record.generation)),
        ("steps", str(_steps_done(record, rows))),
        ("created", _when(record.created_at_ms) + " UTC"),
        ("updated", _when(record.updated_at_ms) + " UTC"),
        ("finalized", _when(record.finalized_at_ms) + (" UTC" if record.finalized_at_ms else "")),
    ]
    if record.error_type:
        fields.append(("error", record.error_type))
    for label, value in fields:
        click.echo(f"{label + ':':<12} {_printable(value)}")
    click.echo()
    if not rows:
        click.echo("the journal holds no rows")
        return
    headers = ("SEQ", "STEP", "NAME", "EFFECT", "KIND", "GEN", "BYTES", "KEY")
    table = [
        (
            str(r.seq),
            str(r.step_id),
            r.name,
            r.effect_class,
            r.kind.value,
            str(r.generation),
            str(r.payload_bytes),
            r.idem_key_prefix,
        )
        for r in rows
    ]
    _table(headers, table, right=(0, 1, 5, 6))


@main.command()
@click.option("--keep", is_flag=True, help="Keep the demo's database and say how to inspect it.")
@click.pass_context
def demo(ctx: click.Context, keep: bool) -> None:
    """Prove crash-and-resume: SIGKILL a running workflow, then resume it.

    A worker process runs a workflow with parallel steps and a paid call to a local
    counting service, and is killed with SIGKILL mid-run; a second worker recovers the
    execution, replays the committed steps and finishes it. The paid call happens exactly
    once. Needs no server, key or configuration (it uses its own temporary database, not
    --db); exit code 0 when the proof holds.
    """
    from .demo import run_demo  # the demo's HTTP and subprocess machinery, only when asked

    ctx.exit(run_demo(keep=keep))


@main.command("rotate-key")
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
@click.option(
    "--drop-previous",
    is_flag=True,
    help="Close the rotation window: forget the previous key (refused while data needs it).",
)
@click.pass_context
def rotate_key(ctx: click.Context, dry_run: bool, drop_previous: bool) -> None:
    """Rotate the payload key of a local database's key file.

    A new key becomes current (new writes use it); the old one stays as the previous key,
    so everything stored so far stays readable. --drop-previous forgets the previous key
    once no stored value needs it, and says how many still do otherwise. Keys given in
    UNBROKEN_KEY are rotated where that variable is set.
    """
    with _storage(ctx) as storage:
        config = load_config(None)
        path = key_file_path(storage, config, os.environ)
        if path is None:
            _fail(
                ctx,
                "keys come from UNBROKEN_KEY: rotate them where it is set "
                "(UNBROKEN_KEY = new key, UNBROKEN_KEY_PREVIOUS = old key)",
            )
        payloads = open_payloads(storage, config, read_only=True)  # the file matches the db
        ring = read_key_file(path)
        if drop_previous:
            _drop_previous(ctx, storage, path, ring, dry_run)
            return
        new = rotated(ring)
        cipher = payloads.cipher
        assert cipher is not None
        if not dry_run:
            write_key_file(path, new)
            verifier = XChaChaCipher(new.current, new.previous).verifier(new.current)
            storage.add_key_verifier(new.current.key_id, verifier, time.time_ns() // 1_000_000)
    verb = "would rotate" if dry_run else "rotated"
    click.echo(
        f"{verb} {path}: new key id {new.current.key_id} (fingerprint "
        f"{new.current.fingerprint()}); key id {ring.current.key_id} stays readable as the "
        "previous key"
    )


def _drop_previous(
    ctx: click.Context, storage: Storage, path: Path, ring: KeyRing, dry_run: bool
) -> None:
    previous = ring.previous
    if previous is None:
        click.echo(f"{path} holds no previous key: nothing to drop")
        return
    needed = storage.count_sealed(previous.key_id)
    if needed:
        _fail(
            ctx,
            f"refused: {needed} stored values still need the previous key (id "
            f"{previous.key_id}); it stays until they are pruned",
            EXIT_NOT_FOUND,
        )
    if not dry_run:
        write_key_file(path, without_previous(ring))
    verb = "would drop" if dry_run else "dropped"
    click.echo(f"{verb} the previous key (id {previous.key_id}) from {path}")


# The operating commands (cancel, resolve, prune) and the worker live in their own modules
# and register themselves on ``main``; importing them here makes ``unbroken.cli.main``
# complete.
from . import cli_operate, cli_worker  # noqa: E402, F401
