"""The operator CLI: ``bootmigrate`` (also ``python -m bootmigrate``).

A thin shell: parse, connect, call the library (:mod:`bootmigrate.commands`,
:func:`bootmigrate.migrate`), print a table or JSON, and map the outcome to an exit code.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from . import commands
from .checksums import Drift
from .config import SETTINGS_ONLY, ConfigError, ProjectConfig, find_config
from .control import step_label
from .drivers import address_of
from .errors import (
    ControlLocked,
    MigrationError,
    NotMigrated,
    finish_command,
    settle_command,
    utc_text,
)
from .migrations import load_migrations
from .plan import Plan, Target
from .report import MigrationReport
from .runner import migrate_with
from .settings import Settings

# Exit codes, for scripts and probes.
OK = 0
ERROR = 1  # 2 is click's own, for a usage error
PENDING = 3
LOCKED = 4
STUCK = 5
DRIFT = 6

# `--timeout` unless given: how long commands wait for the server, and how long `wait` waits
# in all (migrate()'s own default wait_timeout).
SERVER_TIMEOUT = 10.0
WAIT_TIMEOUT = 300.0

# What to do about migrations below the database's version that never ran.
OUT_OF_ORDER_FIX = (
    "renumber each above the database's version (to run next); or run them once now: "
    "bootmigrate up --out-of-order; or, if their change is already made: "
    "bootmigrate skip {versions}"
)

STATE_EXIT = {
    "up-to-date": OK,
    "ahead": OK,
    "pending": PENDING,
    "locked": LOCKED,
    "stuck": STUCK,
    "unsupported": ERROR,
    "invalid": ERROR,
    "out-of-order": DRIFT,
}

T = TypeVar("T")


class Failure(Exception):
    """An error to print as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    """The options every command shares, the settings made from them, and the connection."""

    uri: str
    db_name: str | None
    migrations: str
    settings: Settings
    timeout: float
    timeout_given: bool
    driver: str
    as_json: bool
    console: Console = field(init=False)

    @property
    def db_label(self) -> str:
        """The database as the operator named it, for messages."""
        return f"database {self.db_name!r}" if self.db_name else "the URI's database"

    def __post_init__(self) -> None:
        # Piped output (logs, scripts) gets wide lines rather than 80-column folding.
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 240)

    def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Connect (within ``--timeout``), run ``work(db)``, close. SIGTERM or SIGINT stops
        the work as a booting replica's shutdown would, and exits 128 + the signal."""

        async def main() -> T:
            client = self._client()
            try:
                db = self._database(client)
                await self._ping(db)
                return await work(db)
            finally:
                closed = client.close()
                if closed is not None:
                    await closed

        return anyio.run(until_signalled, main)

    def _client(self) -> Any:
        options: dict[str, Any] = {
            "serverSelectionTimeoutMS": int(self.timeout * 1000),
            "connectTimeoutMS": int(self.timeout * 1000),
        }
        if self.driver == "motor":
            try:
                from motor.motor_asyncio import AsyncIOMotorClient
            except ImportError:
                raise Failure(
                    "--driver motor: motor is not installed. Install it with "
                    "`pip install 'bootmigrate[motor]'`, or leave out --driver (and "
                    "BOOTMIGRATE_DRIVER) to use PyMongo's async API, the default."
                ) from None
            return AsyncIOMotorClient(self.uri, **options)
        from pymongo import AsyncMongoClient

        return AsyncMongoClient(self.uri, **options)

    def _database(self, client: Any) -> Any:
        if self.db_name:
            return client[self.db_name]
        from pymongo.errors import ConfigurationError

        try:
            return client.get_default_database()
        except ConfigurationError:
            raise Failure(
                "no database named: pass --db, set BOOTMIGRATE_DB, or put it in the URI "
                "(mongodb://host/NAME)"
            ) from None

    async def _ping(self, db: Any) -> None:
        from pymongo.errors import PyMongoError

        try:
            with anyio.fail_after(self.timeout + 1):
                await db.command("ping")
        except (PyMongoError, TimeoutError) as exc:
            # The driver's message goes on to describe its whole topology; keep the cause.
            reason = re.split(r" \(configured timeouts|, Timeout:", str(exc))[0]
            raise Failure(
                f"cannot reach MongoDB at {address_of(db)} within {self.timeout:g} s "
                f"(--timeout): {reason}"
            ) from None

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=_json_default))
        else:
            human()

    def confirm(self, question: str, yes: bool) -> None:
        if yes:
            return
        if not sys.stdin.isatty():
            raise Failure(
                "refusing to continue without confirmation: stdin is not a terminal; "
                "pass --yes to confirm"
            )
        if not click.confirm(question, default=False):
            raise Failure("cancelled; nothing was changed")


