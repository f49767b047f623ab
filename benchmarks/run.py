"""Run every benchmark and print the tables: `make bench` (or `python benchmarks/run.py`).

Against a SecantusDB server of its own (a replica set, so change streams are available, and a
`--standalone` one for the polling fallback), or the MongoDB in MONGODB_URI when set.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boot_cost
import handoff
import import_cost
from common import server, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer waiters, shorter waits")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, server: "
        f"{'MONGODB_URI' if os.environ.get('MONGODB_URI') else 'SecantusDB (embedded)'}\n"
    )

    print("1. up-to-date boot: migrate() with nothing pending vs one bare find_one")
    with server() as uri:
        boot, each = boot_cost.run(uri)
        print(table(boot), "\n")
        print("2. per-migration overhead: 200 migrations that do nothing")
        print(table(each), "\n")

    sizes = [4, 16] if args.quick else [4, 16, 64]
    hold = 2.0 if args.quick else 5.0
    for label, extra in (
        ("replica set (change streams available)", ()),
        ("standalone (polling)", ("--standalone",)),
    ):
        if extra and os.environ.get("MONGODB_URI"):
            continue
        print(f"3-4. hand-off and load while waiting, {label}; all wait {hold:g} s")
        with server(*extra) as uri:
            rows = [handoff.measure(uri, n, hold) for n in sizes]
            if not args.quick:
                rows.append(handoff.measure(uri, 16, hold * 4))  # does load grow with time?
        print(table(rows), "\n")

    print("5. import cost")
    print(table(import_cost.run()))


if __name__ == "__main__":
    main()
