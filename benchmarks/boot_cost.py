"""Benchmarks 1 and 2: the cost of migrate() when nothing is pending, against one bare
find_one on the same connection; and the overhead per applied migration."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import rocketchat_model
from common import Commands, client, close, median_ms, p95_ms
from pymongo import WriteConcern

from bootmigrate import Migration, migrate


async def noop(db: Any) -> None:
    """A migration that does nothing, so only bootmigrate's own work is measured."""


def trivial(count: int) -> list[Migration]:
    return [Migration(version=v, up=noop, name=f"noop_{v}") for v in range(1, count + 1)]


async def two_bare_writes(db: Any, migrations: list[Migration]) -> None:
    """The floor of any design that keeps a history beside the version, with both
    majority-acknowledged: per migration one history insert and one version update, sent bare
    by the driver, and nothing else (no lock, fence, name of the running step or retry)."""
    majority = WriteConcern("majority")
    control = db.get_collection("migrations", write_concern=majority)
    history = db.get_collection("migrations_history", write_concern=majority)
    await control.update_one({"_id": "control"}, {"$set": {"version": 0}}, upsert=True)
    for m in migrations:
        await m.up(db)
        await history.insert_one({"version": m.version, "name": m.name, "outcome": "applied"})
        await control.update_one({"_id": "control"}, {"$set": {"version": m.version}})


async def run_algorithm(algorithm: str, db: Any, migrations: list[Migration]) -> None:
    if algorithm == "rocketchat":
        await rocketchat_model.migrate(db, [(m.version, m.up) for m in migrations])
    elif algorithm == "two bare writes":
        await two_bare_writes(db, migrations)
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


async def one_call(uri: str, driver: str, algorithm: str, count: int) -> tuple[float, int]:
    """Seconds per migration and round trips of one call applying ``count`` migrations to a
    fresh database."""
    commands = Commands()
    mongo = client(driver, uri, event_listeners=[commands])
    try:
        db = mongo[f"bench_{uuid.uuid4().hex[:8]}"]
        await db.command("ping")
        before = len(commands.names)
        started = time.perf_counter()
        await run_algorithm(algorithm, db, trivial(count))
        per = (time.perf_counter() - started) / count
        trips = len(commands.names) - before
        assert (await db.migrations.find_one({"_id": "control"}))["version"] == count
        await mongo.drop_database(db.name)
    finally:
        await close(mongo)
    return per, trips


def per_migration(
    uri: str, cases: list[tuple[str, str]], count: int = 200, rounds: int = 7
) -> list[dict[str, Any]]:
    """Each case applies ``count`` migrations ``rounds`` times, the cases taking turns within
    a round (so that a slow spell of the machine falls on all of them): median time per
    migration, and the round trips of one call."""
    times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    trips: dict[tuple[str, str], int] = {}
    for _ in range(rounds):
        for algorithm, driver in cases:
            per, trips[algorithm, driver] = asyncio.run(one_call(uri, driver, algorithm, count))
            times[algorithm, driver].append(per)
    return [
        {
            "algorithm": algorithm,
            "driver": driver,
            "migrations": count,
            "ms per migration": f"{median_ms(times[algorithm, driver]):.3f}",
            "round trips per migration": f"{trips[algorithm, driver] / count:.2f}",
            "round trips in all": trips[algorithm, driver],
        }
        for algorithm, driver in cases
    ]


def run(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cases = [("bootmigrate", "pymongo"), ("bootmigrate", "motor"), ("rocketchat", "pymongo")]
    boot = [asyncio.run(up_to_date(uri, d, a)) for a, d in cases]
    each = per_migration(uri, [*cases, ("two bare writes", "pymongo")])
    return boot, each
