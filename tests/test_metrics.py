"""Prometheus metrics from real migrate() calls, read back from a registry of their own."""

from __future__ import annotations

import sys
import threading
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from bootmigrate import Migration, MigrationFailed, migrate
from bootmigrate.events import Event
from bootmigrate.metrics import PrometheusMetrics
from tests.in_process import failing, recorder, recorders
from tests.polling import wait_for

pytestmark = pytest.mark.anyio


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def lock_state(registry: CollectorRegistry) -> str:
    states = ("idle", "waiting", "holding", "stuck")
    found = [
        s
        for s in states
        if sample(registry, "bootmigrate_lock_state", bootmigrate_lock_state=s) == 1
    ]
    assert len(found) == 1, found
    return found[0]


async def test_a_holder_counts_its_migrations_version_and_lock(db: Any) -> None:
    registry = CollectorRegistry()

    await migrate(db, recorders(1, 2), on_event=PrometheusMetrics(registry))

    for version in ("1", "2"):
        labels = {"version": version, "direction": "up", "outcome": "applied"}
        assert sample(registry, "bootmigrate_migration_duration_seconds_count", **labels) == 1
        duration = sample(registry, "bootmigrate_migration_duration_seconds_sum", **labels)
        assert duration is not None and duration >= 0
    assert sample(registry, "bootmigrate_database_version") == 2
    assert sample(registry, "bootmigrate_boot_wait_seconds_count", outcome="done") == 1
    assert sample(registry, "bootmigrate_boot_wait_seconds_sum", outcome="done") == 0
    assert sample(registry, "bootmigrate_events_total", event="migration_applied") == 2
    assert sample(registry, "bootmigrate_events_total", event="acquired") == 1
    assert lock_state(registry) == "idle"


async def test_a_failed_migration_is_counted_and_the_lock_shows_stuck(db: Any) -> None:
    registry = CollectorRegistry()

    with pytest.raises(MigrationFailed):
        await migrate(db, [recorder(1), failing(2)], on_event=PrometheusMetrics(registry))

    failed = {"version": "2", "direction": "up", "outcome": "failed"}
    assert sample(registry, "bootmigrate_migration_duration_seconds_count", **failed) == 1
    assert sample(registry, "bootmigrate_boot_wait_seconds_count", outcome="failed") == 1
    assert sample(registry, "bootmigrate_database_version") == 1
    assert lock_state(registry) == "stuck"


async def test_a_waiter_observes_its_wait(db: Any, client: Any) -> None:
    registry = CollectorRegistry()
    release, inside = anyio.Event(), anyio.Event()
    waiter_events: list[Event] = []

    async def slow(db: Any) -> None:
        inside.set()
        await release.wait()

    migrations = [Migration(version=1, up=slow, name="slow")]
    # Two instances on one registry count together (and do not register twice).
    holder_hook, waiter_hook = PrometheusMetrics(registry), PrometheusMetrics(registry)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: migrate(db, migrations, on_event=holder_hook))
        await inside.wait()
        tasks.start_soon(
            lambda: migrate(
                client[db.name], migrations, on_event=[waiter_hook, waiter_events.append]
            )
        )
        await wait_for(lambda: any(e.name == "waiting" for e in waiter_events), 20, "waiting")
        assert lock_state(registry) == "waiting"  # the last call to say something waits
        release.set()

    assert sample(registry, "bootmigrate_boot_wait_seconds_count", outcome="done") == 2
    waited = sample(registry, "bootmigrate_boot_wait_seconds_sum", outcome="done")
    assert waited is not None and waited > 0
    assert sample(registry, "bootmigrate_events_total", event="wait_done") == 1
    assert lock_state(registry) == "idle"


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    with pytest.raises(ImportError, match=r"pip install 'bootmigrate\[prometheus\]'"):
        PrometheusMetrics()


def test_two_threads_may_build_the_hook_on_one_registry_at_once() -> None:
    errors: list[BaseException] = []
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows
    try:
        for _ in range(300):
            registry = CollectorRegistry()
            barrier = threading.Barrier(2)

            def build(registry: CollectorRegistry = registry, barrier: Any = barrier) -> None:
                barrier.wait()
                try:
                    PrometheusMetrics(registry)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=build) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert errors == []
