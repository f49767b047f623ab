"""mongodb-migrations (PyPI) on workloads 1 and 2, through its MigrationManager, for
benchmarks/compare.py. Runs in a virtual environment of its own (it is synchronous PyMongo).

Usage: python mongodb_migrations_bench.py <mongodb-uri-with-database> <scratch-dir>
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

from mongodb_migrations.cli import MigrationManager
from mongodb_migrations.config import Configuration
from pymongo import MongoClient

MIGRATION = """from mongodb_migrations.base import BaseMigration


class Migration(BaseMigration):
    def upgrade(self):
        pass

    def downgrade(self):
        pass
"""


def migrations(scratch: Path, count: int) -> Path:
    folder = scratch / f"mm{count}_{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    for v in range(1, count + 1):
        (folder / f"{v:014d}_noop.py").write_text(MIGRATION)
    return folder


def run(uri: str, folder: Path) -> None:
    config = Configuration(
        {"mongo_url": uri, "mongo_migrations_path": str(folder), "metastore": "database_migrations"}
    )
    manager = MigrationManager(config)
    manager.migrations = {}  # a class attribute in the library: reset between runs
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per migration
        manager.run()


def main() -> None:
    uri, scratch = sys.argv[1], Path(sys.argv[2])
    client: MongoClient = MongoClient(uri)
    db = client.get_default_database()
    folder = migrations(scratch, 20)
    run(uri, folder)
    bare, ours = [], []
    for _ in range(100):
        started = time.perf_counter()
        db.database_migrations.find_one({"x": 1})
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        run(uri, folder)  # each run connects anew: that is how the tool works
        ours.append(time.perf_counter() - started)
    client.drop_database(db.name)
    folder = migrations(scratch, 200)
    started = time.perf_counter()
    run(uri, folder)
    each = time.perf_counter() - started
    assert db.database_migrations.count_documents({}) == 200
    client.drop_database(db.name)
    client.close()
    print(
        json.dumps(
            {
                "upToDate": {
                    "bare": statistics.median(bare) * 1000,
                    "median": statistics.median(ours) * 1000,
                    "p95": sorted(ours)[94] * 1000,
                },
                "perMigration": {"count": 200, "ms": each * 1000},
            }
        )
    )


if __name__ == "__main__":
    main()
