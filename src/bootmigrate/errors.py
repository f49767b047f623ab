"""The error family: every failure ``migrate()`` raises on purpose is a :class:`MigrationError`.

Each error is built from fields (the version, the migration's name, the holder, the action) and
writes its own message from them, once, here: what happened, where, at which version, and the
command that fixes it, because the person reading it is usually an operator looking at a pod
that will not boot. Callers can read the fields instead of parsing the text.

What ``migrate()`` can raise:

- :class:`MigrationFailed`: a migration this call ran raised (or timed out); lock left stuck.
- :class:`ControlLocked`: the lock is stuck after an earlier failure or interruption, or
  another process still held it when ``wait_timeout`` ran out.
- :class:`LockLost`: this call held the lock and lost it (it stopped, writing nothing more).
- :class:`NotMigrated`: a wait-only call (``apply=False``) saw nobody bring the database to
  this build's version before ``wait_timeout``.
- :class:`UnsupportedUpgrade`: the database is older than this build upgrades from.
- :class:`DatabaseAhead`: the database is newer than this build, and that was refused.
- :class:`InvalidMigrations`: bad migration files or objects; nothing was written.
- :class:`InvalidControlDocument`: the control document has a shape it will not guess about.
- :class:`InvalidTarget`: the target or rerun version cannot be reached (also a ``ValueError``).
- :class:`DatabaseUnavailable`: the server could not be reached (or kept answering with
  errors worth retrying) until the deadline.
- :class:`DatabaseError`: the server refused an operation with an error retrying does not cure
  (``driver_errors.py`` tells the two kinds apart).

Options of the wrong type or value raise ``TypeError``/``ValueError`` before anything runs.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .control import Control

LockedReason = Literal[
    "stuck", "wait_timeout", "holder_alive", "changed", "lost", "unfinished", "interrupted"
]

# How much of an error's text is stored or repeated in a message: enough to say what went
# wrong, and a bound, so that an exception carrying a megabyte of text cannot push the control
# document past the server's size limit.
ERROR_TEXT_CHARS = 1000


def shorten(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters not kept)"


class MigrationError(Exception):
    """Base class of every error bootmigrate raises on purpose."""

    # The fields an error was built from, so that it can be built again: pickled (to leave a
    # worker process) or copied, an exception is rebuilt by calling its class.
    _fields: dict[str, Any] | None = None

    def __reduce__(self) -> Any:
        if self._fields is None:
            return super().__reduce__()
        return (_rebuild, (type(self), self._fields))


def _rebuild(cls: type[MigrationError], fields: dict[str, Any]) -> MigrationError:
    return cls(**fields)


def _fields(values: dict[str, Any]) -> dict[str, Any]:
    """An ``__init__``'s arguments, from its ``locals()``."""
    return {k: v for k, v in values.items() if k not in ("self", "__class__")}


class MigrationFailed(MigrationError):
    """A migration run by this call raised; the control lock is left stuck on purpose."""

    def __init__(
        self,
        *,
        version: int,
        name: str,
        direction: str,
        host: str,
        pid: int,
        collection: str,
        db_version: int,
        error: str,
        out_of_order: bool = False,
    ) -> None:
        error = shorten(error)
        self._fields = _fields(locals())
        self.version = version
        self.name = name
        self.direction = direction
        self.host = host
        self.pid = pid
        self.collection = collection
        self.db_version = db_version
        self.error = error
        label = f"{version:04d} {name}".rstrip()
        super().__init__(
            f"migration {label} ({direction}) failed on {host} (pid {pid}): {error}. The lock "
            f"in collection {collection!r} is left held on purpose, database at version "
            f"{db_version}. Fix the migration, then run `bootmigrate unlock`; "
            + _after_unlock(direction, version, out_of_order=out_of_order)
        )


