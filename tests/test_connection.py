"""Semantic 11: a server that is not up yet is retried within the deadline, then a clear
error; never a raw driver traceback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from bootmigrate import DatabaseUnavailable, migrate
from tests.clients import close_client, make_client
from tests.in_process import recorders
from tests.server import SecantusDaemon, free_port

pytestmark = pytest.mark.anyio


async def test_unreachable_server_gives_a_clear_error_at_the_deadline(driver: str) -> None:
    port = free_port()
    client = make_client(driver, f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=200)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            await migrate(client["app"], recorders(1), wait_timeout=1.5)
    finally:
        await close_client(client)

    elapsed = time.monotonic() - started
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "within 1.5 s (wait_timeout)" in str(caught.value)
    assert elapsed >= 1.5  # it kept retrying until the deadline, not less


async def test_server_that_comes_up_late_is_waited_for(
    driver: str, tmp_path: Path, bootmigrate_log: Any
) -> None:
    if "MONGODB_URI" in __import__("os").environ:
        pytest.skip("starts its own server to bring it up late")
    server = SecantusDaemon(tmp_path / "late")
    client = make_client(driver, server.uri, serverSelectionTimeoutMS=300)
    outcome: dict[str, Any] = {}

    async def boot() -> None:
        outcome["report"] = await migrate(client["app"], recorders(1, 2), wait_timeout=60)

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(boot)
                await bootmigrate_log.wait_for("MongoDB unreachable")
                server.start(wait=False)
    finally:
        await close_client(client)
        server.stop()

    assert outcome["report"].applied == [1, 2]
