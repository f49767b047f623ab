"""The fault suite: real processes, a real server, faults injected; each scenario checks the
end state of the database, the control document and the history.

CI runs every scenario at a reduced scale; ``make test-faults`` (BOOTMIGRATE_FAULTS=full) runs
them at full scale.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from pymongo import MongoClient

FULL = os.environ.get("BOOTMIGRATE_FAULTS") == "full"


def scale(ci: int, full: int) -> int:
    """How many runs (or processes) a scenario uses in this mode."""
    return full if FULL else ci


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def sync_db(mongo_uri: str, db_name: str) -> Any:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    yield client[db_name]
    client.drop_database(db_name)
    client.close()
