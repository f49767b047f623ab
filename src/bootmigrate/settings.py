"""Every option of a ``migrate()`` call, in one frozen object validated once.

``migrate()`` builds one from its keywords; the integrations build one when the app is
created (so a misspelt or wrong option fails there, not at boot); the CLI builds one from its
flags and environment. Each one is checked when it is made (or updated), and the code that
reads it trusts it.

A bad value raises ``ValueError`` naming the option (``InvalidTarget``, also a
``ValueError``, for a target or rerun version), whether its type or its value is wrong, as
``migrate()`` always has; an unknown option name raises ``TypeError``, as an unknown keyword
argument does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .errors import InvalidTarget
from .events import Hook, as_hooks
from .plan import Target
from .waiting import WaitPolicy

Fresh = Literal["run", "skip"]
OnAhead = Literal["warn", "error"]


@dataclass(frozen=True)
class Settings:
    """How ``migrate()`` behaves: where the lock lives, how long to wait, what to run.

    ``target``: ``"latest"`` or a version (lower than the database's: run ``down`` steps).
    ``collection``: the control document's collection; ``history_collection``: the history's
    (default ``<collection>_history``). ``build``: this build's name, recorded with the lock
    (default: env ``BOOTMIGRATE_BUILD``). ``wait_timeout``: seconds to wait for another
    process's lock or for the server. ``lease``: seconds a holder may go without a heartbeat
    before it is presumed dead. ``fresh``: on a database with no control document, ``"run"``
    every migration or ``"skip"`` to latest. ``on_ahead``: a database newer than this build
    ``"warn"``s and boots, or ``"error"`` refuses. ``floor``/``floor_release``: the oldest
    version this build upgrades from, and the release to pass through below it (default:
    ``FLOOR``/``FLOOR_RELEASE`` in the migrations package). ``rerun``: run that applied
    migration's ``up`` again. ``max_poll_interval``: the longest sleep between two looks at
    a held lock. ``stream_idle_wait``: how long the server holds a waiter's idle change-stream
    read. ``max_write_retry_interval``: the longest pause between a holder's retries of a
    write that lost its connection (it retries for at most one lease). Those two follow
    ``max_poll_interval`` unless given.
    ``migration_timeout``: seconds each migration may run (a module's ``timeout`` wins).
    ``shutdown_grace``: once the call is cancelled (SIGTERM), seconds a migration already
    running may go on to finish; past it, it is cancelled and recorded (``0``: at once).
    Waiting and the time between migrations end at once, whatever this says.
    ``apply``: ``False`` makes a wait-only call, which never takes the lock and never writes:
    it waits until another process (a Job, a release hook) brought the database to
    ``target``, and fails fast on a stuck lock.
    ``validate``: refuse to run if an applied migration's code changed.
    ``allow_out_of_order``: run known migrations below the database's version that were never
    applied (merged after a higher one ran) once, first, instead of refusing to boot.
    ``retry_failed_on_new_build``: a different build may retry a migration that failed.
    ``on_event``: a callable taking each :class:`~bootmigrate.events.Event` of the call, or a
    sequence of them (kept as a tuple); called synchronously, and one that raises is logged
    and ignored.
    """

    target: Target = "latest"
    collection: str = "migrations"
    history_collection: str | None = None
    build: str | None = None
    wait_timeout: float = 300.0
    lease: float = 30.0
    fresh: Fresh = "run"
    on_ahead: OnAhead = "warn"
    floor: int | None = None
    floor_release: str | None = None
    rerun: int | None = None
    max_poll_interval: float = 2.0
    stream_idle_wait: float | None = None
    max_write_retry_interval: float | None = None
    migration_timeout: float | None = None
    # Below Kubernetes' default 30 s between SIGTERM and SIGKILL, with room to record the end.
    shutdown_grace: float = 20.0
    validate: bool = False
    retry_failed_on_new_build: bool = False
    allow_out_of_order: bool = False
    apply: bool = True
    on_event: Hook | Sequence[Hook] | None = None

    def __post_init__(self) -> None:
        for name in ("wait_timeout", "lease", "max_poll_interval"):
            _seconds(name, getattr(self, name))
        for name in ("stream_idle_wait", "max_write_retry_interval", "migration_timeout"):
            if getattr(self, name) is not None:
                _seconds(name, getattr(self, name))
        _seconds("shutdown_grace", self.shutdown_grace, zero=True)
        _target(self.target)
        _choice("fresh", self.fresh, ("run", "skip"))
        _choice("on_ahead", self.on_ahead, ("warn", "error"))
        _collection("collection", self.collection)
        if self.history_collection == "":
            object.__setattr__(self, "history_collection", None)  # empty: the default, as before
        if self.history_collection is not None:
            _collection("history_collection", self.history_collection)
        _version("floor", self.floor, lowest=0, error=ValueError)
        _version("rerun", self.rerun, lowest=1, error=InvalidTarget)
        _text("build", self.build)
        _text("floor_release", self.floor_release)
        for name in ("validate", "retry_failed_on_new_build", "allow_out_of_order", "apply"):
            if not isinstance(getattr(self, name), bool):
                # Not truthiness: validate="false" would otherwise mean True.
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.apply and self.rerun is not None:
            raise ValueError(
                "rerun cannot be combined with apply=False: a wait-only call never runs a "
                "migration (run `bootmigrate rerun N` where migrations are applied)"
            )
        # A tuple, so that settings stay hashable and a list changed later changes nothing.
        object.__setattr__(self, "on_event", as_hooks(self.on_event) or None)

    @property
    def history_name(self) -> str:
        """The history collection's name: given, or ``<collection>_history``."""
        return self.history_collection or f"{self.collection}_history"

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The ``on_event`` hooks, as a tuple (empty without any)."""
        return as_hooks(self.on_event)

    @property
    def waiting(self) -> WaitPolicy:
        """How waiters poll and follow the lock, and how a holder retries its writes."""
        poll = self.max_poll_interval
        return WaitPolicy(
            max_poll_interval=poll,
            stream_idle_wait=poll if self.stream_idle_wait is None else self.stream_idle_wait,
            max_write_retry_interval=(
                poll if self.max_write_retry_interval is None else self.max_write_retry_interval
            ),
        )

    def updated(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied, validated again; unknown names are refused."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(
                f"unknown bootmigrate option{'s' if len(unknown) > 1 else ''}: "
                f"{', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return replace(self, **changes)


def _seconds(name: str, value: object, *, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        kind = "non-negative" if zero else "positive"
        raise ValueError(f"{name} must be a {kind}, finite number of seconds, got {value!r}")


def _target(value: object) -> None:
    if value == "latest" and isinstance(value, str):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidTarget(f"target must be 'latest' or a version number, got {value!r}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed or not isinstance(value, str):
        raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")


def _collection(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty collection name, got {value!r}")
    if "$" in value or "\0" in value or value.startswith("system."):
        raise ValueError(
            f"{name} {value!r} is not a usable collection name (no '$', no NUL, not 'system.*')"
        )


def _version(name: str, value: object, *, lowest: int, error: type[ValueError]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        kind = "positive" if lowest > 0 else "non-negative"
        raise error(f"{name} must be a {kind} version number, got {value!r}")


def _text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {value!r}")
