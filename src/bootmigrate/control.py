"""The control document's shape: parsing and validating it, and the values it holds.

One document, ``{"_id": "control", "locked": false, "version": 19}``, as Rocket.Chat writes
it, plus fields of our own while a lock is held:

- ``token`` and ``acquisition``: the first incremented by every acquisition, the second a
  random id drawn by it; every holder write is conditional on both, so a holder that lost its
  lock cannot change anything (fencing), even if a failover rolled back an acquire and handed
  the same token number to another process.
- ``beats`` and ``heartbeat``: a counter and the server's clock, refreshed by the holder.
  A waiter takes over only with a compare-and-swap on ``token`` and ``beats``, so a holder
  that beat in the meantime keeps its lock.
- ``owner`` (host, pid, build, lease, id), ``locked_at``: who holds it, since when.
- ``running``: the migration in progress; ``failure``: why the lock is stuck.
- ``applied``: the ledger of applied or skipped versions (``ledger.py``), written with
  ``version`` so that the two always agree.
- ``unfinished``: the step (migration, direction, versions) that started and has not
  completed. Written with ``running``, removed only when that step completes or an operator
  records the version by hand; so it outlives a failure, a kill, a release and an unlock,
  and no later call steps over a half-run ``down`` or ``rerun`` (see :func:`unfinished_step`).

What is done with it (acquire, heartbeat, take over, release...) is ``lock.py``'s.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from .drivers import as_naive_utc
from .errors import InvalidControlDocument
from .ledger import LEDGER_FIELDS, Ledger, read_ledger

CONTROL_ID = "control"
HELD_FIELDS = ("owner", "locked_at", "heartbeat", "beats", "running", "failure", "acquisition")


@dataclass(frozen=True)
class Owner:
    """This process as a lock holder: enough for an operator to find it, and a unique id
    so that it recognises its own lock if an acquire's reply was lost."""

    host: str
    pid: int
    build: str | None
    lease: float
    id: str

    @classmethod
    def this_process(cls, build: str | None, lease: float) -> Owner:
        """This process, with a fresh id; ``build`` defaults to ``BOOTMIGRATE_BUILD``."""
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            build=build if build is not None else os.environ.get("BOOTMIGRATE_BUILD"),
            lease=lease,
            id=uuid.uuid4().hex,
        )

    def as_document(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "build": self.build,
            "lease": self.lease,
            "id": self.id,
        }


@dataclass(frozen=True)
class Control:
    """A validated reading of the control document (``exists=False``: no document yet)."""

    exists: bool
    locked: bool = False
    version: int = 0
    token: int = 0
    beats: int = 0
    heartbeat: datetime | None = None
    locked_at: datetime | None = None
    owner: dict[str, Any] | None = None
    running: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    acquisition: str | None = None
    unfinished: dict[str, Any] | None = None
    ledger: Ledger | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def stuck(self) -> bool:
        """Locked after a failure or an interruption: only an operator unlocks it."""
        return self.locked and self.failure is not None

    @property
    def unfinished_step(self) -> dict[str, Any] | None:
        """The step that started and never completed, while the database is still at the
        version it started from; ``None`` if there is none (or an operator has since recorded
        the version by hand).

        ``unfinished`` says it; a document without that field (written by hand, or before
        bootmigrate kept it) is read from its ``running`` or ``failure`` instead. An operator's
        ``set-version`` stores ``unfinished: null``, which means "none", not "not kept".
        """
        kept = "unfinished" in self.raw
        marker = self.unfinished if kept else self.running or self.failure
        if not marker or not _still_from(marker, self.version):
            return None
        return marker

    def with_step_finished(self) -> Control:
        """This reading as it stands once its unfinished step is known to have finished (its
        history records it applied): at the step's ``to_version``, with no step named."""
        step = self.unfinished_step
        if step is None:
            return self
        version = int(step["to_version"])
        raw = {k: v for k, v in self.raw.items() if k not in ("running", "unfinished")}
        ledger = self.ledger_after(step)
        if ledger is not None:
            raw["applied"] = ledger.as_document()
        return replace(self, version=version, running=None, unfinished=None, ledger=ledger, raw=raw)

    def ledger_after(self, step: dict[str, Any]) -> Ledger | None:
        """The ledger once ``step`` (as ``unfinished`` names it) has finished; ``None`` for a
        document that keeps none."""
        if self.ledger is None:
            return None
        return self.ledger.after_move(
            int(step["version"]), step.get("direction"), int(step["to_version"])
        )

    @property
    def recorded_lease(self) -> float | None:
        """The lease its holder promised to beat within, if it recorded one."""
        lease = (self.owner or {}).get("lease")
        return float(lease) if lease else None

    def describe_owner(self) -> str:
        """The lock holder, as an operator would want it named."""
        if not self.owner:
            return "an unknown process (a lock set by Rocket.Chat or by hand records no owner)"
        build = f", build {self.owner.get('build')}" if self.owner.get("build") else ""
        return f"{self.owner.get('host')} (pid {self.owner.get('pid')}{build})"


