"""SIGTERM and SIGINT during a startup's ``migrate()``: real signals sent to this process,
with a stand-in for the server's own handler installed first (as uvicorn installs its own)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
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


SET_HANDLER = sys.modules["_signal"].signal  # the C function behind signal.signal


async def test_a_signal_while_the_handlers_go_on_is_not_lost(
    server_handler: ServerHandler,
) -> None:
    # A real SIGTERM, sent the moment the first handler is on and before the second is: a
    # profile hook sees each C call return, so the signal lands right after the first
    # _signal.signal (what signal.signal calls) and is handled before the next line runs.
    sent: list[int] = []

    def send_after_first_install(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and arg is SET_HANDLER and not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    async def call() -> str:
        await anyio.sleep_forever()
        return "report"

    sys.setprofile(send_after_first_install)
    try:
        with anyio.fail_after(5), pytest.raises(StoppedBySignal):
            await until_signalled(call)
    finally:
        sys.setprofile(None)

    assert sent == [signal.SIGTERM]
    assert server_handler.received == [signal.SIGTERM]  # the server learns it must exit
    assert signal.getsignal(signal.SIGTERM) is server_handler
    assert signal.getsignal(signal.SIGINT) is server_handler


async def overlapping_startups(during: Callable[[], Awaitable[None]] | None = None) -> list[str]:
    """Two apps' startups in one process: A's call starts, then B's; A's ends first, then
    B's (not last in, first out). ``during``: awaited while both run. What each returned, or
    the name of what it raised."""
    a_started, b_started, a_done = anyio.Event(), anyio.Event(), anyio.Event()
    outcomes: list[str] = []

    async def a_call() -> str:
        a_started.set()
        await b_started.wait()
        if during is not None:
            await during()
        return "a"

    async def b_call() -> str:
        b_started.set()
        await a_done.wait()
        return "b"

    async def run(call: Callable[[], Awaitable[str]], done: anyio.Event | None) -> None:
        try:
            outcomes.append(await until_signalled(call))
        except StoppedBySignal as stopped:
            outcomes.append(type(stopped).__name__)
        if done is not None:
            done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(run, a_call, a_done)
        await a_started.wait()
        group.start_soon(run, b_call, None)
    return outcomes


def test_overlapping_startups_put_the_servers_handler_back(server_handler: ServerHandler) -> None:
    assert asyncio.run(overlapping_startups()) == ["a", "b"]

    assert signal.getsignal(signal.SIGTERM) is server_handler
    assert signal.getsignal(signal.SIGINT) is server_handler


def test_a_signal_after_overlapping_startups_reaches_the_server_alone(
    server_handler: ServerHandler,
) -> None:
    asyncio.run(overlapping_startups())  # and the loop they ran in is closed

    os.kill(os.getpid(), signal.SIGTERM)  # a handler that raised would raise here

    assert server_handler.received == [signal.SIGTERM]


def test_a_signal_while_startups_overlap_stops_both_and_reaches_the_server_once(
    server_handler: ServerHandler,
) -> None:
    async def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await anyio.sleep_forever()

    assert asyncio.run(overlapping_startups(during=sigterm)) == ["StoppedBySignal"] * 2

    assert server_handler.received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is server_handler


DEFAULT_DISPOSITION = r"""
import asyncio, os, signal, sys
from bootmigrate.integrations.signals import until_signalled

async def call():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(60)
    finally:
        print("cleaned up", flush=True)  # what a cancelled migrate() does with its lock

async def main():
    try:
        await until_signalled(call)
    except Exception as exc:
        print("caught", type(exc).__name__, flush=True)
    print("still running after SIGTERM", flush=True)

assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
asyncio.run(main())
"""


def test_a_sigterm_nothing_handles_ends_the_process_once_the_call_has_stopped() -> None:
    # No server handler (SIG_DFL): a script, or a test driving the lifespan in its main thread.
    done = subprocess.run(
        [sys.executable, "-c", DEFAULT_DISPOSITION],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )

    assert done.stdout.splitlines() == ["cleaned up"], done
    assert "stopped by SIGTERM while migrating at startup" in done.stderr
    assert done.returncode == -signal.SIGTERM
