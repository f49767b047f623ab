"""What operators call: status, plan, unlock, set-version, history, new.

The CLI is a thin shell around these; each one is also a library call. Applying migrations
(``up``, ``down``, ``rerun``) is :func:`bootmigrate.migrate` itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from .checksums import Drift, find_drift
from .config import ConfigError
from .control import Control, Owner, step_label
from .drivers import detect_driver
from .errors import ControlLocked, InvalidMigrations, InvalidTarget, MigrationError, OutOfOrder
from .history import Entry
from .ledger import Survey
from .lock import ControlLock, Lease, describe_lock
from .migrations import Migration, MigrationSource, catalog, floor_in_force, load_migrations
from .plan import Plan, Step, latest_version, plan_for, resolve_target, route_for
from .settings import Settings

State = Literal[
    "up-to-date", "pending", "locked", "stuck", "ahead", "unsupported", "invalid", "out-of-order"
]


@dataclass(frozen=True)
class Lock:
    """The lock as an operator needs to see it."""

    locked: bool
    holder: dict[str, Any] | None = None
    since: datetime | None = None
    heartbeat_age: float | None = None
    lease: float | None = None
    running: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    unfinished: dict[str, Any] | None = None
    on_expiry: str | None = None

    @classmethod
    def seen(
        cls,
        control: Control,
        lease: Lease,
        known: Mapping[int, Migration] | None = None,
        *,
        finished: bool = False,
    ) -> Lock:
        """The operator's view of ``control`` with its ``lease`` as judged now; ``known``
        (the migrations) tells whether a dead holder's migration may be re-run, ``finished``
        whether its history shows the step it names applied."""
        if not control.locked:
            return cls(locked=False, unfinished=control.unfinished_step)
        return cls(
            locked=True,
            holder=control.owner or None,
            since=control.locked_at,
            heartbeat_age=lease.silent_for,
            lease=lease.lease,
            running=control.running,
            failure=control.failure,
            unfinished=control.unfinished_step,
            on_expiry=_on_expiry(control, lease, known, finished),
        )

    @property
    def lease_expired(self) -> bool | None:
        """Whether a waiting replica would take this lock over (``None``: no lease)."""
        return Lease(self.heartbeat_age, self.lease).expired


@dataclass(frozen=True)
class Status:
    """Where the database is, what is pending, and who holds the lock."""

    collection: str
    exists: bool
    version: int
    latest: int
    pending: tuple[Step, ...]
    state: State
    lock: Lock
    problem: str | None = None
    # False when the database has no collection at all: often a mistyped name, where an
    # `up` would create a new database and run every migration there.
    database_exists: bool = True
    # Known migrations below the database's version never applied nor skipped (refused by
    # every boot that checks; see OutOfOrder).
    out_of_order: tuple[Migration, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The ``status --json`` schema (see docs/operations.md)."""
        lock = self.lock
        return {
            "collection": self.collection,
            "exists": self.exists,
            "database_exists": self.database_exists,
            "version": self.version,
            "latest": self.latest,
            "state": self.state,
            "pending": [_step_json(step) for step in self.pending],
            "out_of_order": [
                {"version": m.version, "name": m.name, "description": m.description}
                for m in self.out_of_order
            ],
            "problem": self.problem,
            "lock": {
                "locked": lock.locked,
                "holder": lock.holder,
                "since": _iso(lock.since),
                "heartbeat_age_s": lock.heartbeat_age,
                "lease_s": lock.lease,
                "lease_expired": lock.lease_expired,
                "running": lock.running,
                "failure": _jsonable(lock.failure),
                # A step that started and did not finish, whether or not the lock is held.
                "unfinished": lock.unfinished,
                "on_expiry": lock.on_expiry,
            },
        }


@dataclass(frozen=True)
class Unlocked:
    """What ``unlock`` found and changed; ``was`` describes the lock it removed."""

    changed: bool
    before: Control
    lock: Lock
    was: str
    # Set when the holder had died after its step's history record and before its version:
    # the step finished, and the unlock recorded the version it reached.
    recorded: int | None = None

    @property
    def version(self) -> int:
        """The database's version once unlocked."""
        return self.before.version if self.recorded is None else self.recorded

    @property
    def unfinished(self) -> dict[str, Any] | None:
        """The step left unfinished: the next boot resumes it (an ``up``), or refuses to step
        over it until it is run again in its direction (a ``down`` or ``rerun``)."""
        return self.lock.unfinished if self.changed and self.recorded is None else None


