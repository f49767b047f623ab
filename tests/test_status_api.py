"""``bootmigrate.status()``: the typed object the CLI prints, for a service's own endpoints."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

import bootmigrate
from tests.operator_cli import Cli

pytestmark = pytest.mark.anyio


async def test_status_is_what_the_cli_prints(db: Any, cli: Cli) -> None:
    migrations = str(cli.migrations)
    found = await bootmigrate.status(db, migrations)
    assert (found.state, found.version, found.latest) == ("pending", 0, 3)
    assert [step.migration.version for step in found.pending] == [1, 2, 3]

    await bootmigrate.migrate(db, migrations, target=2)
    found = await bootmigrate.status(db, migrations)
    printed = await anyio.to_thread.run_sync(cli.json, "status")
    assert isinstance(found, bootmigrate.Status)
    assert (found.state, found.version) == ("pending", 2)
    assert json.loads(json.dumps(found.as_json(), default=str)) == printed


async def test_status_reports_a_stuck_lock_without_touching_it(db: Any, cli: Cli) -> None:
    stuck = {
        "_id": "control",
        "locked": True,
        "version": 1,
        "failure": {"kind": "failed", "version": 2, "direction": "up", "error": "boom"},
    }
    await db.migrations.insert_one(stuck)
    found = await bootmigrate.status(db, str(cli.migrations))
    assert found.state == "stuck"
    assert found.lock.failure is not None and found.lock.failure["error"] == "boom"
    assert await db.migrations.find_one({"_id": "control"}) == stuck