class ControlLocked(MigrationError):
    """The lock is stuck after an earlier failure, or still held when the wait ran out.

    ``reason`` says which: ``"stuck"`` (a failure or interruption is recorded),
    ``"wait_timeout"`` (a live holder outlasted ``wait_timeout``), ``"holder_alive"`` (an
    operator action refused while a live holder runs), ``"changed"`` (the document changed
    under an operator action), ``"lost"`` (:class:`LockLost`), ``"unfinished"`` (a ``down``,
    ``rerun`` or ``up`` that did not finish, which this call's plan would step over:
    ``action`` says what it would run), ``"interrupted"`` (``unlock`` refused without
    ``--force``: it would let a migration that is not safe to repeat run again).
    ``control`` is the control document as read.
    """

    def __init__(
        self,
        reason: LockedReason,
        control: Control,
        *,
        collection: str,
        action: str = "",
        wait_timeout: float | None = None,
        heartbeat_age: float | None = None,
        lease: float | None = None,
    ) -> None:
        self._fields = _fields(locals())
        self.reason = reason
        self.control: dict[str, Any] | None = control.raw
        self.collection = collection
        # Optional because a LockLost, also a ControlLocked, has no reading to take them from.
        self.db_version: int | None = control.version
        self.holder: str | None = control.describe_owner()
        self.failure = control.failure
        self.running = control.running
        self.action = action
        self.wait_timeout = wait_timeout
        self.heartbeat_age = heartbeat_age
        self.lease = lease
        self.locked_since = control.locked_at
        self.unfinished = control.unfinished_step
        super().__init__(self._message())

    def _message(self) -> str:
        running = self.running or {}
        doing = f", running migration {running.get('version')}" if running else ""
        if self.reason == "stuck":
            return self._stuck_message()
        if self.reason in ("unfinished", "interrupted"):
            return self._unfinished_message()
        if self.reason == "wait_timeout":
            since = f" since {_utc(self.locked_since)}" if self.locked_since else ""
            return (
                f"gave up after {self.wait_timeout or 0:g} s (wait_timeout): the migration lock in "
                f"collection {self.collection!r} is held by {self.holder}{since}{doing}, "
                f"database at version {self.db_version}. If that process is alive, wait for it "
                "or raise wait_timeout; if it is not, and it records no lease, unlock with "
                "`bootmigrate unlock`."
            )
        if self.reason == "holder_alive":
            beat = (
                f" (heartbeat {self.heartbeat_age:.1f} s ago, lease {self.lease:g} s)"
                if self.heartbeat_age is not None and self.lease is not None
                else ""
            )
            return (
                f"refusing to {self.action}: {self.holder} is alive and holds the lock{beat}"
                f"{doing}. Wait for it to finish, or use --force only if you know that process "
                "is gone."
            )
        return (
            f"the control document changed while trying to {self.action} (another process "
            "acted on it); run status and try again"
        )

    def _stuck_message(self) -> str:
        failure = self.failure or {}
        version = failure.get("version")
        where = failure.get("host") or "an unknown host"
        if failure.get("pid"):
            where += f" (pid {failure['pid']})"
        interrupted = failure.get("kind") == "interrupted"
        what = "was interrupted" if interrupted else "failed"
        direction = failure.get("direction") or "up"
        if interrupted:
            fix = (
                "Check what it had done (`bootmigrate history`, and the data it changes); if it "
                f"completed, record that first with `{settle_command(failure)}`. Then unlock: "
                "`bootmigrate unlock --force`"
            )
        else:
            fix = (
                "Fix the cause (it runs again from its start, over whatever it wrote before "
                "it failed: make it safe to repeat, or undo that), then unlock: "
                "`bootmigrate unlock`"
            )
        return (
            f"migration {version} {failure.get('name') or ''} {what} on {where} at "
            f"{utc_text(failure.get('at'))}"
            f"{'' if direction == 'up' else f' during its `{direction}`'}: "
            f"{failure.get('error')}. The lock in collection "
            f"{self.collection!r} is held on purpose so that no replica boots on a "
            f"half-migrated database (at version {self.db_version}). {fix}, or "
            f"db.{self.collection}.updateOne("
            '{_id: "control"}, {$set: {locked: false}}); '
            + _after_unlock(
                direction, version, failure.get("to_version"), out_of_order=_late(failure)
            )
        )

    def _unfinished_message(self) -> str:
        step = self.unfinished or self.failure or self.running or {}
        version, direction = step.get("version"), step.get("direction") or "up"
        name = f" {step['name']}" if step.get("name") else ""
        label = f"migration {version}{name} ({direction})"
        # Still unfinished means the database is where the step started.
        start = step.get("from_version", self.db_version)
        end = step.get("to_version")
        if self.reason == "interrupted":
            return (
                f"refusing to unlock: {label} was interrupted (its holder stopped inside it) "
                "and is not known to be safe to run again: unlocking would let it run again "
                "over whatever it had half done. Check what it did (`bootmigrate history`, and "
                f"the data it changes). If it completed, record that with `{settle_command(step)}`"
                ", then unlock; to let it run again, "
                "`bootmigrate unlock --force`."
            )
        finish = finish_command(direction, version, end, start)
        if _late(step):
            settle = (
                f"`bootmigrate skip {version}` if it is complete (it ran out of order: the "
                f"version stays where it is), `bootmigrate set-version {start}` if nothing of it "
                "remains (its next run, out of order or under a new number, starts afresh)"
            )
        elif direction == "down":
            settle = (
                f"`bootmigrate set-version {end if end is not None else 'N'}` if the revert is "
                f"complete, `bootmigrate set-version {version}` if migration {version} is whole"
            )
        elif direction == "rerun":
            settle = f"`bootmigrate set-version {start}`"
        else:
            settle = (
                f"`bootmigrate set-version {version}` if it is complete, `bootmigrate "
                f"set-version {start}` if nothing of it remains"
            )
        first = ""
        if self.failure:
            force = " --force" if self.failure.get("kind") == "interrupted" else ""
            first = f"unlock first (`bootmigrate unlock{force}`), then "
        return (
            f"{label} did not finish: the database (at version {self.db_version}) may be half "
            f"way through it, so this call, which would {self.action}, refuses to step over "
            f"it. Either finish it in its own direction: {first}`{finish}`; or, once you have "
            f"checked the database, record the version it is really at: {settle}."
        )


