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

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.wait import wait_exponential_jitter

from ..errors import ControlLocked, DatabaseUnavailable, LockLost, MigrationError, NotMigrated
from ..report import MigrationReport, log_fields
from .signals import stop_server, until_signalled

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
    # Serving while migrating: why the last ``migrate()`` call ended without migrating, when
    # it is tried again (another replica still migrating, the server unreachable).
    last_error: BaseException | None = None
    attempts: int = 0

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
        since = f"migrating at startup for {time.monotonic() - self.started:.1f} s"
        if self.last_error is None:
            return since
        return (
            f"{since}; trying again, as attempt {self.attempts} ended without migrating: "
            f"{describe(self.last_error)}"
        )

    def done(self, report: MigrationReport) -> None:
        self.state, self.report = "ready", report

    def retrying(self, error: BaseException, attempts: int) -> None:
        """Still migrating: ``attempts`` calls ended with ``error``, which another try may cure."""
        self.last_error, self.attempts = error, attempts

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


def passing(error: BaseException) -> bool:
    """Whether a ``migrate()`` call that ended with ``error`` may succeed if made again: the
    wait ran out while another replica still migrated (``wait_timeout``; a wait-only call's
    :class:`~bootmigrate.NotMigrated`), the server could not be reached, or this call lost its
    lock. Anything else (a failed migration, a stuck lock, bad migrations, a database ahead,
    an error that is not a :class:`MigrationError`) only an operator or a new build cures."""
    if isinstance(error, LockLost):
        return True
    if isinstance(error, ControlLocked):
        return error.reason == "wait_timeout"
    return isinstance(error, DatabaseUnavailable | NotMigrated)


# The pause before calling ``migrate()`` again: 1 s, doubling up to 30 s, plus up to 1 s of
# jitter so that replicas that gave up together do not come back together.
RETRY_PAUSE = wait_exponential_jitter(max=30)


class Background:
    """``migrate()`` in a task of its own while the app serves; ``boot`` follows it.

    A call that ends in an error another try may cure (:func:`passing`: the wait ran out
    while another replica migrates, the server was unreachable) is made again after a pause
    (:data:`RETRY_PAUSE`), the app still ``"migrating"``: a serving replica is never left
    unready for good by something that passes. Any other error is final: ``"failed"``.
    ``exit_on_failure``: a final failure stops the server (:func:`~.signals.stop_server`).
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
        retrying = AsyncRetrying(
            retry=retry_if_exception(passing),
            wait=RETRY_PAUSE,
            sleep=anyio.sleep,
            before_sleep=self._again,
            reraise=True,
        )
        try:
            report = await self._attempts(retrying)
        except asyncio.CancelledError as stopped:
            self.boot.failed(stopped)
            raise
        except Exception as exc:
            self.boot.failed(exc)
            log.error(
                f"migration at startup failed; the app serves but is not ready: {describe(exc)}",
                # A MigrationError's message says it all; anything else is a bug somewhere,
                # whose traceback is what finds it.
                exc_info=None if isinstance(exc, MigrationError) else exc,
                extra=log_fields("background_failed", error=describe(exc)),
            )
            if self.exit_on_failure:
                stop_server(describe(exc))
            return
        self.boot.done(report)
        self.on_report(report)

    async def _attempts(self, retrying: AsyncRetrying) -> MigrationReport:
        # Not ``retrying(self.call)``: tenacity would not await what a plain callable returns.
        async for attempt in retrying:
            with attempt:
                return await self.call()
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _again(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        assert error is not None  # only an error is retried
        self.boot.retrying(error, state.attempt_number)
        log.warning(
            f"migration at startup did not complete (attempt {state.attempt_number}); the app "
            f"serves, not ready, and tries again in {state.upcoming_sleep:.1f} s: "
            f"{describe(error)}",
            extra=log_fields(
                "background_retrying",
                error=describe(error),
                attempt=state.attempt_number,
                pause_s=state.upcoming_sleep,
            ),
        )

    async def stop(self) -> None:
        """Cancel the migration if it still runs, and wait until it has stopped."""
        self.task.cancel()
        # wait() and not ``await task``: the task's CancelledError must not look like this
        # (the shutdown's) task being cancelled.
        await asyncio.wait({self.task})
        if self.boot.state == "migrating":  # cancelled before it began
            self.boot.failed(asyncio.CancelledError())


async def boot_or_say_why(call: Callable[[], Awaitable[MigrationReport]]) -> MigrationReport:
    """``await call()`` in a blocking boot (SIGTERM honoured, :func:`~.signals.until_signalled`).
    A :class:`~bootmigrate.MigrationError` leaves without bootmigrate's own frames: its
    message already says what happened and the fix, and the server prints the traceback of
    every replica that fails (four workers, four copies). A migration's own error stays
    attached, with its traceback (``MigrationFailed.__cause__``)."""
    try:
        return await until_signalled(call)
    except MigrationError as exc:
        raise exc.with_traceback(None)  # noqa: B904 - the same error, not a new one
