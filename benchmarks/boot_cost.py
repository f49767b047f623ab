"""Benchmarks 1 and 2: the cost of migrate() when nothing is pending, against one bare
find_one on the same connection; and the overhead per applied migration."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import rocketchat_model
from common import Commands, client, close, median_ms, p95_ms

from bootmigrate import Migration, migrate


async def noop(db: Any) -> None:
    """A migration that does nothing, so only bootmigrate's own work is measured."""


def trivial(count: int) -> list[Migration]:
    return [Migration(version=v, up=noop, name=f"noop_{v}") for v in range(1, count + 1)]


async def run_algorithm(algorithm: str, db: Any, migrations: list[Migration]) -> None:
    if algorithm == "rocketchat":
        await rocketchat_model.migrate(db, [(m.version, m.up) for m in migrations])
    else:
        await migrate(db, migrations)


async def up_to_date(
    uri: str, driver: str, algorithm: str = "bootmigrate", calls: int = 300
) -> dict[str, Any]:
    commands = Commands()
    mongo = client(driver, uri, event_listeners=[commands])
    db = mongo[f"bench_{uuid.uuid4().hex[:8]}"]
    migrations = trivial(20)
    try:
        await run_algorithm(algorithm, db, migrations)
        await db.migrations.find_one({"_id": "control"})  # warm the connection
        bare, ours = [], []
        for _ in range(calls):  # interleaved, so drift affects both alike
            started = time.perf_counter()
            await db.migrations.find_one({"_id": "control"})
            bare.append(time.perf_counter() - started)
            before = len(commands.names)
            started = time.perf_counter()
            await run_algorithm(algorithm, db, migrations)
            ours.append(time.perf_counter() - started)
            trips = len(commands.names) - before
        await mongo.drop_database(db.name)
    finally:
        await close(mongo)
    return {
        "algorithm": algorithm,
        "driver": driver,
        "round trips": trips,
        "find_one ms (median)": f"{median_ms(bare):.3f}",
        "migrate ms (median)": f"{median_ms(ours):.3f}",
        "migrate ms (p95)": f"{p95_ms(ours):.3f}",
        "ratio": f"{median_ms(ours) / median_ms(bare):.2f}",
    }


async def per_migration(
    uri: str, driver: str, algorithm: str = "bootmigrate", count: int = 200
) -> dict[str, Any]:
    commands = Commands()
    mongo = client(driver, uri, event_listeners=[commands])
    db = mongo[f"bench_{uuid.uuid4().hex[:8]}"]
    try:
        await db.command("ping")
        before = len(commands.names)
        started = time.perf_counter()
        await run_algorithm(algorithm, db, trivial(count))
        elapsed = time.perf_counter() - started
        trips = len(commands.names) - before
        assert (await db.migrations.find_one({"_id": "control"}))["version"] == count
        await mongo.drop_database(db.name)
    finally:
        await close(mongo)
    return {
        "algorithm": algorithm,
        "driver": driver,
        "migrations": count,
        "total s": f"{elapsed:.3f}",
        "ms per migration": f"{elapsed / count * 1000:.3f}",
        "round trips per migration": f"{trips / count:.2f}",
        "round trips in all": trips,
    }


def run(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cases = [("bootmigrate", "pymongo"), ("bootmigrate", "motor"), ("rocketchat", "pymongo")]
    boot = [asyncio.run(up_to_date(uri, d, a)) for a, d in cases]
    each = [asyncio.run(per_migration(uri, d, a)) for a, d in cases]
    return boot, each
