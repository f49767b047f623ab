"""A process that calls ``bootmigrate.migrate()`` once, for the multi-process tests.

Prints JSON lines: ``{"event": "ready"}`` once connected, then (after "go" on stdin when
``--barrier`` is given) ``{"event": "result", ...}``. Exit status 0 on success, 1 on a
``MigrationError``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootmigrate import MigrationError, migrate
from tests.support import make_client


def emit(**event: object) -> None:
    print(json.dumps(event, default=str), flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--driver", required=True)
    parser.add_argument("--migrations", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--barrier", action="store_true")
    args = parser.parse_args()
    client = make_client(args.driver, args.uri)
    db = client[args.db]
    await db.command("ping")  # connect before the barrier so the start is simultaneous
    emit(event="ready")
    if args.barrier:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
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


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
