"""Benchmark 6: the up-to-date boot as a service does it, from a migrations directory.

Each run is a fresh process (as a replica starting), with a directory of 10, 100 or 1000
migration files and the database already at the latest version. In that process: one bare
``find_one`` on the control document warms the connection, then one more is timed, then
``migrate(db, directory)``; the medians over the runs are printed, and how many migration
modules the boot imported (it should be none).

    python benchmarks/boot_files.py [--runs 30] [--driver pymongo] [--files 10 100 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, client, close, server, table

MIGRATION = '''"""Add field {version} to every order."""

idempotent = True


async def up(db):
    await db.orders.update_many({{}}, {{"$set": {{"f{version}": 0}}}})


async def down(db):
    await db.orders.update_many({{}}, {{"$unset": {{"f{version}": ""}}}})
'''


def write_directory(parent: Path, count: int) -> Path:
    directory = parent / f"migrations_{count}"
    if directory.exists():  # made for another driver
        return directory
    directory.mkdir()
    for version in range(1, count + 1):
        (directory / f"{version:04d}_add_field_{version}.py").write_text(
            MIGRATION.format(version=version)
        )
    return directory


async def child(driver: str, uri: str, name: str, directory: str) -> None:
    """One booting replica: import bootmigrate, warm the connection, time a bare find, then
    migrate()."""
    started = time.perf_counter()
    from bootmigrate import migrate

    imported = time.perf_counter() - started
    mongo = client(driver, uri)
    db = mongo[name]
    try:
        await db.migrations.find_one({"_id": "control"})  # connect, warm
        started = time.perf_counter()
        await db.migrations.find_one({"_id": "control"})
        bare = time.perf_counter() - started
        started = time.perf_counter()
        report = await migrate(db, directory)
        ours = time.perf_counter() - started
    finally:
        await close(mongo)
    steps = [m for m in sys.modules if m.startswith("_bootmigrate_") and "package" not in m]
    print(bare, ours, report.to_version, len(steps), imported)


async def prepare(driver: str, uri: str, name: str, count: int) -> None:
    """The database at version ``count``, as if every migration had run."""
    mongo = client(driver, uri)
    try:
        await mongo[name].migrations.insert_one(
            {"_id": "control", "version": count, "locked": False}
        )
    finally:
        await close(mongo)


def measure(uri: str, driver: str, count: int, runs: int, parent: Path) -> dict[str, Any]:
    directory = write_directory(parent, count)
    name = f"bench_files_{uuid.uuid4().hex[:8]}"
    asyncio.run(prepare(driver, uri, name, count))
    bare, ours, imports, imported = [], [], [], 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ROOT) / "src"), ROOT])}
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, __file__, "--child", driver, uri, name, str(directory)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.split()
        if int(out[2]) != count:
            raise RuntimeError(f"the database is at {out[2]}, expected {count}")
        bare.append(float(out[0]))
        ours.append(float(out[1]))
        imports.append(float(out[4]))
        imported = max(imported, int(out[3]))
    median_bare = statistics.median(bare) * 1000
    median_ours = statistics.median(ours) * 1000
    return {
        "files": count,
        "driver": driver,
        "bare find_one ms": f"{median_bare:.3f}",
        "migrate() ms": f"{median_ours:.3f}",
        "over bare ms": f"{median_ours - median_bare:.3f}",
        "modules imported": imported,
        "import bootmigrate ms": f"{statistics.median(imports) * 1000:.1f}",
        "runs": runs,
    }


def run(uri: str, runs: int, drivers: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bootmigrate-files-") as parent:
        return [
            measure(uri, driver, count, runs, Path(parent)) for driver in drivers for count in sizes
        ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        asyncio.run(child(*sys.argv[2:6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="fresh processes per size")
    parser.add_argument("--driver", action="append", choices=["pymongo", "motor"])
    parser.add_argument("--files", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    with server() as uri:
        rows = run(uri, args.runs, args.driver or ["pymongo"], args.files)
    print(
        "6. up-to-date boot from a migrations directory, a fresh process per run "
        f"(medians of {args.runs})"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