class LockLost(ControlLocked):
    """This call held the lock but another process may have taken it over (this one was
    presumed dead). The holder stops at once and writes nothing more to the control document.

    ``token`` is the acquisition it held; ``during`` what it was doing when it found out.
    """

    def __init__(self, *, token: int, collection: str, lease: float, during: str) -> None:
        self._fields = _fields(locals())
        # Not ControlLocked.__init__: there is no control document reading to describe.
        MigrationError.__init__(
            self,
            f"this process lost the migration lock (token {token}) in collection "
            f"{collection!r} {during}: another process may have taken it over, because this "
            f"one missed its heartbeats for longer than its lease ({lease:g} s): paused, "
            "overloaded, or cut off from the server. It stopped and wrote nothing more; check "
            "the control document and history to see what the new holder did.",
        )
        self.reason: LockedReason = "lost"
        self.control = self.failure = self.running = None
        self.db_version = self.holder = self.locked_since = None
        self.action, self.wait_timeout, self.heartbeat_age = "", None, None
        self.collection = collection
        self.token = token
        self.lease = lease
        self.during = during


class NotMigrated(MigrationError):
    """A wait-only call (``apply=False``) gave up: nothing brought the database to the version
    this build needs within ``wait_timeout``, and no process held the lock at the end."""

    def __init__(
        self, *, db_version: int, wanted: int, wait_timeout: float, collection: str
    ) -> None:
        self._fields = _fields(locals())
        self.db_version = db_version
        self.wanted = wanted
        self.wait_timeout = wait_timeout
        super().__init__(
            f"the database is at version {db_version} and this build needs {wanted}, but "
            f"nothing migrated it within {wait_timeout:g} s (wait_timeout); this replica only "
            "waits (apply=False). Run the migrations where they run (`bootmigrate up`: the "
            "migration Job or release hook) and see why they did not: `bootmigrate status "
            f"--collection {collection}`."
        )


