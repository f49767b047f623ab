"""Waiting: how often to look again, for how long, and waking early when the lock changes.

:class:`WaitPolicy` names the three intervals; :class:`Deadline` is the one clock every bounded
operation of a call reads; :class:`Waiter` repeats an attempt until it settles or the deadline
passes. The lock's rules are not here: an attempt decides, and says "again" by raising.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_base, wait_random_exponential

from .watch import ControlWatch

T = TypeVar("T")

# The first looks come quickly (a hand-off is usually imminent); later ones back off.
FIRST_INTERVAL = 0.05


@dataclass(frozen=True)
class WaitPolicy:
    """Three separate intervals, each with one job.

    ``max_poll_interval``: the longest nap between two looks at a held lock (exponential
    backoff with full jitter from 50 ms). ``stream_idle_wait``: how long the server holds a
    waiter's idle change-stream read. ``max_write_retry_interval``: the longest pause between a
    holder's retries of a write that lost its connection.
    """

    max_poll_interval: float = 2.0
    stream_idle_wait: float = 2.0
    max_write_retry_interval: float = 2.0

    def poll_backoff(self) -> wait_base:
        """Naps between looks at a held lock."""
        return wait_random_exponential(multiplier=FIRST_INTERVAL, max=self.max_poll_interval)

    def write_retry_backoff(self) -> wait_base:
        """Pauses between a holder's retries of one write."""
        return wait_random_exponential(multiplier=FIRST_INTERVAL, max=self.max_write_retry_interval)


@dataclass(frozen=True)
class Deadline:
    """An instant on this process's monotonic clock that a call must not outlive."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - time.monotonic())

    def bound(self, grace: float = 0.5) -> AbstractContextManager[anyio.CancelScope]:
        """A scope that raises ``TimeoutError`` once the deadline (plus ``grace``, so that an
        operation started at the last moment still gets an answer) has passed."""
        return anyio.fail_after(self.remaining() + grace)


class Waiter:
    """Repeats an attempt until it returns, napping between tries.

    An attempt that raises one of ``again`` is tried again after a nap; any other error ends
    the wait. Naps back off, never run past the deadline, and end early when the control
    document changes (``watch.py``). At the deadline the last ``again`` error is raised.
    """

    def __init__(
        self,
        policy: WaitPolicy,
        deadline: Deadline,
        control_collection: Any,
        again: tuple[type[BaseException], ...],
        before_nap: Callable[[BaseException], None],
    ) -> None:
        self._policy = policy
        self._deadline = deadline
        self._collection = control_collection
        self._again = again
        self._before_nap = before_nap

    async def until_settled(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``'s result once it stops raising ``again``."""
        try:
            # Every boot but the few after a deploy ends here: one try, no other machinery.
            return await attempt()
        except self._again as exc:
            first: BaseException = exc
        result: list[T] = []
        error: Exception | None = None
        async with anyio.create_task_group() as tasks:
            watch = ControlWatch(self._collection, tasks, self._policy.stream_idle_wait)
            try:
                result.append(await self._retry(attempt, watch, first))
            except Exception as exc:  # re-raised below, outside the task group, unwrapped
                error = exc
            tasks.cancel_scope.cancel()
        if error is not None:
            raise error
        return result[0]

    async def _retry(
        self, attempt: Callable[[], Awaitable[T]], watch: ControlWatch, first: BaseException
    ) -> T:
        backoff = self._policy.poll_backoff()

        def until_deadline(state: RetryCallState) -> float:
            # Never nap past the deadline: the last look comes at the deadline, not after.
            return min(backoff(state), self._deadline.remaining())

        def before_nap(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            if error is not None:
                self._before_nap(error)

        pending = [first]  # the attempt already made counts as tenacity's first

        async def again() -> T:
            if pending:
                raise pending.pop()
            return await attempt()

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(self._again),
            wait=until_deadline,
            sleep=watch.nap,
            # The call's own deadline, not a delay counted from the first nap (which starts
            # later): at the deadline the waiting ends, instead of looking again with no nap.
            stop=lambda _state: self._deadline.remaining() <= 0,
            before_sleep=before_nap,
            reraise=True,
        )
        async for trial in retrying:
            with trial:
                return await again()
        raise AssertionError("unreachable: tenacity either returns or re-raises")
