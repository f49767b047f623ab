"""What operators call: status, plan, unlock, set-version, history, new.

The CLI is a thin shell around these; each one is also a library call. Applying migrations
(``up``, ``down``, ``rerun``) is :func:`bootmigrate.migrate` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from .checksums import Drift, find_drift
from .control import Control, ControlStore, Owner
from .drivers import detect_driver, majority_collection, server_time
from .errors import ControlLocked, InvalidMigrations, InvalidTarget, MigrationError
from .history import History
from .migrations import Migration, MigrationSource, floor_in_force, load_migrations
from .plan import Plan, Step, Target, latest_version, plan_for, resolve_target

State = Literal["up-to-date", "pending", "locked", "stuck", "ahead", "unsupported"]


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

    @property
    def lease_expired(self) -> bool | None:
        """Whether a waiting replica would take this lock over (``None``: no lease)."""
        if self.heartbeat_age is None or self.lease is None:
            return None
        return self.heartbeat_age > self.lease

    @property
    def live(self) -> bool:
        """Held by a holder whose lease is still valid: not to be touched."""
        return self.locked and self.failure is None and self.lease_expired is False


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

    def as_json(self) -> dict[str, Any]:
        """The ``status --json`` schema (see docs/operations.md)."""
        lock = self.lock
        return {
            "collection": self.collection,
            "exists": self.exists,
            "version": self.version,
            "latest": self.latest,
            "state": self.state,
            "pending": [_step_json(step) for step in self.pending],
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
            },
        }


@dataclass(frozen=True)
class Unlocked:
    """What ``unlock`` found and changed."""

    changed: bool
    before: Control
    lock: Lock


async def status(db: Any, migrations: MigrationSource, *, collection: str = "migrations") -> Status:
    """Read-only: the control document, the plan to latest, and the lock's health."""
    known, store = _prepare(db, migrations, collection)
    control = await store.read()
    lock = await _lock_of(db, control)
    latest = latest_version(known)
    pending: tuple[Step, ...] = ()
    problem = None
    try:
        floor, release = floor_in_force(migrations)
        pending = plan_for(control, known, floor=floor, floor_release=release).steps
    except MigrationError as exc:
        problem = str(exc)
    state: State
    if control.stuck:
        state = "stuck"
    elif control.locked:
        state = "locked"
    elif problem is not None:
        state = "unsupported"
    elif control.version > latest:
        state = "ahead"
    elif pending:
        state = "pending"
    else:
        state = "up-to-date"
    return Status(
        store.name, control.exists, control.version, latest, pending, state, lock, problem
    )


async def plan(
    db: Any,
    migrations: MigrationSource,
    *,
    target: Target = "latest",
    collection: str = "migrations",
    floor: int | None = None,
) -> Plan:
    """What ``migrate()`` would run from here, without a lock or a write."""
    known, store = _prepare(db, migrations, collection)
    floor, release = floor_in_force(migrations, floor)
    return plan_for(await store.read(), known, target=target, floor=floor, floor_release=release)


async def unlock(db: Any, *, collection: str = "migrations", force: bool = False) -> Unlocked:
    """Unlock a stuck or abandoned lock; refuse a live holder's unless ``force``.

    The next boot resumes at the version recorded, re-running the failed or interrupted
    migration. Recorded in history as a manual action.
    """
    detect_driver(db)
    store = ControlStore(majority_collection(db, collection))
    control = await store.read()
    lock = await _lock_of(db, control)
    if not control.locked:
        return Unlocked(False, control, lock)
    if lock.live and not force:
        raise ControlLocked(
            f"refusing to unlock: {control.holder()} is alive and holds the lock (heartbeat "
            f"{lock.heartbeat_age:.1f} s ago, lease {lock.lease:g} s)"
            f"{_running_text(lock.running)}. Wait for it to finish, or force the unlock "
            "(--force) only if you know that process is gone.",
            control=control.raw,
        )
    if not await store.unlock(control):
        raise ControlLocked(
            "the control document changed while unlocking (another process acted on it); "
            "run status and try again",
            control=control.raw,
        )
    failure = control.failure or {}
    await _history(db, collection).record(
        version=control.version,
        name=str(failure.get("name") or ""),
        direction=None,
        outcome="manual",
        action="unlock",
        note=f"unlocked by an operator; was {describe_lock(control, lock)}",
    )
    return Unlocked(True, control, lock)