def parse_control(doc: dict[str, Any] | None, collection_name: str) -> Control:
    """Validate a raw control document; refuse, rather than guess at, a malformed one."""
    if doc is None:
        return Control(exists=False)

    def bad(problem: str, fix: str) -> InvalidControlDocument:
        return InvalidControlDocument(
            collection=collection_name, problem=problem, fix=fix, document=doc
        )

    locked = doc.get("locked")
    if not isinstance(locked, bool):
        raise bad(
            f"`locked` must be true or false, got {locked!r}",
            f'Fix it with: db.{collection_name}.updateOne({{_id: "control"}}, '
            "{$set: {locked: false}}) once no migration is running.",
        )
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise bad(
            f"`version` must be a non-negative integer, got {version!r}",
            f"Set the version the database is really at: db.{collection_name}.updateOne("
            '{_id: "control"}, {$set: {version: NumberInt(N)}}) (the legacy mongo shell '
            "stores a bare number as a double).",
        )
    ints = {}
    for name in ("token", "beats"):
        value = doc.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(
                f"`{name}` must be an integer, got {value!r}",
                f'Remove the field: db.{collection_name}.updateOne({{_id: "control"}}, '
                f"{{$unset: {{{name}: 1}}}}).",
            )
        ints[name] = value
    dates = {}
    for name in ("heartbeat", "locked_at"):
        value = doc.get(name)
        if value is not None and not isinstance(value, datetime):
            raise bad(
                f"`{name}` must be a date, got {value!r}",
                f'Remove the field: db.{collection_name}.updateOne({{_id: "control"}}, '
                f"{{$unset: {{{name}: 1}}}}).",
            )
        dates[name] = as_naive_utc(value) if value is not None else None
    subdocs = {}
    for name in ("owner", "running", "failure", "unfinished", "applied"):
        value = doc.get(name)
        if value is not None and not isinstance(value, dict):
            raise bad(
                f"`{name}` must be a sub-document, got {value!r}",
                f'Remove the field: db.{collection_name}.updateOne({{_id: "control"}}, '
                f"{{$unset: {{{name}: 1}}}}).",
            )
        subdocs[name] = value
    _check_subdocuments(subdocs, bad, collection_name)
    acquisition = doc.get("acquisition")
    if acquisition is not None and not isinstance(acquisition, str):
        raise bad(
            f"`acquisition` must be a string, got {acquisition!r}",
            f"Remove the field once no migration is running: db.{collection_name}.updateOne("
            '{_id: "control"}, {$unset: {acquisition: 1}}).',
        )
    return Control(
        exists=True,
        locked=locked,
        version=version,
        token=ints["token"],
        beats=ints["beats"],
        heartbeat=dates["heartbeat"],
        locked_at=dates["locked_at"],
        owner=subdocs["owner"],
        running=subdocs["running"],
        failure=subdocs["failure"],
        acquisition=acquisition,
        unfinished=subdocs["unfinished"],
        ledger=read_ledger(subdocs["applied"]),
        raw=dict(doc),
    )