async def status(db: Any, migrations: MigrationSource, settings: Settings | None = None) -> Status:
    """Where the database is, what is pending and who holds the lock: the object
    ``bootmigrate status`` prints (``Status.as_json()`` is its ``--json``). Read-only, with no
    lock taken and nothing written; a readiness or admin endpoint may call it.

    >>> found = await status(db, "migrations")  # doctest: +SKIP
    >>> found.state, found.version, found.latest  # doctest: +SKIP
    ('pending', 3, 5)
    """
    settings = settings or Settings()
    detect_driver(db)
    lock = _lock(db, settings)
    try:
        known = load_migrations(migrations)
    except InvalidMigrations as exc:
        # The files do not load, but the database's state is still worth showing: it is
        # what an operator needs beside the file and line to fix.
        return await _status_without_migrations(db, lock, migrations, str(exc))
    control = await lock.read()
    lease = await lock.lease_of(control)
    finished = (
        control.running is not None
        and not control.stuck
        and bool(lease.expired)
        and await lock.finished_before_dying(control)
    )
    view = Lock.seen(control, lease, {m.version: m for m in known}, finished=finished)
    # Where the next boot will plan from: past a step its dead holder finished.
    planned = control.with_step_finished() if finished else control
    latest = latest_version(known)
    pending: tuple[Step, ...] = ()
    problem = None
    blocked = False  # by a step that did not finish, which a boot to latest would step over
    try:
        floor, release = floor_in_force(migrations, settings.floor, settings.floor_release)
        to_latest = plan_for(planned, known, floor=floor, floor_release=release)
        pending = to_latest.steps
        unfinished = planned.unfinished_step
        blocked = bool(
            pending
            and unfinished is not None
            and not to_latest.resumes(unfinished)
            and (not control.locked or view.lease_expired)
        )
        if blocked:
            problem = str(
                ControlLocked(
                    "unfinished",
                    planned,
                    collection=lock.collection_name,
                    action=to_latest.describe(),
                )
            )
    except MigrationError as exc:
        problem = str(exc)
    missing = await _out_of_order(lock, planned, known)
    # One that ran and stopped (stuck, or unfinished) is the lock's problem, said as such.
    named = (planned.failure or planned.unfinished_step or {}).get("version")
    if (
        missing
        and problem is None
        and not control.stuck
        and named not in {m.version for m in missing}
    ):
        problem = str(
            OutOfOrder(missing={m.version: m.label() for m in missing}, db_version=planned.version)
        )
    state: State
    if control.stuck or blocked:
        state = "stuck"
    elif control.locked:
        state = "locked"
    elif missing:
        state = "out-of-order"
    elif problem is not None:
        state = "unsupported"
    elif planned.version > latest:
        state = "ahead"
    elif pending:
        state = "pending"
    else:
        state = "up-to-date"
    return Status(
        lock.collection_name,
        control.exists,
        planned.version,
        latest,
        pending,
        state,
        view,
        problem,
        # Asked only without a control document, so an existing database pays nothing more.
        control.exists or await database_exists(db),
        tuple(missing),
    )


async def _out_of_order(
    lock: ControlLock, control: Control, known: list[Migration]
) -> list[Migration]:
    """Known migrations below ``control``'s version with no history record of being applied
    or skipped. Unlike a boot, always asks the history (the ledger may be missing or stale)."""
    found = await _survey(lock, control, known)
    return [m for m in known if found is not None and m.version in found.missing]


async def _survey(lock: ControlLock, control: Control, known: list[Migration]) -> Survey | None:
    """What the history says of ``known`` at ``control``'s version; ``None`` where a boot
    checks nothing either (no database yet, or one ahead of this build)."""
    versions = [m.version for m in known]
    if not control.exists or not versions or control.version > versions[-1]:
        return None
    return await lock.survey_history(control, versions)


