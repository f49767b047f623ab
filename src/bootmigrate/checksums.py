"""Applied migrations whose code changed or disappeared since they ran.

Each applied migration's history record keeps a checksum of its source; comparing those with
the migrations this build ships finds edits to migrations that already ran (which would never
run again) without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .migrations import Migration


@dataclass(frozen=True)
class Drift:
    """One migration whose record and code disagree: applied with other code (``changed``),
    applied and no longer shipped (``missing``), or shipped below the database's version and
    never run (``out_of_order``)."""

    version: int
    name: str
    problem: Literal["changed", "missing", "out_of_order"]
    recorded: str
    current: str | None

    def describe(self) -> str:
        if self.problem == "out_of_order":
            return (
                f"migration {self.version} {self.name} is below the database's version but "
                "was never applied nor skipped (out of order)"
            )
        if self.problem == "missing":
            return f"migration {self.version} {self.name} was applied but is no longer shipped"
        return f"migration {self.version} {self.name} changed since it was applied"


async def find_drift(history: Any, known: list[Migration], version: int) -> list[Drift]:
    """Compare the checksums recorded for applied migrations (up to ``version``, the database's
    version) with the migrations in ``known``. Versions older than the oldest one shipped are
    not reported: removing those is how a release drops old migrations (its floor)."""
    ran_or_accepted = {
        "$or": [
            {"outcome": "applied", "direction": {"$in": ["up", "rerun"]}},
            {"action": "repair"},  # an operator accepted the code as it is now
        ],
        "checksum": {"$ne": None},
    }
    records = await history.find(
        ran_or_accepted,
        {"version": 1, "name": 1, "checksum": 1},
        sort=[("finished_at", 1), ("_id", 1)],
    ).to_list(None)
    last_applied = {record["version"]: record for record in records}  # the latest one wins
    shipped = {migration.version: migration for migration in known}
    oldest = known[0].version if known else None
    found = []
    for number, record in sorted(last_applied.items()):
        if number > version:
            continue  # reverted since
        migration = shipped.get(number)
        if migration is None:
            if oldest is not None and number >= oldest:
                found.append(Drift(number, record["name"], "missing", record["checksum"], None))
        elif migration.checksum and migration.checksum != record["checksum"]:
            found.append(
                Drift(number, migration.name, "changed", record["checksum"], migration.checksum)
            )
    return found
