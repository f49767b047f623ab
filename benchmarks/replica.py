"""One booting replica for the hand-off benchmark: migrate(), then report as JSON.

Prints ``{"event": "started"}`` once connected, ``{"event": "waiting"}`` when bootmigrate
starts waiting for another replica, then
``{"event": "done", "end": <wall clock>, "commands": <count>, "waited": <s>, ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rocketchat_model
from common import Commands, client, close

from bootmigrate import load_migrations, migrate


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


class OnWaiting(logging.Handler):
    """Reports when bootmigrate starts waiting (the Rocket.Chat model says nothing)."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "waiting":
            emit(event="waiting")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--driver", default="pymongo")
    parser.add_argument("--migrations", required=True)
    parser.add_argument("--algorithm", choices=["bootmigrate", "rocketchat"], default="bootmigrate")
    args = parser.parse_args()
    logger = logging.getLogger("bootmigrate")
    logger.setLevel(logging.INFO)
    logger.addHandler(OnWaiting())
    commands = Commands()
    mongo = client(args.driver, args.uri, event_listeners=[commands])
    db = mongo[args.db]
    await db.command("ping")
    emit(event="started")
    before = len(commands.names)
    if args.algorithm == "rocketchat":
        started = time.time()
        steps = [(m.version, m.up) for m in load_migrations(args.migrations)]
        holder = await rocketchat_model.migrate(db, steps)
        end = time.time()
        waited = 0.0 if holder else end - started
    else:
        report = await migrate(db, args.migrations, wait_timeout=600)
        end, waited, holder = time.time(), report.waited, report.holder
    emit(event="done", end=end, commands=len(commands.names) - before, waited=waited, holder=holder)
    await close(mongo)


if __name__ == "__main__":
    asyncio.run(main())
