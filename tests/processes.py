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

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_event(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next JSON line the worker prints; fails if it exits without one."""
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
        """The worker's result event once it has exited, with its ``exit_code`` and ``pid``."""
        event = self.read_event(timeout)
        while event.get("event") != "result":
            event = self.read_event(timeout)
        self.process.wait(timeout=timeout)
        event["exit_code"] = self.process.returncode
        event["pid"] = self.pid
        return event

    def kill(self) -> None:
        """SIGKILL the worker if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@dataclass(frozen=True)
class Replicas:
    """The replicas of one service under test: each is a worker process booting against the
    same server (``uri``), database, driver and migrations. ``db`` is the test's own
    synchronous handle on that database, for its reads and writes."""

    uri: str
    db: Any
    driver: str
    migrations: Path

    def start(
        self,
        *,
        barrier: bool = False,
        env: dict[str, str] | None = None,
        pause_on: str | None = None,
        sigterm_on: str | None = None,
        announce: str | None = None,
        **options: Any,
    ) -> Worker:
        """One replica booting in a process of its own, calling ``migrate(**options)``.

        ``barrier``: it connects, reports ready, then waits for :meth:`Worker.go`.
        ``pause_on``/``sigterm_on``: it freezes at, or sends itself SIGTERM at, the first
        bootmigrate log line containing that text (see worker_main.py); ``announce``: it
        reports ``{"event": "announced"}`` there and goes on.
        """
        args = [
            sys.executable,
            str(WORKER_SCRIPT),
            "--uri",
            self.uri,
            "--db",
            self.db.name,
            "--driver",
            self.driver,
            "--migrations",
            str(self.migrations),
            "--options",
            json.dumps(options),
        ]
        if barrier:
            args.append("--barrier")
        if pause_on:
            args += ["--pause-on", pause_on]
        if sigterm_on:
            args += ["--sigterm-on", sigterm_on]
        if announce:
            args += ["--announce", announce]
        process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        return Worker(process)


def boot(replicas: Replicas, **options: Any) -> dict[str, Any]:
    """One replica booted to the end: its result (see :meth:`Worker.result`)."""
    worker = replicas.start(**options)
    try:
        return worker.result()
    finally:
        worker.kill()


def race(replicas: Replicas, count: int, **options: Any) -> list[dict[str, Any]]:
    """``count`` replicas that call ``migrate(**options)`` at the same moment: each is held
    at a barrier until all have connected, then all are released together. Their results,
    in the order they were started."""
    workers = [replicas.start(barrier=True, **options) for _ in range(count)]
    try:
        for worker in workers:
            assert worker.read_event()["event"] == "ready"
        for worker in workers:  # all connected and waiting: release them together
            worker.go()
        return [worker.result() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()


def start_blocked_holder(
    replicas: Replicas, at: int, env: dict[str, str] | None = None, **options: Any
) -> Worker:
    """A replica that takes the lock and stays inside migration ``at`` (RECORDING_MIGRATION
    blocks there), returned once its record shows it got there."""
    holder = replicas.start(env={**(env or {}), "BM_BLOCK_AT": str(at)}, **options)
    try:
        wait_until(
            lambda: replicas.db.ran.find_one({"version": at, "pid": holder.pid}),
            30,
            f"the holder to enter migration {at}",
        )
    except BaseException:
        holder.kill()
        raise
    return holder


def start_paused_holder(replicas: Replicas, pause_on: str, **options: Any) -> Worker:
    """A replica frozen, event loop and heartbeat included, at the first bootmigrate log line
    containing ``pause_on``; returned once it reports so. :meth:`Worker.go` resumes it."""
    holder = replicas.start(pause_on=pause_on, **options)
    try:
        assert [holder.read_event()["event"] for _ in range(2)] == ["ready", "paused"]
    except BaseException:
        holder.kill()
        raise
    return holder