async def until_signalled(work: Callable[[], Awaitable[T]]) -> T:
    """``await work()``, stopped by SIGTERM or SIGINT (then a :class:`Failure` exiting 128 +
    the signal's number, unless the work finished all the same, within its grace).

    In a container the command is often process 1, which the kernel gives no default action
    for SIGTERM: without this it would run on until SIGKILL. A second signal while the first
    is being honoured (a migration using its grace) is answered with a line, not obeyed:
    the default action would kill the process with the lock held and nothing recorded."""
    outcome: list[T] = []
    failure: list[Exception] = []
    received: list[int] = []
    work_scope = anyio.CancelScope()

    async def run() -> None:
        try:
            with work_scope:
                outcome.append(await work())
        except Exception as exc:  # raised below, as is
            failure.append(exc)
        finally:
            group.cancel_scope.cancel()  # the signal watcher

    async def watch() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for number in signals:
                if received:
                    click.echo(
                        f"already stopping ({signal.Signals(received[0]).name}); a running "
                        "migration is using its shutdown grace (SIGKILL stops at once, "
                        "leaving the lock as a killed process does)",
                        err=True,
                    )
                    continue
                received.append(number)
                work_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        group.start_soon(run)
    if failure:
        raise failure[0]
    if outcome:
        return outcome[0]
    name = signal.Signals(received[0]).name if received else "a signal"
    raise Failure(
        f"stopped by {name}; `bootmigrate status` shows the state it left",
        128 + (received[0] if received else signal.SIGTERM),
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    return str(value)


def common(command: Callable[..., int | None]) -> Callable[..., None]:
    """Shared options, one-line errors, and the exit code, for every command."""

    @click.option(
        "--uri",
        envvar="MONGODB_URI",
        default="mongodb://localhost:27017",
        show_default=True,
        help="Connection string (env MONGODB_URI).",
    )
    @click.option(
        "--db",
        "db",
        envvar="BOOTMIGRATE_DB",
        help="Database name (env BOOTMIGRATE_DB; default: the one in the URI).",
    )
    @click.option(
        "--migrations",
        envvar="BOOTMIGRATE_MIGRATIONS",
        default="migrations",
        show_default=True,
        help="Migrations directory or dotted package (env BOOTMIGRATE_MIGRATIONS).",
    )
    @click.option(
        "--collection",
        envvar="BOOTMIGRATE_COLLECTION",
        default="migrations",
        show_default=True,
        help="Collection holding the control document (env BOOTMIGRATE_COLLECTION).",
    )
    @click.option(
        "--history-collection",
        envvar="BOOTMIGRATE_HISTORY_COLLECTION",
        help="Collection holding the history (env BOOTMIGRATE_HISTORY_COLLECTION; "
        "default: <collection>_history).",
    )
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0.1),
        default=None,
        help=f"Seconds to wait for the server to answer (default {SERVER_TIMEOUT:g}); for "
        f"`wait`, the whole wait, reaching the server included (default {WAIT_TIMEOUT:g}).",
    )
    @click.option(
        "--driver",
        envvar="BOOTMIGRATE_DRIVER",
        type=click.Choice(["pymongo", "motor"]),
        default="pymongo",
        show_default=True,
        help="Async driver to connect with.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
    @click.option("--debug", is_flag=True, help="Show tracebacks and the library's log.")
    @click.option("-v", "--verbose", is_flag=True, help="Show progress lines on stderr.")
    @functools.wraps(command)
    def wrapper(**options: Any) -> None:
        debug, verbose = options.pop("debug"), options.pop("verbose")
        as_json = bool(options.get("as_json"))
        _configure_logging(debug=debug, verbose=verbose)
        try:
            session = _session(options)
            code = command(session, **options) or OK
        except (Failure, MigrationError) as exc:
            if debug:
                raise
            code = exc.code if isinstance(exc, Failure) else ERROR
            _report_error(exc, str(exc), code, as_json)
        except Exception as exc:
            if debug:
                raise
            code = ERROR
            message = f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            _report_error(exc, message, code, as_json)
        sys.exit(code)

    return wrapper


def _report_error(exc: Exception, message: str, code: int, as_json: bool) -> None:
    """One line on stderr; under ``--json``, one object on stdout instead, so that a script
    reads every outcome, errors included, from the same place."""
    if not as_json:
        click.echo(f"error: {message}", err=True)
        return
    error: dict[str, Any] = {
        "type": "CommandFailed" if isinstance(exc, Failure) else type(exc).__name__,
        "message": message,
    }
    reason = getattr(exc, "reason", None)
    if isinstance(exc, MigrationError) and isinstance(reason, str):
        error["reason"] = reason  # ControlLocked's: stuck, locked, lost, unfinished...
    click.echo(json.dumps({"error": error, "exit_code": code}, indent=2))


def _project() -> ProjectConfig:
    """The ``[tool.bootmigrate]`` section the command group found (none outside it)."""
    context = click.get_current_context(silent=True)
    found = context.find_root().obj if context is not None else None
    return found if isinstance(found, ProjectConfig) else ProjectConfig()


def _session(options: dict[str, Any]) -> Session:
    """The session from the shared options, which it takes out of ``options``."""
    settings = _checked(
        Settings(),
        collection=options.pop("collection"),
        history_collection=options.pop("history_collection"),
        **{k: v for k, v in _project().values.items() if k in SETTINGS_ONLY},
    )
    timeout = options.pop("timeout")
    return Session(
        uri=options.pop("uri"),
        db_name=options.pop("db"),
        migrations=options.pop("migrations"),
        settings=settings,
        timeout=SERVER_TIMEOUT if timeout is None else timeout,
        timeout_given=timeout is not None,
        driver=options.pop("driver"),
        as_json=options.pop("as_json"),
    )


def _configure_logging(*, debug: bool, verbose: bool) -> None:
    # The library logs its failures too; the error line says it once, unless asked for more.
    logger = logging.getLogger("bootmigrate")
    logger.propagate = False
    if debug or verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bootmigrate")
@click.pass_context
def main(ctx: click.Context) -> None:
    """See and drive bootmigrate's MongoDB migrations without hand-editing the database.

    Settings come from flags, then the environment, then `[tool.bootmigrate]` in the nearest
    pyproject.toml, then the defaults; `bootmigrate config` shows which.

    Exit codes: 0 success (status: up to date), 1 error, 2 usage, 3 pending migrations,
    4 locked by a running migration, 5 stuck after a failure, 6 applied migrations changed
    or a migration out of order.
    `wait` uses the same codes for what it found when it gave up. SIGTERM or SIGINT stops a
    command as it stops a booting replica, and exits 128 + the signal (143 for SIGTERM).
    """
    try:
        project = find_config(Path.cwd())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    ctx.obj = project
    ctx.default_map = project.default_map(main.commands)


@main.command()
@common
def status(session: Session) -> int:
    """Version, pending migrations and lock state. Exit 0 up to date, 3 pending, 4 locked,
    5 stuck."""
    found = session.run(lambda db: commands.status(db, session.migrations, session.settings))
    session.emit(found.as_json(), lambda: _print_status(session, found))
    return STATE_EXIT[found.state]


@main.command("plan")
@click.option("--to", "to", type=int, help="Target version (default: latest).")
@click.option(
    "--out-of-order",
    "allow_out_of_order",
    is_flag=True,
    help="As `up --out-of-order` would: migrations below the database's version that never "
    "ran, first.",
)
@common
def plan_command(session: Session, to: int | None, allow_out_of_order: bool) -> None:
    """What `up` (or `--to N`) would run, without running it: no lock, no writes."""
    target: Target = "latest" if to is None else to
    found = _plan(session, target, allow_out_of_order=allow_out_of_order)

    def human() -> None:
        _print_plan(session, found)
        if found.from_version == 0:
            _warn_if_no_database(session)

    session.emit(_plan_json(found), human)


@main.command()
@click.option("--to", "to", type=int, help="Target version (default: latest).")
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Seconds to wait for another process's lock.",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=Settings().shutdown_grace,
    show_default=True,
    help="On SIGTERM, seconds a running migration may go on to finish before it is cancelled.",
)
@click.option(
    "--yes",
    is_flag=True,
    help="Migrate even a database that does not exist yet (a first deploy).",
)
@click.option(
    "--out-of-order",
    "allow_out_of_order",
    is_flag=True,
    help="Run known migrations below the database's version that never ran (merged late), "
    "once, first, instead of refusing.",
)
@common
def up(
    session: Session,
    to: int | None,
    wait_timeout: float,
    shutdown_grace: float,
    yes: bool,
    allow_out_of_order: bool,
) -> None:
    """Apply pending migrations (up to --to N). SIGTERM stops it as it stops a booting
    replica: at once between migrations, after --shutdown-grace inside one. A database that
    does not exist yet is migrated only with --yes (a mistyped --db would create one). A
    migration below the database's version that never ran is refused, unless
    --out-of-order."""
    if not yes and not session.run(commands.database_exists):
        raise Failure(
            f"{session.db_label} does not exist on this server (it has no collections): `up` "
            "would create it and run every migration there. Check --db (or BOOTMIGRATE_DB, or "
            "the URI's); for a new database, pass --yes"
        )
    found = _plan(session, "latest" if to is None else to, allow_out_of_order=allow_out_of_order)
    if to is not None and found.to_version < found.from_version:
        raise Failure(
            f"--to {to} is below the database version {found.from_version}; "
            "use `bootmigrate down --to` to go down"
        )
    _migrate(
        session,
        target="latest" if to is None else to,
        wait_timeout=wait_timeout,
        shutdown_grace=shutdown_grace,
        allow_out_of_order=allow_out_of_order,
    )


