"""SIGTERM and SIGINT during a framework's startup, and stopping a server on purpose.

uvicorn (alone, or as gunicorn's ``UvicornWorker``) only notes a SIGTERM that arrives while
the lifespan startup runs: it sets ``should_exit`` and acts on it once the startup is over,
which may be ``wait_timeout`` (300 s) later if the startup is waiting on a lock or an
unreachable database. aiohttp's ``web.run_app`` does cancel its startup, but without a word.
:func:`until_signalled` makes the ``migrate()`` call itself stop at the signal, in every
server, and say why; :func:`stop_server` is how ``exit_on_failure`` stops one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import anyio

from ..report import log_fields

log = logging.getLogger("bootmigrate")

T = TypeVar("T")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Exception):
    """The process was told to stop (SIGTERM, SIGINT) while its startup was migrating.

    ``migrate()`` was cancelled and left the lock as cancellation does (a waiter wrote
    nothing; a holder released it, or recorded the migration it was inside); the app did not
    start. Raised instead of letting the server serve after its startup, or sit in it."""

    def __init__(self, signal_name: str, seconds: float) -> None:
        self.signal_name = signal_name
        self.seconds = seconds
        super().__init__(
            f"stopped by {signal_name} while migrating at startup (after {seconds:.1f} s): "
            "migrate() was cancelled and the app was not started"
        )


async def until_signalled(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, cancelled when SIGTERM or SIGINT arrives; then :class:`StoppedBySignal`.

    The handler that was installed before (the server's) is called first, so the server
    still learns that it must exit; the previous handlers are back when this returns. A
    signal the process ignores (``SIG_IGN``) stays ignored. One whose disposition was the
    default (``SIG_DFL``: no server handles it) ends the process as it would have, once the
    cancelled call has stopped: the default is put back and the signal raised again. Python
    lets only the main thread set signal handlers: in any other thread (a test client's
    portal, for one) this only awaits ``call()``, and the server's own handling is all there
    is. Calls may overlap (two apps starting in one process): a signal cancels them all.
    """
    if threading.current_thread() is not threading.main_thread():
        return await call()
    started = time.monotonic()
    stopped: StoppedBySignal | None = None
    with anyio.CancelScope() as scope:
        this = _Call(asyncio.get_running_loop(), scope)
        try:
            # Inside the try: a signal arriving while the handlers go on finds the call
            # registered, and the finally takes them off again whatever happens.
            _HANDLERS.enter(this)
            return await call()
        except BaseException:
            if this.received:
                # Said here, as the server may also cancel this task (aiohttp's run_app does)
                # and end the process without a word.
                stopped = StoppedBySignal(
                    signal.Signals(this.received[0]).name, time.monotonic() - started
                )
                log.warning(str(stopped), extra=log_fields("stopped_by_signal"))
            raise
        finally:
            _HANDLERS.leave(this)
    # Only reached when the scope swallowed its own cancellation, which a signal asked for.
    assert stopped is not None
    raise stopped


@dataclass(eq=False)
class _Call:
    """One :func:`until_signalled` call: its loop and cancel scope, and the signals it got."""

    loop: asyncio.AbstractEventLoop
    scope: anyio.CancelScope
    received: list[int] = field(default_factory=list)

    def cancel(self, signum: int) -> None:
        self.received.append(signum)
        # A signal handler runs between two bytecodes of the main thread, maybe inside the
        # event loop itself: the cancellation is handed to the loop, not done here.
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to cancel
            self.loop.call_soon_threadsafe(self.scope.cancel)


class _Handlers:
    """The process's signal handling while :func:`until_signalled` calls run: one handler
    per signal, put on when the first call starts and taken off when the last one ends,
    whatever order they end in (two apps starting in one process need not end LIFO).

    Only the main thread touches this, and a signal handler runs in it between two
    bytecodes: each step below leaves a state that :meth:`handle` can act on.
    """

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        # The disposition our handler replaced, per signal: called on (a server's handler),
        # or restored and the signal raised again (SIG_DFL).
        self.replaced: dict[int, Any] = {}
        # Signals received whose replaced disposition was SIG_DFL: the process is to end by
        # them once the calls have stopped.
        self.to_raise: list[int] = []

    def enter(self, call: _Call) -> None:
        self.calls.append(call)
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            # Ignored on purpose (nohup, a shell's background job): not ours to change. None:
            # set outside Python, so it could not be put back. Ours: an earlier call's.
            if current is signal.SIG_IGN or current is None or current == self.handle:
                continue
            self.replaced[signum] = current  # before the handler goes on: it reads this
            signal.signal(signum, self.handle)

    def leave(self, call: _Call) -> None:
        self.calls.remove(call)
        if self.calls:
            return
        for signum, previous in list(self.replaced.items()):
            # Replaced by someone else meanwhile: theirs stays.
            if signal.getsignal(signum) == self.handle:
                signal.signal(signum, previous)
            del self.replaced[signum]
        while self.to_raise:
            signal.raise_signal(self.to_raise.pop(0))

    def handle(self, signum: int, frame: FrameType | None) -> None:
        for call in list(self.calls):
            call.cancel(signum)
        previous = self.replaced.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL and signum not in self.to_raise:
            self.to_raise.append(signum)


_HANDLERS = _Handlers()


def stop_server(reason: str) -> bool:
    """Ask the server this process runs in to shut down, as on ``kill -TERM``: it stops
    accepting, finishes its requests, runs the app's shutdown and exits.

    A signal rather than an exception or an exit: the signal is the one way in that every
    server offers for its own clean shutdown (uvicorn, gunicorn, aiohttp's ``run_app``,
    hypercorn), and a request being answered is not cut off. Under gunicorn the master is
    signalled, not the worker: the master would start a new worker, which would fail the same
    way, forever. So is the parent of a process that :mod:`multiprocessing` started:
    ``uvicorn --workers N``'s supervisor (which otherwise restarts the worker, forever) or
    ``--reload``'s reloader; it then stops every worker, each as it does on ``kill -TERM``. A
    process with no handler for SIGTERM (a test client in a test run) is not one a server
    drives: nothing is signalled then, and ``False`` returned.
    """
    parent = multiprocessing.parent_process()
    if os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/"):
        target, whom = os.getppid(), "the gunicorn master"
    elif not callable(signal.getsignal(signal.SIGTERM)):
        log.error(
            f"exit_on_failure: not stopping this process, no server in it handles SIGTERM "
            f"({reason})",
            extra=log_fields("stop_skipped"),
        )
        return False
    elif parent is not None and parent.pid is not None:
        target, whom = parent.pid, "the supervisor that started this worker"
    else:
        target, whom = os.getpid(), "this process"
    log.error(
        f"exit_on_failure: stopping the server: SIGTERM to {whom} (pid {target}): {reason}",
        extra=log_fields("stopping_server", pid=target),
    )
    os.kill(target, signal.SIGTERM)
    return True
