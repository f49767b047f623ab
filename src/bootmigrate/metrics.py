"""Prometheus metrics of ``migrate()`` calls, as an ``on_event`` hook.

    from bootmigrate.metrics import PrometheusMetrics

    await migrate(db, "migrations", on_event=PrometheusMetrics())

Needs ``prometheus-client`` (``pip install 'bootmigrate[prometheus]'``); nothing imports it
unless this class is used. The metrics are registered once per registry (the default one
unless ``registry`` is given), so several instances, or several calls, share them:

- ``bootmigrate_boot_wait_seconds`` (histogram, label ``outcome``: ``done``, ``failed``,
  ``cancelled``): seconds each call waited for another process's lock;
- ``bootmigrate_migration_duration_seconds`` (histogram, labels ``version``,
  ``direction``, ``outcome``: ``applied``, ``failed``, ``interrupted``);
- ``bootmigrate_database_version`` (gauge): the database's version as last seen;
- ``bootmigrate_lock_state`` (enum: ``idle``, ``waiting``, ``holding``, ``stuck``): what
  this process's last call is doing with the lock; ``stuck`` once it found or left the lock
  stuck, for an operator;
- ``bootmigrate_events_total`` (counter, label ``event``): every event, by name.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .events import Event

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MIGRATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
LOCK_STATES = ["idle", "waiting", "holding", "stuck"]

# Where each event leaves this process's part in the lock.
_LOCK_STATE = {
    "waiting": "waiting",
    "acquired": "holding",
    "released": "idle",
    "lock_lost": "idle",
    "migration_failed": "stuck",
    "marked_interrupted": "stuck",
}
_TERMINAL = ("done", "failed", "cancelled")
_STEP_OUTCOMES = {
    "migration_applied": "applied",
    "migration_failed": "failed",
    "interrupted": "interrupted",
}


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "bootmigrate.metrics needs prometheus-client: pip install 'bootmigrate[prometheus]' "
            "(from a checkout: pip install '.[prometheus]')"
        ) from exc
    return prometheus_client


@dataclass(frozen=True)
class _Collectors:
    boot_wait: Histogram
    migration_duration: Histogram
    database_version: Gauge
    lock_state: Enum
    events: Counter


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, _Collectors] = weakref.WeakKeyDictionary()
# Two threads building the hook on one registry would both register the names (refused).
_REGISTERING = threading.Lock()


def _collectors(prometheus: Any, registry: CollectorRegistry) -> _Collectors:
    """The metrics in ``registry``, registered on first use: a registry refuses the same
    name twice, and every instance of :class:`PrometheusMetrics` should count together."""
    with _REGISTERING:
        return _SHARED.get(registry) or _register(prometheus, registry)


def _register(prometheus: Any, registry: CollectorRegistry) -> _Collectors:
    found = _Collectors(
        boot_wait=prometheus.Histogram(
            "bootmigrate_boot_wait_seconds",
            "Seconds a migrate() call waited for another process's migration lock.",
            ["outcome"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        ),
        migration_duration=prometheus.Histogram(
            "bootmigrate_migration_duration_seconds",
            "Seconds a migration step ran, by version, direction and outcome.",
            ["version", "direction", "outcome"],
            buckets=MIGRATION_BUCKETS,
            registry=registry,
        ),
        database_version=prometheus.Gauge(
            "bootmigrate_database_version",
            "The database's migration version, as this process last saw it.",
            registry=registry,
        ),
        lock_state=prometheus.Enum(
            "bootmigrate_lock_state",
            "What this process's migrate() call does with the migration lock.",
            states=LOCK_STATES,
            registry=registry,
        ),
        events=prometheus.Counter(
            "bootmigrate_events",
            "bootmigrate events, by name (docs/events.md).",
            ["event"],
            registry=registry,
        ),
    )
    _SHARED[registry] = found
    return found


class PrometheusMetrics:
    """An ``on_event`` hook keeping Prometheus metrics (the module's docstring lists them)
    in ``registry`` (default: ``prometheus_client.REGISTRY``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        prometheus = _prometheus()
        self.registry: CollectorRegistry = registry if registry is not None else prometheus.REGISTRY
        self._m = _collectors(prometheus, self.registry)

    def __call__(self, event: Event) -> None:
        m = self._m
        m.events.labels(event=event.name).inc()
        if event.db_version is not None:
            m.database_version.set(event.db_version)
        outcome = _STEP_OUTCOMES.get(event.name)
        if outcome is not None and event.duration_s is not None:
            m.migration_duration.labels(
                version=str(event.migration_version),
                direction=event.direction or "up",
                outcome=outcome,
            ).observe(event.duration_s)
        if event.name in _TERMINAL:
            m.boot_wait.labels(outcome=event.name).observe(event.waited_s or 0.0)
            m.lock_state.state("stuck" if event.stuck else "idle")
        elif event.name == "interrupted" and event.stuck:
            m.lock_state.state("stuck")
        elif event.name in _LOCK_STATE:
            m.lock_state.state(_LOCK_STATE[event.name])