@main.command()
@common
def wait(session: Session) -> int:
    """Wait until the database reaches this build's latest version, never taking the lock or
    writing (app pods and init containers, when a Job or release hook runs `up`).

    --timeout S bounds the whole wait, reaching the server included (default here: 300 s).
    Exit 0 reached (or ahead), 3 still pending with nobody migrating, 4 still locked by a live
    holder, 5 stuck after a failure or interruption (an operator must act), 1 other errors
    (the server unreachable), 2 a usage error, 143 stopped by SIGTERM (130: SIGINT).
    """
    if not session.timeout_given:
        session.timeout = WAIT_TIMEOUT
    started = time.monotonic()

    async def wait_for(db: Any) -> MigrationReport:
        left = max(session.timeout - (time.monotonic() - started), 0.1)
        settings = _checked(session.settings, apply=False, wait_timeout=left)
        return await migrate_with(db, session.migrations, settings)

    try:
        report = session.run(wait_for)
    except NotMigrated as exc:
        raise Failure(
            f"the database is at version {exc.db_version} and this build needs {exc.wanted}, "
            f"but nothing migrated it within {session.timeout:g} s (--timeout); `wait` only "
            "waits. Run the migrations where they run (`bootmigrate up`: the migration Job or "
            "release hook), and see why they did not: `bootmigrate status`.",
            PENDING,
        ) from exc
    except ControlLocked as exc:
        raise Failure(str(exc), STUCK if exc.reason == "stuck" else LOCKED) from exc
    session.emit(
        {
            "from_version": report.from_version,
            "to_version": report.to_version,
            "waited_s": report.waited,
            "ahead": report.ahead,
        },
        lambda: session.console.print(
            f"the database is at version {report.to_version}"
            + (f" (waited {report.waited:.1f} s)" if report.waited else "")
        ),
    )
    return OK


