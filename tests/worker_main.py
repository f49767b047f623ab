"""A process that calls ``bootmigrate.migrate()`` once, for the multi-process tests.

Prints JSON lines: ``{"event": "ready"}`` once connected, then (after "go" on stdin when
``--barrier`` is given) ``{"event": "result", ...}``. Exit status 0 on success, 1 on a
``MigrationError``, 143 when cancelled by SIGTERM.

``--pause-on TEXT`` freezes the process (event loop, heartbeat and all) at the first
bootmigrate log line containing TEXT, after printing ``{"event": "paused"}``, until the test
writes a line to its stdin (or kills it there). ``--sigterm-on TEXT`` sends this process
SIGTERM at that line instead. ``--announce TEXT`` prints ``{"event": "announced"}`` at that
line and goes on. SIGTERM cancels the ``migrate()`` call, as a service's shutdown would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootmigrate import MigrationError, migrate
from tests.clients import make_client


def emit(**event: object) -> None:
    print(json.dumps(event, default=str), flush=True)


class PauseAt(logging.Handler):
    """Blocks the whole process at a chosen point of bootmigrate's progress."""

    def __init__(self, fragment: str) -> None:
        super().__init__(logging.DEBUG)
        self.fragment = fragment

    def emit(self, record: logging.LogRecord) -> None:
        if self.fragment in record.getMessage():
            emit(event="paused", at=self.fragment)
            self.fragment = "\0"  # pause once
            # Blocks the event loop on purpose until the test writes a line (or kills us).
            if not sys.stdin.readline():
                time.sleep(3600)


class SignalAt(logging.Handler):
    """Sends this process SIGTERM at a chosen point, as an orchestrator might."""

    def __init__(self, fragment: str) -> None:
        super().__init__(logging.DEBUG)
        self.fragment = fragment
        self.sent = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.sent and self.fragment in record.getMessage():
            self.sent = True
            emit(event="signalled", at=self.fragment)
            os.kill(os.getpid(), signal.SIGTERM)


class AnnounceAt(logging.Handler):
    """Tells the test when bootmigrate reached a chosen point, and goes on."""

    def __init__(self, fragment: str) -> None:
        super().__init__(logging.DEBUG)
        self.fragment = fragment

    def emit(self, record: logging.LogRecord) -> None:
        if self.fragment in record.getMessage():
            emit(event="announced", at=self.fragment)
            self.fragment = "\0"  # once


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--driver", required=True)
    parser.add_argument("--migrations", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--barrier", action="store_true")
    parser.add_argument("--pause-on")
    parser.add_argument("--sigterm-on")
    parser.add_argument("--announce")
    args = parser.parse_args()
    logger = logging.getLogger("bootmigrate")
    logger.setLevel(logging.DEBUG)
    if args.pause_on:
        logger.addHandler(PauseAt(args.pause_on))
    if args.sigterm_on:
        logger.addHandler(SignalAt(args.sigterm_on))
    if args.announce:
        logger.addHandler(AnnounceAt(args.announce))
    client = make_client(args.driver, args.uri)
    db = client[args.db]
    await db.command("ping")  # connect before the barrier so the start is simultaneous
    emit(event="ready")
    if args.barrier:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    with anyio.CancelScope() as scope:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, scope.cancel)
        try:
            report = await migrate(db, args.migrations, **json.loads(args.options))
        except MigrationError as exc:
            emit(event="result", ok=False, error=type(exc).__name__, message=str(exc))
            return 1
        emit(
            event="result",
            ok=True,
            holder=report.holder,
            applied=report.applied,
            waited=report.waited,
            from_version=report.from_version,
            to_version=report.to_version,
        )
        return 0
    emit(event="result", ok=False, error="Cancelled", message="cancelled by SIGTERM")
    return 143


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
