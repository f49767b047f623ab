"""OpenTelemetry spans from real migrate() calls, caught by the SDK's in-memory exporter."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from bootmigrate import Migration, MigrationFailed, migrate
from bootmigrate.events import Event
from bootmigrate.tracing import OpenTelemetrySpans
from tests.in_process import failing, recorder, recorders
from tests.polling import wait_for


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    found = InMemorySpanExporter()
    yield found
    found.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.anyio
async def test_one_span_per_call_and_a_child_per_migration(
    db: Any, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    await migrate(db, recorders(1, 2), on_event=OpenTelemetrySpans(provider))

    spans = exporter.get_finished_spans()
    [call] = by_name(spans, "bootmigrate.migrate")
    steps = by_name(spans, "bootmigrate.migration")
    assert len(spans) == 3
    assert [s.attributes["bootmigrate.migration_version"] for s in steps] == [1, 2]
    assert call.context is not None
    assert all(parent_of(s) == call.context.span_id for s in steps)
    assert all(s.context.trace_id == call.context.trace_id for s in steps)
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
    assert call.attributes["bootmigrate.db_version"] == 2
    assert call.attributes["bootmigrate.held"] is True
    assert call.attributes["bootmigrate.applied"] == (1, 2)
    assert steps[0].attributes["bootmigrate.direction"] == "up"
    assert [e.name for e in call.events if e.name != "server_warning"] == [
        "server_detected",
        "acquired",
        "released",
        "migrations_done",
    ]
    assert call.start_time is not None and steps[0].start_time is not None
    assert call.start_time <= steps[0].start_time


@pytest.mark.anyio
async def test_a_failed_migration_sets_error_status_on_both_spans(
    db: Any, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(MigrationFailed):
        await migrate(db, [recorder(1), failing(2)], on_event=OpenTelemetrySpans(provider))

    spans = exporter.get_finished_spans()
    [call] = by_name(spans, "bootmigrate.migrate")
    ok, failed = by_name(spans, "bootmigrate.migration")
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "RuntimeError: disk full"
    assert [e.attributes["exception.type"] for e in failed.events if e.name == "exception"] == [
        "RuntimeError"
    ]
    assert call.status.status_code is StatusCode.ERROR
    assert call.status.description is not None
    assert call.status.description.startswith("MigrationFailed: migration 0002 broken")
    assert call.attributes["bootmigrate.stuck"] is True


@pytest.mark.anyio
async def test_concurrent_calls_get_their_own_spans(
    db: Any, client: Any, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    hook = OpenTelemetrySpans(provider)  # one hook for both calls: told apart by call id
    release, inside = anyio.Event(), anyio.Event()
    seen: list[Event] = []

    async def slow(db: Any) -> None:
        inside.set()
        await release.wait()

    migrations = [Migration(version=1, up=slow, name="slow")]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: migrate(db, migrations, on_event=hook))
        await inside.wait()
        tasks.start_soon(lambda: migrate(client[db.name], migrations, on_event=[hook, seen.append]))
        await wait_for(lambda: any(e.name == "waiting" for e in seen), 20, "waiting")
        release.set()

    spans = exporter.get_finished_spans()
    calls = by_name(spans, "bootmigrate.migrate")
    assert len(calls) == 2
    holder = next(c for c in calls if c.attributes["bootmigrate.held"] is True)
    waiter = next(c for c in calls if c.attributes["bootmigrate.held"] is False)
    [step] = by_name(spans, "bootmigrate.migration")
    assert holder.context is not None and parent_of(step) == holder.context.span_id
    assert [e.name for e in waiter.events] == ["waiting", "wait_done"]
    assert waiter.attributes["bootmigrate.waited_s"] > 0


@pytest.mark.anyio
async def test_the_call_span_is_a_child_of_the_current_span(
    db: Any, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with provider.get_tracer("app").start_as_current_span("startup") as startup:
        await migrate(db, recorders(1), on_event=OpenTelemetrySpans(provider))

    [call] = by_name(exporter.get_finished_spans(), "bootmigrate.migrate")
    assert parent_of(call) == startup.get_span_context().span_id


def test_without_opentelemetry_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)

    with pytest.raises(ImportError, match=r"pip install 'bootmigrate\[opentelemetry\]'"):
        OpenTelemetrySpans()
