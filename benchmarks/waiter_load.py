"""Benchmark 6: what waiting replicas send while the holder's migration reports progress every
100 ms (each report a write to the control document), per waiter and per second."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Any

from common import Commands, client, close

from bootmigrate import Migration, migrate

# The table is the output; bootmigrate's own lines would bury it.
logging.getLogger("bootmigrate").setLevel(logging.WARNING)

PROGRESS_EVERY = 0.1


async def measure(
    uri: str, driver: str = "pymongo", waiters: int = 4, warmup: float = 2.0, window: float = 5.0
) -> dict[str, Any]:
    done, started = asyncio.Event(), asyncio.Event()
    reports = 0

    async def reporting(db: Any, ctx: Any) -> None:
        nonlocal reports
        started.set()
        while not done.is_set():
            reports += 1
            await ctx.progress(reports, 0)
            await asyncio.sleep(PROGRESS_EVERY)

    migrations = [Migration(version=1, up=reporting, name="reporting")]
    name = f"bench_{uuid.uuid4().hex[:8]}"
    holder = client(driver, uri)
    listeners = [Commands() for _ in range(waiters)]
    clients = [client(driver, uri, event_listeners=[c]) for c in listeners]
    try:
        holding = asyncio.ensure_future(migrate(holder[name], migrations))
        await started.wait()
        waiting = [
            asyncio.ensure_future(migrate(c[name], migrations, wait_timeout=120)) for c in clients
        ]
        await asyncio.sleep(warmup)  # past the first quick polls: the steady load
        for c in listeners:
            c.names.clear()
        at = reports
        await asyncio.sleep(window)
        sent = Counter(n for c in listeners for n in c.names)
        written = reports - at
        done.set()
        await asyncio.gather(holding, *waiting)
        await holder.drop_database(name)
    finally:
        for c in (holder, *clients):
            await close(c)
    total = sum(sent.values())
    return {
        "driver": driver,
        "waiters": waiters,
        "progress writes/s": f"{written / window:.1f}",
        "commands/s per waiter": f"{total / window / waiters:.2f}",
        "of which find": f"{sent['find'] / window / waiters:.2f}",
        "of which getMore": f"{sent['getMore'] / window / waiters:.2f}",
        "other": f"{(total - sent['find'] - sent['getMore']) / window / waiters:.2f}",
    }


def run(uri: str) -> list[dict[str, Any]]:
    return [asyncio.run(measure(uri, driver)) for driver in ("pymongo", "motor")]


if __name__ == "__main__":
    import sys

    from common import server, table

    with server() as uri:
        print(table(run(uri)))
    sys.exit(0)
