"""Run every benchmark and print the tables: `make bench` (or `python benchmarks/run.py`).

Against a SecantusDB server of its own (a replica set, so change streams are available, and a
`--standalone` one for the polling fallback), or the MongoDB in MONGODB_URI when set. The
method and what dominates each figure are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boot_cost
import boot_files
import compare
import handoff
import import_cost
import waiter_load
from common import server, table


def boot_rows(
    ours: list[dict[str, Any]], others: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    base = float(ours[0]["migrate ms (median)"])
    rows = [
        {
            "tool": f"{r['algorithm']} ({r['driver']})",
            "round trips": r["round trips"],
            "bare find ms": r["find_one ms (median)"],
            "ms (median)": r["migrate ms (median)"],
            "ms (p95)": r["migrate ms (p95)"],
            "vs bare find": r["ratio"],
            "vs bootmigrate": f"{float(r['migrate ms (median)']) / base:.2f}",
        }
        for r in ours
    ]
    for tool, figures in others.items():
        up = figures["upToDate"]
        rows.append(
            {
                "tool": tool,
                "round trips": up.get("trips", "n/a"),
                "bare find ms": f"{up['bare']:.3f}",
                "ms (median)": f"{up['median']:.3f}",
                "ms (p95)": f"{up['p95']:.3f}",
                "vs bare find": f"{up['median'] / up['bare']:.2f}",
                "vs bootmigrate": f"{up['median'] / base:.2f}",
            }
        )
    return rows


def migration_rows(
    ours: list[dict[str, Any]], others: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    base = float(ours[0]["ms per migration"])
    model = next(float(r["ms per migration"]) for r in ours if r["algorithm"] == "rocketchat")
    rows = [
        {
            "tool": f"{r['algorithm']} ({r['driver']})",
            "ms per migration": r["ms per migration"],
            "round trips per migration": r["round trips per migration"],
            "vs bootmigrate": f"{float(r['ms per migration']) / base:.2f}",
            "vs Rocket.Chat model": f"{float(r['ms per migration']) / model:.2f}",
        }
        for r in ours
    ]
    for tool, figures in others.items():
        each = figures["perMigration"]
        per = each["ms"] / each["count"]
        trips = f"{each['trips'] / each['count']:.2f}" if "trips" in each else "n/a"
        rows.append(
            {
                "tool": tool,
                "ms per migration": f"{per:.3f}",
                "round trips per migration": trips,
                "vs bootmigrate": f"{per / base:.2f}",
                "vs Rocket.Chat model": f"{per / model:.2f}",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer waiters, shorter waits")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, server: "
        f"{'MONGODB_URI' if os.environ.get('MONGODB_URI') else 'SecantusDB (embedded)'}\n"
    )

    with server() as uri:
        boot, each = boot_cost.run(uri)
        others = compare.run(uri)
    print(
        "1. up-to-date boot: one call with nothing pending (20 migrations known), against "
        "one bare find on the same connection"
    )
    print(table(boot_rows(boot, others)), "\n")
    print(
        "2. per-migration overhead: 200 migrations that do nothing (7 rounds, the cases taking "
        "turns; medians); "
        "'two bare writes' is one majority history insert and one majority version update "
        "per migration, and nothing else"
    )
    print(table(migration_rows(each, others)), "\n")

    sizes = [4, 16] if args.quick else [4, 16, 64]
    hold = 2.0 if args.quick else 5.0
    for label, extra in (
        ("replica set: change streams available", ()),
        ("standalone: polling", ("--standalone",)),
    ):
        if extra and os.environ.get("MONGODB_URI"):
            continue
        print(
            f"3-4. hand-off and load while waiting ({label}); the holder holds {hold:g} s "
            "after all waiters wait"
        )
        with server(*extra) as uri:
            rows = [handoff.measure(uri, n, hold) for n in sizes]
            if not args.quick:
                rows.append(handoff.measure(uri, 16, hold * 4))  # does load grow with time?
            rows.append(handoff.measure(uri, 16, hold, algorithm="rocketchat"))
        print(table(rows), "\n")

    print("5. import cost")
    print(table(import_cost.run()))

    runs = 10 if args.quick else 30
    print(
        "\n6. up-to-date boot from a migrations directory of 10, 100, 1000 files, a fresh "
        f"process per run (medians of {runs})"
    )
    with server() as uri:
        print(table(boot_files.run(uri, runs, ["pymongo", "motor"], [10, 100, 1000])), "\n")

    print("7. load while waiting on a holder that reports progress every 100 ms (4 waiters)")
    with server() as uri:
        print(table(waiter_load.run(uri)))


if __name__ == "__main__":
    main()
