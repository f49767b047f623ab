"""SIGTERM and SIGINT during a startup's ``migrate()``: real signals sent to this process,
with a stand-in for the server's own handler installed first (as uvicorn installs its own)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from bootmigrate.integrations.signals import StoppedBySignal, until_signalled

pytestmark = pytest.mark.anyio


class ServerHandler:
    """What a server installs: it notes the signal (uvicorn sets ``should_exit``)."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)


@pytest.fixture
def server_handler() -> Iterator[ServerHandler]:
    handler = ServerHandler()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    yield handler
    for signum, old in previous.items():
        signal.signal(signum, old)


async def blocked_until_signalled(signum: int) -> None:
    """Sends ``signum`` to this process once the call is waiting, then waits forever."""
    os.kill(os.getpid(), signum)
    await anyio.sleep_forever()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_cancels_the_call_and_reaches_the_servers_handler(
    server_handler: ServerHandler, signum: int
) -> None:
    with anyio.fail_after(5), pytest.raises(StoppedBySignal) as stopped:
        await until_signalled(lambda: blocked_until_signalled(signum))

    name = signal.Signals(signum).name
    assert str(stopped.value).startswith(f"stopped by {name} while migrating at startup")
    assert server_handler.received == [signum]  # the server still learns it must exit
    assert signal.getsignal(signum) is server_handler  # and has its handler back


async def test_the_handlers_are_put_back_after_a_call_that_ends_normally(
    server_handler: ServerHandler,
) -> None:
    async def quick() -> str:
        return "report"

    assert await until_signalled(quick) == "report"
    assert signal.getsignal(signal.SIGTERM) is server_handler
    assert signal.getsignal(signal.SIGINT) is server_handler


async def test_an_ignored_signal_stays_ignored(server_handler: ServerHandler) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job has it
    seen: list[Any] = []

    async def call() -> str:
        seen.append(signal.getsignal(signal.SIGINT))
        os.kill(os.getpid(), signal.SIGINT)
        await anyio.lowlevel.checkpoint()
        return "report"

    assert await until_signalled(call) == "report"
    assert seen == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_outside_the_main_thread_nothing_is_installed(server_handler: ServerHandler) -> None:
    seen: list[Any] = []

    async def call() -> str:
        seen.append(signal.getsignal(signal.SIGTERM))
        return "report"

    results: list[str] = []
    thread = threading.Thread(target=lambda: results.append(anyio.run(until_signalled, call)))
    thread.start()
    thread.join(10)

    assert results == ["report"]
    assert seen == [server_handler]  # the server's own handler, untouched