async def _status_without_migrations(
    db: Any, lock: ControlLock, migrations: MigrationSource, problem: str
) -> Status:
    """The database's side of ``status`` when this build's migrations do not load: its
    version and lock as they are, the latest version from the file names if they can be
    read, nothing pending (a plan needs the modules), and the problem."""
    control = await lock.read()
    lease = await lock.lease_of(control)
    try:
        latest = catalog(migrations).latest
    except MigrationError:
        latest = 0
    return Status(
        lock.collection_name,
        control.exists,
        control.version,
        latest,
        (),
        "stuck" if control.stuck else "invalid",
        Lock.seen(control, lease),
        problem,
        control.exists or await database_exists(db),
    )


async def database_exists(db: Any) -> bool:
    """Whether ``db`` exists on its server: MongoDB creates a database with its first
    collection, so one without any is a name nothing has written to yet."""
    detect_driver(db)
    names = await db.list_collection_names(authorizedCollections=True)
    return bool(names)


async def plan(db: Any, migrations: MigrationSource, settings: Settings | None = None) -> Plan:
    """What ``migrate()`` would run from here (to ``settings.target``, or the rerun it
    names), without a lock or a write: refused as ``migrate()`` refuses migrations out of
    order (:class:`OutOfOrder`), or running them first if ``settings`` allows them."""
    settings = settings or Settings()
    known, lock = _prepare(db, migrations, settings)
    floor, release = floor_in_force(migrations, settings.floor, settings.floor_release)
    control = await lock.read()
    route = route_for(
        control,
        known,
        target=settings.target,
        floor=floor,
        rerun=settings.rerun,
        floor_release=release,
    )
    missing = await _out_of_order(lock, control, known)
    if missing and not settings.allow_out_of_order:
        raise OutOfOrder(
            missing={m.version: m.label() for m in missing}, db_version=control.version
        )
    return route.with_missing([m.version for m in missing]).plan(known)


async def unlock(
    db: Any,
    settings: Settings | None = None,
    *,
    force: bool = False,
    migrations: MigrationSource | None = None,
) -> Unlocked:
    """Unlock a stuck or abandoned lock. Refused without ``force`` while a live holder runs,
    and while it would let a migration that is not safe to repeat run again (stuck as
    interrupted, or its holder died inside it: ``migrations`` tells which are declared
    idempotent or transactional; without them, or if they do not load, none is).

    The step that did not finish stays recorded: an ``up`` resumes at the next boot; a
    ``down`` or ``rerun`` blocks every boot that would step over it until it is run again in
    its direction or the version is recorded by hand. Recorded in history as a manual action
    (and an ``interrupted`` record for a holder that died inside a migration unrecorded).
    """
    detect_driver(db)
    known = _known_if_loadable(migrations)
    done = await _lock(db, settings or Settings()).unlock(force=force, known=known)
    return Unlocked(
        done.changed,
        done.before,
        Lock.seen(done.before, done.lease, known),
        describe_lock(done.before, done.lease),
        done.recorded,
    )


async def set_version(
    db: Any,
    version: int,
    migrations: MigrationSource | None = None,
    settings: Settings | None = None,
    *,
    force: bool = False,
) -> Control:
    """Record that the database is at ``version`` (the documented skip); returns the document
    as it was. The lock is left as it is. Refused while a live holder runs migrations."""
    detect_driver(db)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidTarget(f"version must be a non-negative integer, got {version!r}")
    files = None
    if migrations is not None:
        resolve_target(version, load_migrations(migrations))
        files = catalog(migrations).versions
    done = await _lock(db, settings or Settings()).set_version(version, force=force, files=files)
    return done.before


async def validate(
    db: Any, migrations: MigrationSource, settings: Settings | None = None
) -> list[Drift]:
    """Read-only: applied migrations whose code changed or disappeared since they ran, and
    known migrations below the database's version that never ran (``out_of_order``)."""
    known, lock = _prepare(db, migrations, settings or Settings())
    control = await lock.read()
    drift = await find_drift(lock.history.collection, known, control.version)
    missing = await _out_of_order(lock, control, known)
    return drift + [Drift(m.version, m.name, "out_of_order", "", m.checksum) for m in missing]


