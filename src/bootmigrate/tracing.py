"""OpenTelemetry spans of ``migrate()`` calls, as an ``on_event`` hook.

    from bootmigrate.tracing import OpenTelemetrySpans

    await migrate(db, "migrations", on_event=OpenTelemetrySpans())

Needs ``opentelemetry-api`` (``pip install 'bootmigrate[opentelemetry]'``), and an SDK set
up by the application to export anything; nothing imports it unless this class is used.

One span per call, ``bootmigrate.migrate`` (a child of whatever span is current when
``migrate()`` is called), from ``started`` to ``done``, ``failed`` or ``cancelled``; one
child span per migration step, ``bootmigrate.migration``, from ``migration_started`` to
``migration_applied``, ``migration_failed``, ``interrupted`` or ``lock_lost``. A failure
sets the span's status to ERROR with the error, and an ``exception`` event. Every other
event is a span event of the innermost open span. Attributes are the events' fields, named
``bootmigrate.<field>``. The spans are not made current: a migration's own spans (its
driver's, for example) are not their children.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .events import Event

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

CALL_SPAN = "bootmigrate.migrate"
STEP_SPAN = "bootmigrate.migration"
_STEP_ENDS = ("migration_applied", "migration_failed", "interrupted", "lock_lost")
_CALL_ENDS = ("done", "failed", "cancelled")


def _opentelemetry() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ImportError(
            "bootmigrate.tracing needs opentelemetry-api: pip install "
            "'bootmigrate[opentelemetry]' (from a checkout: pip install '.[opentelemetry]')"
        ) from exc
    return trace


def _version() -> str | None:
    try:
        return metadata.version("bootmigrate")
    except metadata.PackageNotFoundError:
        return None


class OpenTelemetrySpans:
    """An ``on_event`` hook making spans of ``migrate()`` calls (the module's docstring
    says which) with ``tracer_provider`` (default: the global one)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        trace = _opentelemetry()
        self._trace = trace
        self._tracer = trace.get_tracer("bootmigrate", _version(), tracer_provider)
        # Open spans by call id: concurrent calls in one process each have their own.
        self._calls: dict[str, Span] = {}
        self._steps: dict[str, Span] = {}

    def __call__(self, event: Event) -> None:
        call_id = event.call_id
        if event.name == "started":
            self._calls[call_id] = self._tracer.start_span(CALL_SPAN, attributes=_attributes(event))
            return
        call = self._calls.get(call_id)
        if call is None:
            return  # a call that started before this hook existed
        if event.name == "migration_started":
            context = self._trace.set_span_in_context(call)
            self._steps[call_id] = self._tracer.start_span(
                STEP_SPAN, context=context, attributes=_attributes(event)
            )
            return
        step = self._steps.get(call_id)
        if step is not None and event.name in _STEP_ENDS:
            del self._steps[call_id]
            self._end(step, event, failed=event.name != "migration_applied")
            if event.name != "lock_lost":
                return
            step = None  # the loss is the call's news too
        if event.name in _CALL_ENDS:
            del self._calls[call_id]
            if step is not None:  # a step still open as the call ends
                del self._steps[call_id]
                self._end(step, event, failed=True)
            self._end(call, event, failed=event.name != "done")
            return
        (step or call).add_event(event.name, _attributes(event))

    def _end(self, span: Span, event: Event, *, failed: bool) -> None:
        span.set_attributes(_attributes(event))
        if failed:
            description = event.error or event.reason or event.name
            if event.error_type:
                if not description.startswith(f"{event.error_type}:"):
                    description = f"{event.error_type}: {description}"
                span.add_event(
                    "exception",
                    {"exception.type": event.error_type, "exception.message": event.error or ""},
                )
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, description))
        span.end()


def _attributes(event: Event) -> dict[str, Any]:
    """The event's fields as span attributes: scalars as they are, a document's scalar
    fields one level down (``bootmigrate.holder.host``), dates as ISO text."""
    found: dict[str, Any] = {"bootmigrate.event": event.name, "bootmigrate.call_id": event.call_id}
    for name, value in event.fields().items():
        if isinstance(value, Mapping):
            for key, inner in value.items():
                if isinstance(inner, (str, bool, int, float)):
                    found[f"bootmigrate.{name}.{key}"] = inner
        elif isinstance(value, datetime):
            found[f"bootmigrate.{name}"] = value.isoformat()
        elif isinstance(value, (str, bool, int, float, tuple)):
            found[f"bootmigrate.{name}"] = value
    return found
