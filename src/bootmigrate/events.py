"""Typed events: one per step of the protocol, each handed to the ``on_event`` hooks and
logged on the ``bootmigrate`` logger with ``event`` (its name) among the record's fields.

    def on_event(event: Event) -> None:
        match event:
            case Event(name="migration_applied", migration_version=v, duration_s=float(s)):
                print(f"migration {v} took {s:.1f} s")

One class for every event, told apart by ``name`` (a ``Literal``): hooks that forward
events (metrics, tracing, a log shipper) treat them alike, and mypy checks the names a hook
compares with. Which fields each event sets is in docs/events.md; the others are ``None``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypedDict, get_args

from .logs import log_record

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("bootmigrate")

EventName = Literal[
    # the call
    "started",
    "done",
    "failed",
    "cancelled",
    # what a reading decides
    "up_to_date",
    "database_ahead",
    "fresh_skipped",
    "unreachable",
    "waiting",
    "lease_too_long",
    "acquire_missed",
    "wait_done",
    "rerun_already_done",
    "rerun_left_to_migrator",
    "out_of_order",
    "ledger_updated",
    # the lock
    "server_detected",
    "server_warning",
    "retry_declined",
    "failed_retried",
    "took_over",
    "marked_interrupted",
    "acquired",
    "heartbeat_failed",
    "lock_lost",
    "released",
    # the migrations
    "migration_started",
    "migration_applied",
    "migration_failed",
    "interrupted",
    "transaction_retried",
    "commit_confirmed",
    "migrations_done",
    "stop_requested",
    # an operator's unlock or set-version
    "watching_holder",
]

EVENT_NAMES: tuple[EventName, ...] = get_args(EventName)


@dataclass(frozen=True)
class Event:
    """One step of one ``migrate()`` call.

    ``name`` says which step; ``call_id`` which call (the ``owner.id`` it records on the
    lock, so a waiter's ``holder["id"]`` names the holder's call); ``message`` is the log
    line; ``level`` its logging level. The other fields are set by the events they belong to
    (docs/events.md has the table) and ``None`` elsewhere.
    """

    name: EventName
    call_id: str
    message: str
    level: int
    db_version: int | None = None
    target_version: int | None = None
    from_version: int | None = None
    migration_version: int | None = None
    migration_name: str | None = None
    direction: str | None = None
    duration_s: float | None = None
    waited_s: float | None = None
    holder: Mapping[str, Any] | None = None
    token: int | None = None
    running: Mapping[str, Any] | None = None
    locked_since: datetime | None = None
    applied: tuple[int, ...] | None = None
    reverted: tuple[int, ...] | None = None
    held: bool | None = None
    stuck: bool | None = None
    error: str | None = None
    error_type: str | None = None
    reason: str | None = None
    build: str | None = None
    done_by: str | None = None
    done_at: datetime | None = None
    silent_s: float | None = None
    lease_s: float | None = None
    attempt: int | None = None
    server_kind: str | None = None
    server_name: str | None = None
    server_version: str | None = None
    topology: str | None = None
    shutdown_grace_s: float | None = None

    @property
    def levelname(self) -> str:
        """``"INFO"``, ``"WARNING"``...: the level as logging names it."""
        return logging.getLevelName(self.level)

    def fields(self) -> dict[str, Any]:
        """The fields this event sets (those that are not ``None``), besides its name, call
        id, message and level: what its log record carries."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in _HEADER and getattr(self, f.name) is not None
        }


_HEADER = frozenset({"name", "call_id", "message", "level"})


class EventFields(TypedDict, total=False):
    """The optional fields of :class:`Event`, for :meth:`Emitter.emit`'s keywords (``None``:
    not set)."""

    db_version: int | None
    target_version: int | None
    from_version: int | None
    migration_version: int | None
    migration_name: str | None
    direction: str | None
    duration_s: float | None
    waited_s: float | None
    holder: Mapping[str, Any] | None
    token: int | None
    running: Mapping[str, Any] | None
    locked_since: datetime | None
    applied: tuple[int, ...] | None
    reverted: tuple[int, ...] | None
    held: bool | None
    stuck: bool | None
    error: str | None
    error_type: str | None
    reason: str | None
    build: str | None
    done_by: str | None
    done_at: datetime | None
    silent_s: float | None
    lease_s: float | None
    attempt: int | None
    server_kind: str | None
    server_name: str | None
    server_version: str | None
    topology: str | None
    shutdown_grace_s: float | None


class StepFields(TypedDict):
    """The fields that name a migration step in its events."""

    migration_version: int
    migration_name: str
    direction: str


Hook = Callable[[Event], object]
"""An ``on_event`` hook: called with each event, synchronously, in the call's task."""


def as_hooks(value: object) -> tuple[Hook, ...]:
    """``on_event`` as a tuple of hooks: one callable, a sequence of them, or ``None``;
    anything else is refused with ``ValueError`` naming the option."""
    if value is None:
        return ()
    if callable(value):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        hooks = tuple(value)
        if all(callable(h) for h in hooks):
            return hooks
    raise ValueError(
        f"on_event must be a callable taking an Event, or a sequence of them, got {value!r}"
    )


class Emitter:
    """Where one call's events go: its hooks, then the ``bootmigrate`` logger.

    A hook that raises is logged once per call (with its traceback) and otherwise ignored:
    observing the protocol never changes it. Hooks run synchronously in the task that
    emits, so they must be quick (a metric, a span, a queue put)."""

    def __init__(self, call_id: str, hooks: Sequence[Hook] = ()) -> None:
        self.call_id = call_id
        self.hooks = tuple(hooks)
        self._broken: set[int] = set()
        self.left_stuck = False  # an event of this call left the lock stuck
        self._waiting_since: float | None = None
        self._waited: float | None = None

    @classmethod
    def new(cls) -> Emitter:
        """An emitter with no hooks, for work outside a ``migrate()`` call (the operator's
        commands): its events are log records only."""
        return cls(uuid.uuid4().hex)

    def waited(self) -> float:
        """Seconds this call spent waiting for another process's lock: as an event reported
        it once the wait ended, else since the ``waiting`` event (0 without one)."""
        if self._waited is not None:
            return self._waited
        if self._waiting_since is None:
            return 0.0
        return time.monotonic() - self._waiting_since

    def emit(
        self,
        name: EventName,
        template: str,
        *args: object,
        level: int = logging.INFO,
        **values: Unpack[EventFields],
    ) -> Event:
        """Emit event ``name``: ``template % args`` is its message (and log line)."""
        message = template % args if args else template
        event = Event(name, self.call_id, message, level, **values)
        if event.stuck:
            self.left_stuck = True
        if name == "waiting" and self._waiting_since is None:
            self._waiting_since = time.monotonic()
        if event.waited_s is not None:
            self._waited = event.waited_s
        for hook in self.hooks:
            self._call(hook, event)
        extra = {"event": name, "call_id": self.call_id, **event.fields()}
        # The record names the function that emitted, not this one.
        log_record(log, level, template, args, extra, stacklevel=2)
        return event

    def _call(self, hook: Hook, event: Event) -> None:
        try:
            hook(event)
        except Exception:
            if id(hook) in self._broken:
                return
            self._broken.add(id(hook))
            log.warning(
                "on_event hook %r raised on event %r; ignored (logged once per call)",
                hook,
                event.name,
                exc_info=True,
                extra={"event": "hook_failed", "call_id": self.call_id, "hook_event": event.name},
            )
