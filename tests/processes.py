"""Worker processes: real OS processes that each call ``migrate()`` once, driven by a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.polling import wait_until

WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")


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
            str(WORKER_SCRIPT),
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