class UnsupportedUpgrade(MigrationError):
    """The database is older than the oldest version this build can upgrade from."""

    def __init__(self, *, db_version: int, floor: int, known: str, release: str | None) -> None:
        self._fields = _fields(locals())
        self.db_version = db_version
        self.floor = floor
        self.release = release
        through = (
            f"release {release}"
            if release
            else f"a release that has the migrations after {db_version} up to {floor}"
        )
        super().__init__(
            f"the database is at version {db_version}, older than version {floor}, the oldest "
            f"this build upgrades from (its migrations: {known}). Upgrade through {through} "
            "first; if those migrations were applied another way, record that with "
            f"`bootmigrate set-version {floor}`."
        )


class DatabaseAhead(MigrationError):
    """The database is newer than this build's latest migration, and that was refused.

    ``wanted`` is the lower target asked for, or ``None`` when booting (``on_ahead="error"``).
    """

    def __init__(self, *, db_version: int, latest: int, wanted: int | None) -> None:
        self._fields = _fields(locals())
        self.db_version = db_version
        self.latest = latest
        self.wanted = wanted
        if wanted is None:
            message = (
                f"the database is at version {db_version}, {ahead_text(latest)} Refused "
                "because on_ahead='error'."
            )
        else:
            message = (
                f"the database is at version {db_version}, newer than this build's latest "
                f"migration ({latest}); it cannot migrate down through versions it does not "
                "know. Run the down migration from a build that has them."
            )
        super().__init__(message)


def ahead_text(latest: int) -> str:
    """The common part of the database-ahead warning and error."""
    return (
        f"ahead of this build's latest migration ({latest}): an older build booting during a "
        "rollout? Not migrating down."
    )


class InvalidMigrations(MigrationError):
    """The migration set is malformed: nothing was written to the database."""


class OutOfOrder(InvalidMigrations):
    """Known migrations below the database's version were never applied nor skipped (merged
    after a higher one ran): refused unless run out of order on purpose. Nothing was
    written."""

    def __init__(self, *, missing: dict[int, str], db_version: int) -> None:
        self._fields = _fields(locals())
        self.missing = dict(missing)
        self.db_version = db_version
        self.reason = "out_of_order"
        first = min(missing)
        named = ", ".join(f"{v} ({where})" for v, where in sorted(missing.items()))
        many = len(missing) > 1
        numbers = " ".join(str(v) for v in sorted(missing))
        super().__init__(
            f"migration{'s' if many else ''} {named} {'are' if many else 'is'} below the "
            f"database's version {db_version} but {'were' if many else 'was'} never applied "
            "nor skipped: merged after a higher one had run? Planning from the version would "
            f"skip {'them' if many else 'it'} for ever, so nothing was run or written. Either "
            f"renumber {'them' if many else 'it'} above {db_version} (rename the file, e.g. "
            f"version {first} to {db_version + 1}), to run next; or run "
            f"{'them' if many else 'it'} once now, out of order: `bootmigrate up "
            "--out-of-order` (migrate(..., allow_out_of_order=True)); or, if the change is "
            f"already in the database, record it as skipped: `bootmigrate skip {numbers}`."
        )


class InvalidControlDocument(MigrationError):
    """The control document has a shape bootmigrate will not guess about."""

    def __init__(
        self, *, collection: str, problem: str, fix: str, document: dict[str, Any]
    ) -> None:
        self._fields = _fields(locals())
        self.collection = collection
        self.problem = problem
        self.document = document
        super().__init__(
            f"the control document in collection {collection!r} is malformed: {problem} "
            f"(document: {document!r}). {fix}"
        )