async def repair(
    db: Any, migrations: MigrationSource, settings: Settings | None = None
) -> list[Drift]:
    """Accept the current code of applied migrations whose checksum changed (a comment, a
    reformat): one ``repair`` history record each, carrying the new checksum, which
    ``validate`` and ``migrate(validate=True)`` then compare with. Runs nothing; a migration
    whose file is missing is left reported. Returns the migrations it accepted.

    Also brings the control document's ledger up to date with the history, when nothing is
    out of order and no lock is held: a build that dropped old migration files then stops
    paying a history read at each boot."""
    known, lock = _prepare(db, migrations, settings or Settings())
    control = await lock.read()
    changed = [
        d
        for d in await find_drift(lock.history.collection, known, control.version)
        if d.problem == "changed"
    ]
    for drift in changed:
        note = (
            f"checksum accepted by an operator: {drift.recorded[:12]} (what ran) -> "
            f"{(drift.current or '')[:12]} (the code now)"
        )
        entry = Entry(
            drift.version, drift.name, "manual", action="repair", note=note, checksum=drift.current
        )
        await lock.history.record(entry)
    found = await _survey(lock, control, known)
    if found is not None and not found.missing and not control.locked:
        await lock.keep_ledger(control, found)
    return changed


async def skip(
    db: Any, migrations: MigrationSource, versions: list[int], settings: Settings | None = None
) -> list[int]:
    """Record known migrations below the database's version that never ran as skipped: their
    change is already in the database, or must never be made. No boot refuses them as out of
    order from then on; running their ``down`` asks first. Returns the versions recorded."""
    known, lock = _prepare(db, migrations, settings or Settings())
    control = await lock.read()
    files = [m.version for m in known]
    wanted = sorted(set(versions))
    unknown = [v for v in wanted if v not in files]
    if unknown:
        raise InvalidTarget(
            f"cannot skip {', '.join(map(str, unknown))}: not a migration of this build "
            f"(known: {files[0]}..{files[-1]})"
            if files
            else f"cannot skip {', '.join(map(str, unknown))}: this build has no migrations"
        )
    above = [v for v in wanted if v > control.version]
    if above:
        raise InvalidTarget(
            f"cannot skip {', '.join(map(str, above))}: above the database's version "
            f"{control.version}, so not due yet; `bootmigrate set-version N` skips migrations "
            "ahead of the database"
        )
    done = sorted(set(wanted) & (await lock.history.in_effect(0, control.version)).done)
    if done:
        raise InvalidTarget(
            f"cannot skip {', '.join(map(str, sorted(done)))}: already applied or skipped "
            "(`bootmigrate history` shows when)"
        )
    await lock.skip(control, wanted, files)
    return wanted


async def skipped(db: Any, versions: list[int], settings: Settings | None = None) -> list[int]:
    """Which of ``versions`` were last recorded as skipped (by ``set-version``, ``skip``, a
    version set by hand or a fresh database) rather than run: their ``down`` would undo what
    was never done."""
    detect_driver(db)
    return sorted(await _lock(db, settings or Settings()).history.skipped(versions))


async def history(
    db: Any, settings: Settings | None = None, *, limit: int = 20
) -> list[dict[str, Any]]:
    """The newest ``limit`` history records, newest first."""
    detect_driver(db)
    settings = settings or Settings()
    # ObjectIds from different processes do not order within a second; finish times do.
    cursor = db[settings.history_name].find(
        {}, {"_id": 0}, sort=[("finished_at", -1), ("_id", -1)], limit=limit
    )
    records: list[dict[str, Any]] = await cursor.to_list(None)
    return records


_FILE_VERSION = re.compile(r"^(\d+)_\w+\.py$")


def new_migration(directory: str | Path, name: str) -> Path:
    """Write the next migration file from the template: next free version, zero-padded."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise InvalidMigrations(f"{str(folder)!r} is a file, not a migrations directory")
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    if not slug:
        raise InvalidMigrations(f"cannot make a file name out of {name!r}; use letters or digits")
    found = [m for m in (_FILE_VERSION.match(p.name) for p in folder.glob("*.py")) if m]
    version = max((int(m[1]) for m in found), default=0) + 1
    width = max([4, *(len(m[1]) for m in found)])
    path = folder / f"{version:0{width}d}_{slug}.py"
    path.write_text(_TEMPLATE.format(title=name.strip().rstrip(".").capitalize()))
    return path


_TEMPLATE = '''"""{title}."""

from typing import Any

from bootmigrate import MigrationContext

# True only if running `up` twice is harmless: a replica that takes over from one that
# crashed inside this migration may then run it again. Otherwise the lock is left stuck.
idempotent = False


async def up(db: Any, ctx: MigrationContext) -> None:
    raise NotImplementedError("write this migration")


async def down(db: Any, ctx: MigrationContext) -> None:
    raise NotImplementedError("write the way back, or delete this function")
'''

_PACKAGE_INIT = '''"""The service's migrations, a file each: `bootmigrate new "what it does"`."""

