"""The fault suite: real processes, a real server, faults injected; each scenario checks the
end state of the database, the control document and the history.

CI runs every scenario at a reduced scale; ``make test-faults`` (BOOTMIGRATE_FAULTS=full) runs
them at full scale.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from typing import Any

import pytest

FULL = os.environ.get("BOOTMIGRATE_FAULTS") == "full"


def scale(ci: int, full: int) -> int:
    """How many runs (or processes) a scenario uses in this mode."""
    return full if FULL else ci


# Per scenario: runs, processes, faults injected, double applies, lost writes. Filled by the
# tests, printed at the end of a serial run, and written to BOOTMIGRATE_FAULTS_REPORT if set:
# docs/reliability.md quotes these figures.
FIGURES: defaultdict[str, Counter[str]] = defaultdict(Counter)


def record(scenario: str, **counts: int) -> None:
    """Add ``counts`` to a scenario's figures; a name ending in ``_max`` keeps the largest."""
    for name, value in counts.items():
        figures = FIGURES[scenario]
        figures[name] = (
            max(figures[name], value) if name.endswith("_max") else figures[name] + value
        )


def double_applies(versions: list[int]) -> int:
    """How many times a migration ran beyond its first."""
    return sum(count - 1 for count in Counter(versions).values())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault suite figures")
    for scenario, counts in sorted(FIGURES.items()):
        terminalreporter.line(
            f"{scenario}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        )
    target = os.environ.get("BOOTMIGRATE_FAULTS_REPORT")
    if target:
        with open(target, "w") as out:
            json.dump({k: dict(v) for k, v in FIGURES.items()}, out, indent=2, sort_keys=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)