class DatabaseUnavailable(MigrationError):
    """The server could not be reached before the deadline.

    ``holding`` says whether this process held the lock when it lost contact.
    """

    def __init__(self, *, address: str, seconds: float, cause: str, holding: bool) -> None:
        self._fields = _fields(locals())
        self.address = address
        self.seconds = seconds
        self.cause = cause
        self.holding = holding
        if holding:
            message = (
                f"lost contact with MongoDB at {address} for over {seconds:g} s (the lease) "
                f"while holding the migration lock: {cause}. The lock will expire; the next "
                "process to boot decides from the control document whether the interrupted "
                "migration may be re-run."
            )
        else:
            message = (
                f"could not reach MongoDB at {address} within {seconds:g} s (wait_timeout): "
                f"{cause}. Check that the server is up and the connection string is right; "
                "migrations were not run."
            )
        super().__init__(message)


class DatabaseError(MigrationError):
    """The server refused an operation with an error that retrying would not cure (a missing
    privilege, a view where a collection should be, a command the server does not support).

    ``operation`` is what bootmigrate was doing; ``code`` and ``code_name`` the server's error
    code (``None`` when the problem was seen rather than reported), ``detail`` its message,
    ``fix`` what to do about it.
    """

    def __init__(
        self,
        *,
        operation: str,
        code: int | None,
        detail: str,
        fix: str,
        code_name: str | None = None,
    ) -> None:
        detail = shorten(detail)
        self._fields = _fields(locals())
        self.operation = operation
        self.code = code
        self.code_name = code_name
        self.detail = detail
        self.fix = fix
        if code is None:
            answer = detail
        else:
            name = f" ({code_name})" if code_name else ""
            answer = f"the server answered error {code}{name}: {detail}"
        super().__init__(f"could not {operation}: {answer}. {fix}")


class InvalidTarget(MigrationError, ValueError):
    """The requested target or rerun version cannot be reached from here."""


def _done_version(step: dict[str, Any]) -> Any:
    """The version the database is at once ``step`` has completed."""
    direction = step.get("direction") or "up"
    done = {"up": step.get("version"), "down": step.get("to_version")}.get(
        direction, step.get("from_version")
    )
    return done if done is not None else "N"


def _late(step: dict[str, Any]) -> bool:
    """Whether ``step`` is an ``up`` run out of order: it leaves the version where it was."""
    start, end = step.get("from_version"), step.get("to_version")
    return (step.get("direction") or "up") == "up" and start is not None and start == end


def settle_command(step: dict[str, Any]) -> str:
    """The command that records ``step`` as complete, once an operator checked that it is."""
    if _late(step):
        return f"bootmigrate skip {step.get('version')}"
    return f"bootmigrate set-version {_done_version(step)}"


def finish_command(direction: str, version: Any, to_version: Any, from_version: Any = None) -> str:
    """The command that runs an unfinished step again, in its own direction (``to_version``:
    where a ``down`` goes; an ``up`` from and to the same version ran out of order)."""
    if direction == "up" and from_version is not None and from_version == to_version:
        return "bootmigrate up --out-of-order"
    if direction == "down":
        return f"bootmigrate down --to {to_version if to_version is not None else '<target>'}"
    if direction == "rerun":
        return f"bootmigrate rerun {version}"
    return f"bootmigrate up --to {version}"


def _after_unlock(
    direction: str, version: Any, to_version: Any = None, *, out_of_order: bool = False
) -> str:
    """What happens once a failed or interrupted step's lock is unlocked: an ``up`` resumes at
    the next boot (one run out of order, at the next that allows it); a ``down`` or ``rerun``
    is finished only by running it again (no boot steps over it)."""
    if out_of_order:
        return (
            f"migration {version} ran out of order: the next boot that allows it "
            "(`bootmigrate up --out-of-order`, or allow_out_of_order=True) runs it again; "
            "others refuse to boot without it."
        )
    if direction == "up":
        return f"the next boot resumes at migration {version}."
    finish = finish_command(direction, version, to_version)
    return f"then finish it in its own direction: `{finish}`; until then no boot migrates past it."


def _utc(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def utc_text(value: object) -> str:
    """A moment read from the database (naive, in UTC) as people read it, with its zone;
    anything else as it is."""
    return _utc(value) if isinstance(value, datetime) else str(value)