def _check_subdocuments(
    subdocs: dict[str, Any],
    bad: Callable[[str, str], InvalidControlDocument],
    collection_name: str,
) -> None:
    """The fields of ``owner``, ``running`` and ``failure`` that decisions read: a lease is a
    positive number of seconds, a migration's version an integer."""
    lease = (subdocs["owner"] or {}).get("lease")
    if lease is not None and not _positive_number(lease):
        raise bad(
            f"`owner.lease` must be a positive number of seconds, got {lease!r}",
            f'Remove it: db.{collection_name}.updateOne({{_id: "control"}}, '
            '{$unset: {"owner.lease": 1}}); the lock then has no lease, so it is never taken '
            "over, and is unlocked with `bootmigrate unlock` once its holder is gone.",
        )
    running = subdocs["running"]
    if running is not None and not _integer(running.get("version")):
        raise bad(
            f"`running.version` must be the integer version of the migration in progress, "
            f"got {running.get('version')!r}",
            f'Name the migration in progress: db.{collection_name}.updateOne({{_id: "control"}}, '
            '{$set: {"running.version": NumberInt(N)}}); unset `running` only if that '
            "migration certainly did not start (a lock without it counts as held between two).",
        )
    version = (subdocs["failure"] or {}).get("version")
    if version is not None and not _integer(version):
        raise bad(
            f"`failure.version` must be the integer version of the migration that failed, got "
            f"{version!r}",
            f'Set it: db.{collection_name}.updateOne({{_id: "control"}}, '
            '{$set: {"failure.version": NumberInt(N)}}); or, once the cause is fixed, unlock '
            f'by hand: db.{collection_name}.updateOne({{_id: "control"}}, '
            "{$set: {locked: false}, $unset: {failure: 1}}).",
        )
    applied = subdocs["applied"]
    if applied is not None:
        wrong = [name for name in LEDGER_FIELDS if not _integer(applied.get(name))]
        if wrong:
            raise bad(
                f"`applied` (the ledger of applied migrations) must hold the integers "
                f"{', '.join(LEDGER_FIELDS)}; {', '.join(wrong)} "
                f"{'is' if len(wrong) == 1 else 'are'} not",
                f'Remove it: db.{collection_name}.updateOne({{_id: "control"}}, '
                "{$unset: {applied: 1}}); the next boot rebuilds it from the history, taking "
                "any known migration at or below `version` with no history record as applied.",
            )


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _still_from(step: dict[str, Any], version: int) -> bool:
    """Whether the database is still at the version ``step`` started from. A step recorded
    without it (by hand, or by an older bootmigrate) is judged by its direction: an ``up`` of
    N starts below N, a ``down`` of N at N, and a ``rerun`` leaves the version alone."""
    start = step.get("from_version")
    if isinstance(start, int) and not isinstance(start, bool):
        return start == version
    number = step.get("version")
    if not isinstance(number, int):
        return True
    direction = step.get("direction") or "up"
    if direction == "up":
        return version < number
    if direction == "down":
        return version == number
    return True


def step_label(step: dict[str, Any]) -> str:
    """A recorded step as an operator reads it: ``migration 2 step_2 (down)``."""
    name = f" {step['name']}" if step.get("name") else ""
    return f"migration {step.get('version')}{name} ({step.get('direction') or 'up'})"


def utc_now() -> datetime:
    """Wall-clock time for records people read; leases never use it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def failure_record(
    kind: str, running: dict[str, Any], who: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """The ``failure`` sub-document that makes a lock stuck: what, where, when, why."""
    return {
        "kind": kind,
        "version": running.get("version"),
        "name": running.get("name"),
        "direction": running.get("direction"),
        "from_version": running.get("from_version"),
        "to_version": running.get("to_version"),
        "host": who.get("host"),
        "pid": who.get("pid"),
        "build": who.get("build"),
        "at": utc_now(),
        **fields,
    }