# The oldest database version this release upgrades from, once old migrations are removed:
# FLOOR = 0
'''


def init_project(root: Path, migrations: str, db: str | None) -> list[str]:
    """Create ``migrations`` (with an ``__init__.py``) and a ``[tool.bootmigrate]`` section
    in the project's pyproject.toml (the nearest at or above ``root``; created in ``root`` if
    there is none); refused if the section is already there. Returns what it did, a line
    each."""
    # The project's root: the nearest pyproject.toml up from here, or here if there is none.
    root = next((d for d in (root, *root.parents) if (d / "pyproject.toml").is_file()), root)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text() if pyproject.exists() else ""
    if re.search(r"^\[tool\.bootmigrate\]", text, re.MULTILINE):
        raise ConfigError(f"{pyproject} already has a [tool.bootmigrate] section; edit it there")
    done = []
    folder = root / migrations
    if not folder.is_dir():
        folder.mkdir(parents=True)
        done.append(f"created {folder}/")
    init = folder / "__init__.py"
    if not init.exists():
        init.write_text(_PACKAGE_INIT)
        done.append(f"created {init}")
    section = f'\n[tool.bootmigrate]\nmigrations = "{migrations}"\n'
    if db:
        section += f'db = "{db}"\n'
    section += '# collection = "migrations"\n# wait-timeout = 300\n# lease = 30\n'
    pyproject.write_text(text + ("\n" if text and not text.endswith("\n") else "") + section)
    done.append(f"{'added' if text else 'created'} [tool.bootmigrate] in {pyproject}")
    done.append('next: `bootmigrate new "first migration"`, then `bootmigrate status`')
    return done


def _known_if_loadable(migrations: MigrationSource | None) -> dict[int, Migration] | None:
    """The migrations by version, or ``None`` if none were given or they do not load (an
    unlock must still work then; it just cannot tell a migration safe to repeat)."""
    if migrations is None:
        return None
    try:
        return {m.version: m for m in load_migrations(migrations)}
    except MigrationError:
        return None


def _on_expiry(
    control: Control, lease: Lease, known: Mapping[int, Migration] | None, finished: bool
) -> str | None:
    """What the next boot does with a held lock whose lease has expired."""
    if control.stuck or not lease.expired:
        return None
    unfinished = control.unfinished_step
    if finished and unfinished is not None:
        return (
            f"its holder died after {step_label(unfinished)} finished (history records it "
            "applied) and before recording its version: the next boot with migrations to run "
            f"takes it over at version {unfinished.get('to_version')}; `bootmigrate unlock` "
            "records that version and frees it now"
        )
    if unfinished is None:
        return (
            "the next boot with migrations to run takes it over once it has watched it silent "
            "for the lease (up-to-date boots leave it alone); `bootmigrate unlock` frees it now"
        )
    version = unfinished.get("version") or 0
    migration = (known or {}).get(version)
    label = step_label(unfinished)
    repeatable = migration is not None and migration.safe_to_repeat(unfinished.get("direction"))
    if control.running is not None and not repeatable:
        return (
            f"the next boot that needs the lock marks {label} interrupted, since it is not "
            "declared safe to run again; `unlock` needs --force"
        )
    return f"only a run that finishes {label} first takes it over"


def _prepare(
    db: Any, migrations: MigrationSource, settings: Settings
) -> tuple[list[Migration], ControlLock]:
    detect_driver(db)
    return load_migrations(migrations), _lock(db, settings)


def _lock(db: Any, settings: Settings) -> ControlLock:
    """The lock as an operator's process uses it: it never holds it, so its owner is only
    named in the history records of what the operator did."""
    return ControlLock(
        db,
        collection=settings.collection,
        history=settings.history_name,
        owner=Owner.this_process(settings.build, settings.lease),
        waiting=settings.waiting,
    )


def _step_json(step: Step) -> dict[str, Any]:
    return {**step.running(), "description": step.migration.description}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return _iso(value)
    return value
