"""Shared by the benchmark scripts: a server to measure against, clients, command counting."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pymongo import MongoClient, monitoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextmanager
def server(*extra: str) -> Iterator[str]:
    """``MONGODB_URI`` when set, else a SecantusDB daemon of our own for the duration."""
    if os.environ.get("MONGODB_URI") and not extra:
        yield os.environ["MONGODB_URI"]
        return
    with tempfile.TemporaryDirectory(prefix="bootmigrate-bench-") as data:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--storage-path",
                data,
                "--log-level",
                "WARNING",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        try:
            wait_ready(uri)
            yield uri
        finally:
            process.terminate()
            process.wait(timeout=15)


def wait_ready(uri: str, timeout: float = 30.0) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=200)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.admin.command("ping")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


class Commands(monitoring.CommandListener):
    """Counts the commands a client sends (each one a round trip)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def client(driver: str, uri: str, **options: Any) -> Any:
    if driver == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient

        return AsyncIOMotorClient(uri, **options)
    from pymongo import AsyncMongoClient

    return AsyncMongoClient(uri, **options)


async def close(client: Any) -> None:
    closing = client.close()
    if closing is not None:
        await closing


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p95_ms(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.95) - 1] * 1000


def table(rows: list[dict[str, Any]]) -> str:
    """An aligned text table of ``rows`` (same keys in each)."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