async def set_version(
    db: Any,
    version: int,
    migrations: MigrationSource | None = None,
    *,
    collection: str = "migrations",
    force: bool = False,
) -> Control:
    """Record that the database is at ``version`` (the documented skip); returns the document
    as it was. The lock is left as it is. Refused while a live holder runs migrations."""
    detect_driver(db)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidTarget(f"version must be a non-negative integer, got {version!r}")
    if migrations is not None:
        resolve_target(version, load_migrations(migrations))
    store = ControlStore(majority_collection(db, collection))
    control = await store.read()
    lock = await _lock_of(db, control)
    if lock.live and not force:
        raise ControlLocked(
            f"refusing to set the version: {control.holder()} is alive and running migrations"
            f"{_running_text(lock.running)}. Wait for it, or use --force if it is gone.",
            control=control.raw,
        )
    if not await store.set_version(control, version):
        raise ControlLocked(
            "the control document changed while setting the version (another process acted "
            "on it); run status and try again",
            control=control.raw,
        )
    await _history(db, collection).record(
        version=version,
        name="",
        direction=None,
        outcome="manual",
        action="set-version",
        note=f"version set by an operator from {control.version} to {version}",
    )
    return control


async def validate(
    db: Any, migrations: MigrationSource, *, collection: str = "migrations"
) -> list[Drift]:
    """Read-only: applied migrations whose code changed or disappeared since they ran."""
    known, store = _prepare(db, migrations, collection)
    control = await store.read()
    return await find_drift(db[f"{collection}_history"], known, control.version)


async def history(
    db: Any, *, collection: str = "migrations", limit: int = 20
) -> list[dict[str, Any]]:
    """The newest ``limit`` history records, newest first."""
    detect_driver(db)
    # ObjectIds from different processes do not order within a second; finish times do.
    cursor = db[f"{collection}_history"].find(
        {}, {"_id": 0}, sort=[("finished_at", -1), ("_id", -1)], limit=limit
    )
    records: list[dict[str, Any]] = await cursor.to_list(None)
    return records


_FILE_VERSION = re.compile(r"^(\d+)_\w+\.py$")


def new_migration(directory: str | Path, name: str) -> Path:
    """Write the next migration file from the template: next free version, zero-padded."""
    folder = Path(directory)
    if not folder.is_dir():
        raise InvalidMigrations(
            f"migrations directory {str(folder)!r} does not exist; create it or pass --migrations"
        )
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

# True only if running `up` twice is harmless: a replica that takes over from one that
# crashed inside this migration may then run it again. Otherwise the lock is left stuck.
idempotent = False


async def up(db, ctx):
    raise NotImplementedError("write this migration")


async def down(db, ctx):
    raise NotImplementedError("write the way back, or delete this function")
'''


def _prepare(
    db: Any, migrations: MigrationSource, collection: str
) -> tuple[list[Migration], ControlStore]:
    detect_driver(db)
    return load_migrations(migrations), ControlStore(majority_collection(db, collection))


def _history(db: Any, collection: str) -> History:
    return History(majority_collection(db, f"{collection}_history"), Owner.this_process(None, 0.0))


async def _lock_of(db: Any, control: Control) -> Lock:
    if not control.locked:
        return Lock(locked=False)
    age = None
    if control.heartbeat is not None:
        age = (await server_time(db) - control.heartbeat).total_seconds()
    owner = control.owner or None
    lease = float(owner["lease"]) if owner and owner.get("lease") else None
    return Lock(
        locked=True,
        holder=owner,
        since=control.locked_at,
        heartbeat_age=age,
        lease=lease,
        running=control.running,
        failure=control.failure,
    )


def describe_lock(control: Control, lock: Lock) -> str:
    """How a lock looked, in a few words, for what ``unlock`` reports it changed."""
    if lock.failure:
        kind = lock.failure.get("kind", "failed")
        return f"stuck at version {control.version}: migration {lock.failure.get('version')} {kind}"
    if lock.lease_expired:
        return f"held by {control.holder()} whose lease had expired"
    if lock.lease is None:
        return f"locked at version {control.version} with no owner recorded"
    return f"held by {control.holder()} (forced)"


def _running_text(running: dict[str, Any] | None) -> str:
    return f", running migration {running.get('version')}" if running else ""


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
