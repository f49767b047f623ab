"""Where this process's boot migration stands, and serving while it runs.

Both integrations keep one :class:`BootMigration` on the app; the readiness handlers answer
from it. With ``serve_while_migrating=True`` the migration runs in a :class:`Background` task
while the app serves, so that a liveness probe is answered during a long migration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import MigrationError
from ..report import MigrationReport, log_fields
from .signals import stop_server

log = logging.getLogger("bootmigrate")

State = Literal["migrating", "ready", "failed"]


@dataclass
class BootMigration:
    """This process's boot migration: ``state`` is ``"migrating"``, ``"ready"`` (``report``
    set) or ``"failed"`` (``error`` set). Kept on the app by the integrations."""

    state: State = "migrating"
    report: MigrationReport | None = None
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def reason(self) -> str:
        """Why the app is not ready, in one line an operator can act on."""
        if self.state == "ready":
            return "migrated"
        if self.state == "failed":
            return describe(self.error)
        return f"migrating at startup for {time.monotonic() - self.started:.1f} s"

    def done(self, report: MigrationReport) -> None:
        self.state, self.report = "ready", report

    def failed(self, error: BaseException) -> None:
        self.state, self.error = "failed", error

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """A readiness probe's answer: 200 with the report once migrated, else 503 with the
        state and the reason."""
        if self.ready and self.report is not None:
            return 200, {"ready": True, "state": "ready", "report": asdict(self.report)}
        return 503, {"ready": False, "state": self.state, "reason": self.reason}


def describe(error: BaseException | None) -> str:
    """An error as one line: a :class:`MigrationError`'s message is written for operators;
    anything else is named by its type."""
    if error is None:
        return "unknown error"
    if isinstance(error, MigrationError):
        text = str(error)
    elif isinstance(error, asyncio.CancelledError):
        text = "stopped: the app shut down before the migration finished"
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())


NOT_CONFIGURED = (
    503,
    {
        "ready": False,
        "state": "failed",
        "reason": "no bootmigrate integration on this app: add migrate_lifespan/migrate_context",
    },
)


class Background:
    """``migrate()`` in a task of its own while the app serves; ``boot`` follows it.

    ``exit_on_failure``: a failure stops the server (:func:`~.signals.stop_server`).
    :meth:`stop` cancels the task at the app's shutdown: ``migrate()`` then stops as it does
    when cancelled (``shutdown_grace`` lets a migration that is running finish first).
    """

    def __init__(
        self,
        boot: BootMigration,
        call: Callable[[], Awaitable[MigrationReport]],
        *,
        exit_on_failure: bool,
        on_report: Callable[[MigrationReport], None] = lambda report: None,
    ) -> None:
        self.boot = boot
        self.call = call
        self.exit_on_failure = exit_on_failure
        self.on_report = on_report
        # A reference kept for the task's whole life: the event loop keeps only a weak one.
        self.task = asyncio.get_running_loop().create_task(self._run(), name="bootmigrate")

    async def _run(self) -> None:
        try:
            report = await self.call()
        except asyncio.CancelledError as stopped:
            self.boot.failed(stopped)
            raise
        except Exception as exc:
            self.boot.failed(exc)
            log.error(
                f"migration at startup failed; the app serves but is not ready: {describe(exc)}",
                extra=log_fields("background_failed", error=describe(exc)),
            )
            if self.exit_on_failure:
                stop_server(describe(exc))
            return
        self.boot.done(report)
        self.on_report(report)

    async def stop(self) -> None:
        """Cancel the migration if it still runs, and wait until it has stopped."""
        self.task.cancel()
        # wait() and not ``await task``: the task's CancelledError must not look like this
        # (the shutdown's) task being cancelled.
        await asyncio.wait({self.task})
        if self.boot.state == "migrating":  # cancelled before it began
            self.boot.failed(asyncio.CancelledError())
