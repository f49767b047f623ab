"""Scenario 5: the server is unreachable at boot. Reachable after N seconds: the boot
succeeds within the deadline. Never reachable: a clear error at the deadline, not before and
not much after."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from bootmigrate import DatabaseUnavailable, migrate
from tests.clients import close_client, make_client
from tests.faults.conftest import record, scale
from tests.in_process import recorders
from tests.server import SecantusDaemon, free_port

pytestmark = pytest.mark.anyio

# How far past the deadline the error may come: one read's grace, plus scheduling.
LATE_BY_AT_MOST = 1.5


@pytest.mark.parametrize("wait_timeout", [1.0, 3.0])
async def test_never_reachable_fails_at_the_deadline(driver: str, wait_timeout: float) -> None:
    for _ in range(scale(1, 5)):
        port = free_port()
        client = make_client(
            driver, f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=30000
        )  # the driver's default is 30 s
        started = time.monotonic()
        try:
            with pytest.raises(DatabaseUnavailable) as caught:
                await migrate(client["app"], recorders(1), wait_timeout=wait_timeout)
        finally:
            await close_client(client)
        elapsed = time.monotonic() - started
        record(
            "5 server unreachable",
            runs=1,
            faults=1,
            late_ms_max=max(0, round((elapsed - wait_timeout) * 1000)),
        )

        assert wait_timeout <= elapsed <= wait_timeout + LATE_BY_AT_MOST, elapsed
        assert f"could not reach MongoDB at 127.0.0.1:{port} within {wait_timeout:g} s" in str(
            caught.value
        )
        assert "Traceback" not in str(caught.value)


async def test_reachable_after_a_delay_boots_within_the_deadline(
    driver: str, tmp_path: Path, bootmigrate_log: Any
) -> None:
    if os.environ.get("MONGODB_URI"):
        pytest.skip("starts its own server to bring it up late")
    delay, deadline = 2.0, 30.0
    server = SecantusDaemon(tmp_path / "late")
    client = make_client(driver, server.uri, serverSelectionTimeoutMS=500)
    outcome: dict[str, Any] = {}

    async def boot() -> None:
        outcome["report"] = await migrate(client["app"], recorders(1, 2), wait_timeout=deadline)
        outcome["at"] = time.monotonic()

    started = time.monotonic()
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(boot)
            await bootmigrate_log.wait_for("MongoDB unreachable")
            await anyio.sleep(delay)  # the fault itself: the server stays down this long
            server.start(wait=False)
    finally:
        await close_client(client)
        server.stop()

    record("5 server unreachable", runs=1, faults=1)
    assert outcome["report"].applied == [1, 2]
    assert delay <= outcome["at"] - started < deadline


async def test_never_reachable_with_validation_fails_at_the_deadline(driver: str) -> None:
    """``validate=True`` reads the history before anything else: that read keeps the same
    deadline and gives the same clear error, not the driver's own after its 30 s."""
    wait_timeout = 1.0
    client = make_client(
        driver, f"mongodb://127.0.0.1:{free_port()}/", serverSelectionTimeoutMS=30000
    )
    started = time.monotonic()
    try:
        with anyio.fail_after(60), pytest.raises(DatabaseUnavailable):
            await migrate(client["app"], recorders(1), wait_timeout=wait_timeout, validate=True)
    finally:
        await close_client(client)
    assert time.monotonic() - started < wait_timeout + LATE_BY_AT_MOST