@main.command()
@click.option("--to", "to", type=int, help="Version to go down to.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    help="How many applied migrations to revert, newest first (instead of --to).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@common
def down(session: Session, to: int | None, steps: int | None, yes: bool) -> None:
    """Run down migrations to version N, or N steps down (asks first unless --yes)."""
    if (to is None) == (steps is None):
        raise Failure("give exactly one of --to N (a version) and --steps N (a count)", 2)
    if steps is not None:
        to = _steps_below(session, steps)
    assert to is not None
    found = _plan(session, to)
    if found.to_version > found.from_version:
        raise Failure(
            f"--to {to} is above the database version {found.from_version}; "
            "use `bootmigrate up --to` to go up"
        )
    if not found.steps:
        session.emit(
            _plan_json(found),
            lambda: session.console.print(
                f"nothing to revert: the database is at version {found.from_version}"
            ),
        )
        return
    versions = [step.migration.version for step in found.steps]
    never_ran = session.run(lambda db: commands.skipped(db, versions, session.settings))
    if not session.as_json:
        _print_plan(session, found)
        if never_ran:
            session.console.print(
                f"warning: {', '.join(map(str, never_ran))} never ran (recorded as skipped): "
                "running their down undoes a change that was never made by them"
            )
    question = f"Revert {len(found.steps)} migration(s), down to version {to}?"
    if never_ran:
        question += f" ({', '.join(map(str, never_ran))} only skipped, never applied)"
    session.confirm(question, yes)
    _migrate(session, target=to)


@main.command()
@click.argument("version", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@common
def rerun(session: Session, version: int, yes: bool) -> None:
    """Run one applied migration's `up` again; the version does not change (asks first
    unless --yes). Always runs (a rerun asked for at boot runs once per build)."""
    settings = _checked(session.settings, rerun=version)
    plan = session.run(lambda db: commands.plan(db, session.migrations, settings))
    if not session.as_json:
        _print_plan(session, plan)
    session.confirm(f"Run migration {version}'s up again, over data it has already changed?", yes)
    _migrate(session, rerun=version, explicit_rerun=True)


@main.command()
@click.option(
    "--force",
    is_flag=True,
    help="Unlock even a live holder's lock, or one whose interrupted migration is not safe "
    "to run again.",
)
@common
def unlock(session: Session, force: bool) -> None:
    """Unlock a stuck or abandoned lock (refuses a live holder's, and one that would let an
    interrupted migration not safe to repeat run again, unless --force)."""
    done = session.run(
        lambda db: commands.unlock(db, session.settings, force=force, migrations=session.migrations)
    )
    data = {"changed": done.changed, "version": done.version, "before": done.before.raw}

    def human() -> None:
        if not done.changed:
            session.console.print(f"not locked: nothing to do (version {done.before.version})")
            if not done.before.exists:
                _warn_if_no_database(session)
            return
        step = done.unfinished
        if done.recorded is not None:
            after = (
                f"its migration had finished (history records it applied), so version "
                f"{done.recorded} was recorded; the next boot resumes from there"
            )
        elif step is None or (step.get("direction") or "up") == "up":
            after = f"the next boot resumes from version {done.before.version}"
        else:
            after = (
                f"{step_label(step)} is still unfinished: no boot migrates past it until "
                f"`{_finish(step)}` finishes it, or `bootmigrate set-version N` records the "
                "version the database is really at"
            )
        session.console.print(f"unlocked: was {done.was}; {after}")

    session.emit(data, human)


@main.command("set-version")
@click.argument("version", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Even while a live holder runs migrations.")
@common
def set_version(session: Session, version: int, yes: bool, force: bool) -> None:
    """Record the database as being at VERSION without running anything (a skip)."""
    current = session.run(lambda db: commands.status(db, session.migrations, session.settings))
    creates = ""
    if not current.database_exists:
        creates = f" ({session.db_label} does not exist on this server: this creates it)"
    session.confirm(
        f"Set the version from {current.version} to {version} without running migrations?{creates}",
        yes,
    )
    before = session.run(
        lambda db: commands.set_version(
            db, version, session.migrations, session.settings, force=force
        )
    )
    session.emit(
        {"from_version": before.version, "to_version": version},
        lambda: session.console.print(
            f"version set from {before.version} to {version} (recorded in history)"
            + (
                f"; warning: {session.db_label} did not exist on this server, and now does"
                if not current.database_exists
                else ""
            )
        ),
    )


@main.command()
@click.argument("versions", type=int, nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@common
def skip(session: Session, versions: tuple[int, ...], yes: bool) -> None:
    """Record migrations below the database's version that never ran (out of order) as
    skipped, without running them: their change is already there, or must never be made."""
    names = ", ".join(map(str, sorted(set(versions))))
    if not session.as_json:
        session.console.print(f"would record {names} as skipped (never run) in history")
    session.confirm(f"Record {names} as skipped, never to run?", yes)
    done = session.run(
        lambda db: commands.skip(db, session.migrations, list(versions), session.settings)
    )
    session.emit(
        {"skipped": done},
        lambda: session.console.print(
            f"recorded {', '.join(map(str, done))} as skipped (in history); no boot refuses "
            "them as out of order any more"
        ),
    )


@main.command()
@common
def validate(session: Session) -> int:
    """Applied migrations whose code changed or disappeared, and migrations below the
    database's version that never ran (out of order); runs nothing. Exit 6 if any."""
    drift = session.run(lambda db: commands.validate(db, session.migrations, session.settings))

    def human() -> None:
        if not drift:
            session.console.print(
                "every applied migration matches the code that ran, and none is out of order"
            )
            return
        _print_drift(session, drift)
        if any(d.problem == "changed" for d in drift):
            session.console.print(
                "a change that does not alter what the migration does (a comment, a reformat) "
                "is accepted with `bootmigrate repair`"
            )
        late = " ".join(str(d.version) for d in drift if d.problem == "out_of_order")
        if late:
            session.console.print(f"out of order: {OUT_OF_ORDER_FIX.format(versions=late)}")

    session.emit([vars(d) for d in drift], human)
    return DRIFT if drift else OK


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@common
def repair(session: Session, yes: bool) -> int:
    """Accept the current code of applied migrations whose checksum changed (shows them and
    asks first unless --yes); recorded in history. Runs nothing."""
    drift = session.run(lambda db: commands.validate(db, session.migrations, session.settings))
    changed = [d for d in drift if d.problem == "changed"]
    if changed:
        if not session.as_json:
            _print_drift(session, changed)
        session.confirm(
            f"Accept the code of {len(changed)} migration(s) as it is now, as if it had run?", yes
        )
        changed = session.run(lambda db: commands.repair(db, session.migrations, session.settings))
    missing = [d for d in drift if d.problem == "missing"]

    def human() -> None:
        if changed:
            names = ", ".join(str(d.version) for d in changed)
            session.console.print(f"accepted the current code of {names} (recorded in history)")
        else:
            session.console.print("no changed checksum to accept")
        for d in missing:
            session.console.print(
                f"still reported: {d.describe()}; restore its file (a repair accepts only "
                "changed code)"
            )

    session.emit(
        {"accepted": [vars(d) for d in changed], "missing": [vars(d) for d in missing]}, human
    )
    return DRIFT if missing else OK


@main.command()
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@common
def history(session: Session, limit: int) -> None:
    """Per-migration records, newest first."""
    records = session.run(lambda db: commands.history(db, session.settings, limit=limit))

    def human() -> None:
        _print_history(session, records)
        if not records:
            _warn_if_no_database(session)

    session.emit(records, human)


@main.command()
@common
def config(session: Session) -> None:
    """Show each setting the commands use, and where it came from: a flag, the environment,
    `[tool.bootmigrate]` in pyproject.toml, or the default."""
    context = click.get_current_context()
    project = _project()
    where = {
        ParameterSource.COMMANDLINE: "flag",
        ParameterSource.ENVIRONMENT: "environment",
        ParameterSource.DEFAULT_MAP: f"{project.path}",
    }
    shown = {
        "uri": re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", session.uri),
        "db": session.db_name,
        "migrations": session.migrations,
        "collection": session.settings.collection,
        "history_collection": session.settings.history_name,
        "driver": session.driver,
        "timeout": session.timeout,
    }
    rows = [
        {
            "setting": name.replace("_", "-"),
            "value": value,
            "from": _source(where, context.get_parameter_source(name)),
        }
        for name, value in shown.items()
    ]
    defaults = {
        "lease": session.settings.lease,
        "wait_timeout": session.settings.wait_timeout,
        "shutdown_grace": session.settings.shutdown_grace,
        "allow_out_of_order": session.settings.allow_out_of_order,
    }
    for name, default in defaults.items():
        # up's own options (--wait-timeout...) are shown as up sees them
        scope = {"lease": "", "allow_out_of_order": " (up, plan)"}.get(name, " (up)")
        rows.append(
            {
                "setting": name.replace("_", "-") + scope,
                "value": project.values.get(name, default),
                "from": str(project.path) if name in project.values else "default",
            }
        )

    def human() -> None:
        table = _table("setting", "value", "from")
        for row in rows:
            table.add_row(str(row["setting"]), str(row["value"]), str(row["from"]))
        _show(session, table)

    session.emit({"file": str(project.path) if project.path else None, "settings": rows}, human)


def _print_drift(session: Session, drift: list[Drift]) -> None:
    table = _table("version", "name", "problem", "checksum then", "checksum now")
    for d in drift:
        table.add_row(str(d.version), d.name, d.problem, d.recorded[:12], (d.current or "")[:12])
    _show(session, table)


def _source(where: dict[ParameterSource, str], source: ParameterSource | None) -> str:
    return where.get(source, "default") if source is not None else "default"


@main.command()
@click.option(
    "--migrations",
    default="migrations",
    show_default=True,
    help="Directory to create for the migrations, relative to the project.",
)
@click.option("--db", "db", help="Database name to record in [tool.bootmigrate].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def init(migrations: str, db: str | None, as_json: bool) -> None:
    """Start using bootmigrate in this project: create the migrations directory and a
    `[tool.bootmigrate]` section in ./pyproject.toml (created if missing)."""
    try:
        done = commands.init_project(Path.cwd(), migrations, db)
    except (MigrationError, ConfigError) as exc:
        _report_error(exc, str(exc), ERROR, as_json)
        sys.exit(ERROR)
    if as_json:
        click.echo(json.dumps({"done": done}, indent=2))
        return
    for line in done:
        click.echo(line)


@main.command()
@click.argument("name")
@common
def new(session: Session, name: str) -> None:
    """Write the next migration file from a template (creating the directory if needed)."""
    path = commands.new_migration(Path(session.migrations), name)
    session.emit(
        {"path": str(path), "version": int(path.name.split("_")[0])},
        lambda: session.console.print(f"created {path}"),
    )


def _warn_if_no_database(session: Session) -> None:
    """After an empty answer: say so if the database does not exist at all (a mistyped name
    reads as an empty database)."""
    if not session.run(commands.database_exists):
        session.console.print(
            f"warning: {session.db_label} does not exist on this server (no collections): "
            "check --db (or BOOTMIGRATE_DB, or the URI's)"
        )


def _checked(base: Settings, **options: Any) -> Settings:
    """``base`` with ``options``, a bad value reported as a one-line error."""
    try:
        return base.updated(**options)
    except (TypeError, ValueError) as exc:
        raise Failure(str(exc)) from None


def _steps_below(session: Session, steps: int) -> int:
    """The version ``steps`` applied migrations below the database's: what `down --steps`
    goes down to (0 below the first)."""
    found = session.run(lambda db: commands.status(db, session.migrations, session.settings))
    applied = sorted(
        (m.version for m in load_migrations(session.migrations) if m.version <= found.version),
        reverse=True,
    )
    return applied[steps] if steps < len(applied) else 0


def _plan(session: Session, target: Target, **options: Any) -> Plan:
    settings = _checked(session.settings, target=target, **options)
    return session.run(lambda db: commands.plan(db, session.migrations, settings))


def _migrate(session: Session, explicit_rerun: bool = False, **options: Any) -> None:
    settings = _checked(session.settings, **options)
    report: MigrationReport = session.run(
        lambda db: migrate_with(db, session.migrations, settings, explicit_rerun=explicit_rerun)
    )
    data = {
        "from_version": report.from_version,
        "to_version": report.to_version,
        "applied": report.applied,
        "reverted": report.reverted,
        "waited_s": report.waited,
        # Whether this command took the lock; `holder`, in `status`, is who holds it.
        "held_lock": report.holder,
    }

    def human() -> None:
        ran = report.applied or report.reverted
        if not ran:
            session.console.print(f"nothing to do: the database is at version {report.to_version}")
            return
        verb = "reverted" if report.reverted else "applied"
        session.console.print(
            f"{verb} {', '.join(map(str, ran))}: version "
            f"{report.from_version} -> {report.to_version}"
        )

    session.emit(data, human)


def _plan_json(found: Plan) -> dict[str, Any]:
    return {
        "from_version": found.from_version,
        "to_version": found.to_version,
        "steps": [step.running() for step in found.steps],
    }


def _print_plan(session: Session, found: Plan) -> None:
    if not found.steps:
        session.console.print(f"nothing to run: the database is at version {found.from_version}")
        return
    table = _table("version", "name", "direction", "description")
    for step in found.steps:
        table.add_row(
            str(step.migration.version),
            step.migration.name,
            step.direction,
            step.migration.description,
        )
    _show(session, table)
    session.console.print(f"version {found.from_version} -> {found.to_version}")


def _print_status(session: Session, found: commands.Status) -> None:
    lock = found.lock
    rows: list[tuple[str, str]] = [
        ("state", found.state),
        ("version", str(found.version) if found.exists else "0 (no control document yet)"),
        ("latest", str(found.latest)),
        (
            "pending",
            "not known: this build's migrations do not load (see problem)"
            if found.state == "invalid"
            else ", ".join(f"{s.migration.version} {s.migration.name}" for s in found.pending)
            or "none",
        ),
    ]
    if not found.database_exists:
        rows.append(
            (
                "warning",
                f"{session.db_label} does not exist on this server (no collections): check "
                "--db (or BOOTMIGRATE_DB, or the URI's); `up` asks before creating it",
            )
        )
    if found.out_of_order:
        late = " ".join(str(m.version) for m in found.out_of_order)
        rows.append(
            (
                "out of order",
                ", ".join(m.label() for m in found.out_of_order)
                + f": below version {found.version}, never applied nor skipped",
            )
        )
        if found.state == "out-of-order":
            rows.append(("fix", OUT_OF_ORDER_FIX.format(versions=late)))
    elif found.problem:
        rows.append(("problem", found.problem))
    if lock.locked:
        holder = lock.holder or {}
        who = (
            f"{holder.get('host')} pid {holder.get('pid')}"
            + (f" build {holder['build']}" if holder.get("build") else "")
            if holder
            else "unknown (no owner recorded: set by Rocket.Chat or by hand)"
        )
        rows.append(("lock", "stuck" if lock.failure else "held"))
        if lock.failure is None:
            rows.append(("holder", who))
        if lock.since:
            rows.append(("since", f"{lock.since:%Y-%m-%d %H:%M:%S} UTC"))
        if lock.heartbeat_age is not None:
            expired = (
                f" (past its lease: {lock.on_expiry or 'the next boot takes it over'})"
                if lock.lease_expired
                else " (within its lease)"
            )
            # The server's clock dates the beat for people; replicas decide on their own clock.
            rows.append(
                (
                    "heartbeat",
                    f"{lock.heartbeat_age:.1f} s ago by the server's clock, lease "
                    f"{lock.lease:g} s{expired}",
                )
            )
        if lock.running:
            progress = lock.running.get("progress") or {}
            done = f" ({progress.get('done')}/{progress.get('total')} done)" if progress else ""
            rows.append(
                ("running", f"{lock.running.get('version')} {lock.running.get('name')}{done}")
            )
        if lock.failure:
            failure = lock.failure
            rows.append(
                (
                    "failed",
                    f"migration {failure.get('version')} "
                    f"{failure.get('name') or ''} ({failure.get('kind')}) on "
                    f"{failure.get('host')} at {utc_text(failure.get('at'))}",
                )
            )
            rows.append(("error", str(failure.get("error"))))
            where = _failing_line(failure.get("traceback"))
            if where:
                rows.append(("where", where))
            rows.append(("fix", _stuck_fix(failure)))
        elif lock.lease is None:
            rows.append(("fix", "if no migration is running: bootmigrate unlock"))
    else:
        rows.append(("lock", "free"))
        if lock.unfinished is not None:
            start = lock.unfinished.get("from_version")
            since = f", started at version {start}" if start is not None else ""
            rows.append(("unfinished", f"{step_label(lock.unfinished)}{since}"))
            finish = _finish(lock.unfinished)
            if finish.endswith("--out-of-order"):
                rows.append(("next", f"the next boot that allows it (`{finish}`) runs it again"))
            elif (lock.unfinished.get("direction") or "up") == "up":
                # Any boot that has it resumes an up: nothing for an operator to do.
                rows.append(("next", "the next boot (or `bootmigrate up`) runs it again"))
            else:
                rows.append(
                    (
                        "fix",
                        f"finish it: {_finish(lock.unfinished)}; or, once checked, record the "
                        "version the database is at: bootmigrate set-version N",
                    )
                )
    table = _table("", "", header=False)
    for key, value in rows:
        table.add_row(key, value)
    _show(session, table)


def _finish(step: dict[str, Any]) -> str:
    """The command that runs an unfinished step again in its own direction."""
    direction = step.get("direction") or "up"
    return finish_command(
        direction, step.get("version"), step.get("to_version"), step.get("from_version")
    )


def _failing_line(traceback: object) -> str | None:
    """The innermost frame of a recorded traceback (file, line, function), where the
    failure is; the whole tail stays in the control document and history."""
    if not isinstance(traceback, str):
        return None
    frames = [line.strip() for line in traceback.splitlines() if line.startswith('  File "')]
    return frames[-1] if frames else None


def _stuck_fix(failure: dict[str, Any]) -> str:
    """What to do about a stuck lock, by how its migration stopped and in which direction."""
    direction = failure.get("direction") or "up"
    if failure.get("kind") == "interrupted":
        fix = (
            f"check what it did; if it completed: {settle_command(failure)}, then bootmigrate "
            "unlock; else: bootmigrate unlock --force"
        )
    else:
        fix = (
            "fix the cause, then: bootmigrate unlock (it runs again from its start, over "
            "whatever it wrote before it failed)"
        )
    if direction != "up" or _finish(failure).endswith("--out-of-order"):
        fix += f", then finish it: {_finish(failure)}"
    return fix


def _print_history(session: Session, records: list[dict[str, Any]]) -> None:
    if not records:
        session.console.print("no history yet")
        return
    table = _table(
        "version",
        "name",
        "direction",
        "outcome",
        "finished (UTC)",
        "seconds",
        "host",
        "build",
        "error / note",
    )
    for r in records:
        duration = r.get("duration_s")
        finished = r.get("finished_at")
        table.add_row(
            str(r.get("version")),
            str(r.get("name") or ""),
            str(r.get("direction") or r.get("action") or ""),
            str(r.get("outcome")),
            f"{finished:%Y-%m-%d %H:%M:%S}" if isinstance(finished, datetime) else "",
            f"{duration:.3f}" if isinstance(duration, (int, float)) else "",
            str(r.get("host") or ""),
            str(r.get("build") or ""),
            str(r.get("error") or _note(r)),
        )
    _show(session, table)


def _note(record: dict[str, Any]) -> str:
    """A record's note, with the versions a skip lists (its ``version`` is the database's)."""
    note = str(record.get("note") or "")
    listed = record.get("versions")
    if isinstance(listed, list) and listed:
        note += f" (versions {', '.join(map(str, listed))})"
    return note.strip()


def _show(session: Session, table: Table) -> None:
    """Print ``table`` without the spaces rich pads its last column with: a line is as long
    as what it says, for people and for the scripts that grep it."""
    with session.console.capture() as captured:
        session.console.print(table)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _table(*columns: str, header: bool = True) -> Table:
    table = Table(box=None, show_header=header, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table
