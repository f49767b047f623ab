"""One booting replica for the hand-off benchmark: migrate(), then report as JSON.

Prints ``{"event": "waiting"}`` when bootmigrate starts waiting for another replica, then
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

from common import Commands, client, close

from bootmigrate import migrate


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


class OnWaiting(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "waiting":
            emit(event="waiting")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--driver", default="pymongo")
    parser.add_argument("--migrations", required=True)
    args = parser.parse_args()
    logger = logging.getLogger("bootmigrate")
    logger.setLevel(logging.INFO)
    logger.addHandler(OnWaiting())
    commands = Commands()
    mongo = client(args.driver, args.uri, event_listeners=[commands])
    db = mongo[args.db]
    await db.command("ping")
    before = len(commands.names)
    report = await migrate(db, args.migrations, wait_timeout=600)
    end = time.time()
    emit(
        event="done",
        end=end,
        commands=len(commands.names) - before,
        waited=report.waited,
        holder=report.holder,
    )
    await close(mongo)


if __name__ == "__main__":
    asyncio.run(main())
