"""Test helpers: the test server, clients for both drivers, migration files, worker processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient

DRIVERS = ("motor", "pymongo")
WORKER = Path(__file__).with_name("worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class SecantusDaemon:
    """A SecantusDB server in its own process, so tests can kill and restart it."""

    def __init__(self, storage: Path, port: int | None = None, *extra: str) -> None:
        self.storage = storage
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, wait: bool = True) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--storage-path",
                str(self.storage),
                "--log-level",
                "WARNING",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri, serverSelectionTimeoutMS=200)
        try:

            def ready() -> bool:
                assert self.process is not None and self.process.poll() is None, "server exited"
                try:
                    client.admin.command("ping")
                    return True
                except Exception:
                    return False

            wait_until(ready, timeout, "the test server to accept connections", every=0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def make_client(driver: str, uri: str, **options: Any) -> Any:
    if driver == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient

        return AsyncIOMotorClient(uri, **options)
    from pymongo import AsyncMongoClient

    return AsyncMongoClient(uri, **options)


async def close_client(client: Any) -> None:
    result = client.close()
    if hasattr(result, "__await__"):
        await result


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    """Write migration modules (file name -> source) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (directory / name).write_text(textwrap.dedent(source))
    return directory


# A migration for process tests: records which process ran it and what the control document
# said at that moment; blocks forever when BM_BLOCK_AT names its version (to be killed/paused).
RECORDING_MIGRATION = """
import asyncio, os

idempotent = {idempotent}

async def up(db):
    control = await db.migrations.find_one({{"_id": "control"}})
    await db.ran.insert_one({{"version": {version}, "pid": os.getpid(), "control": control}})
    if os.environ.get("BM_BLOCK_AT") == "{version}":
        while True:
            await asyncio.sleep(0.05)
    await asyncio.sleep({seconds})
"""


def recording_migrations(
    directory: Path, count: int, seconds: float | list[float] = 0.0, idempotent: bool = False
) -> Path:
    """``count`` recording migrations; ``seconds`` is each one's duration (or one for all)."""
    durations = seconds if isinstance(seconds, list) else [seconds] * count
    return write_migrations(
        directory,
        {
            f"{v:04d}_step_{v}.py": RECORDING_MIGRATION.format(
                version=v, seconds=durations[v - 1], idempotent=idempotent
            )
            for v in range(1, count + 1)
        },
    )


@dataclass
class Worker:
    """A real OS process that calls ``migrate()`` once and reports on stdout as JSON."""

    process: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        *,
        uri: str,
        db: str,
        driver: str,
        migrations: Path,
        barrier: bool = False,
        env: dict[str, str] | None = None,
        pause_on: str | None = None,
        sigterm_on: str | None = None,
        **options: Any,
    ) -> Worker:
        args = [
            sys.executable,
            str(WORKER),
            "--uri",
            uri,
            "--db",
            db,
            "--driver",
            driver,
            "--migrations",
            str(migrations),
            "--options",
            json.dumps(options),
        ]
        if barrier:
            args.append("--barrier")
        if pause_on:
            args += ["--pause-on", pause_on]
        if sigterm_on:
            args += ["--sigterm-on", sigterm_on]
        process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_event(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()  # workers flush each line; exit closes stdout
        if not line:
            _, err = self.process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            raise AssertionError(f"worker {self.pid} exited without reporting: {err}")
        event: dict[str, Any] = json.loads(line)
        self.lines.append(event)
        return event

    def go(self) -> None:
        """Release the barrier, or resume a paused worker."""
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        event = self.read_event(timeout)
        while event.get("event") != "result":
            event = self.read_event(timeout)
        self.process.wait(timeout=timeout)
        event["exit_code"] = self.process.returncode
        return event

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def start_blocked_holder(
    sync_db: Any,
    uri: str,
    driver: str,
    migrations: Path,
    at: int,
    env: dict[str, str] | None = None,
    **options: Any,
) -> Worker:
    """A worker that takes the lock and stays inside migration ``at`` (RECORDING_MIGRATION
    blocks there), returned once its record shows it got there."""
    holder = Worker.start(
        uri=uri,
        db=sync_db.name,
        driver=driver,
        migrations=migrations,
        env={**(env or {}), "BM_BLOCK_AT": str(at)},
        **options,
    )
    wait_until(
        lambda: sync_db.ran.find_one({"version": at, "pid": holder.pid}),
        30,
        f"the holder to enter migration {at}",
    )
    return holder
