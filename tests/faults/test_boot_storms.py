"""Scenario 1: boot storms. Many processes call migrate() at the same moment, over and over,
with randomised migration durations: zero double applies, zero failures, one holder."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from tests.databases import run_database
from tests.faults.conftest import double_applies, record, scale
from tests.migration_files import recording_migrations
from tests.processes import Replicas, race

MIGRATIONS = 3


def test_boot_storms(sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path) -> None:
    storms, processes = scale(2, 20), scale(12, 32)
    rng = random.Random(f"{driver}-{storms}-{processes}")
    for storm in range(storms):
        with run_database(sync_db, storm) as db:
            durations = [round(rng.uniform(0.0, 0.3), 3) for _ in range(MIGRATIONS)]
            migrations = recording_migrations(tmp_path / str(storm), MIGRATIONS, seconds=durations)
            storm_once(Replicas(mongo_uri, db, driver, migrations), processes)


def storm_once(replicas: Replicas, processes: int) -> None:
    results = race(replicas, processes, wait_timeout=120, lease=5)
    db = replicas.db

    versions = [d["version"] for d in db.ran.find()]
    record(
        "1 boot storms",
        storms=1,
        processes=processes,
        double_applies=double_applies(versions),
        failures=sum(r["exit_code"] != 0 for r in results),
        holders=sum(bool(r.get("holder")) for r in results),
    )
    failures = [r for r in results if r["exit_code"] != 0]
    assert failures == [], failures
    assert sum(r["holder"] for r in results) == 1, results
    assert Counter(d["version"] for d in db.ran.find()) == {1: 1, 2: 1, 3: 1}
    control = db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"], control["token"]) == (False, 3, 1)
    assert db.migrations_history.count_documents({"outcome": "applied"}) == MIGRATIONS
