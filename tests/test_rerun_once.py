"""One request, one run: a rerun asked for at boot (``MIGRATION_VERSION=N,rerun`` or
``rerun=N``) runs once per build, however many replicas boot with it; the operator's
``bootmigrate rerun N`` always runs; a boot that asks for no rerun never reads the history."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pymongo import monitoring

from bootmigrate import migrate
from tests.clients import open_client
from tests.in_process import history, ran, recorders
from tests.migration_files import recording_migrations
from tests.operator_cli import Cli
from tests.processes import Replicas, boot, race

REPLICAS = 8


@pytest.mark.multiprocess
@pytest.mark.parametrize("asked_by", ["MIGRATION_VERSION", "rerun option"])
def test_eight_replicas_asking_for_a_rerun_run_it_once(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, asked_by: str
) -> None:
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3, seconds=0.3))
    assert boot(replicas)["exit_code"] == 0
    if asked_by == "MIGRATION_VERSION":
        request: dict[str, Any] = {"env": {"MIGRATION_VERSION": "2,rerun"}}
    else:
        request = {"rerun": 2}

    results = race(replicas, REPLICAS, build="7.1.0", wait_timeout=60, lease=5, **request)

    assert [r["exit_code"] for r in results] == [0] * REPLICAS, results
    assert Counter(d["version"] for d in sync_db.ran.find()) == {1: 1, 2: 2, 3: 1}
    ran_it = [r for r in results if r["applied"] == [2]]
    assert len(ran_it) == 1, results
    reruns = list(sync_db.migrations_history.find({"direction": "rerun"}))
    assert [(h["outcome"], h["build"], h["pid"]) for h in reruns] == [
        ("applied", "7.1.0", ran_it[0]["pid"])
    ]
    doc = sync_db.migrations.find_one({"_id": "control"})
    assert (doc["locked"], doc["version"]) == (False, 3)

    # The same request booted again later is still done; a new build's is a new request.
    assert boot(replicas, build="7.1.0", **request)["applied"] == []
    assert boot(replicas, build="7.2.0", **request)["applied"] == [2]


@pytest.mark.anyio
async def test_a_replica_that_finds_the_rerun_done_says_by_whom_and_does_nothing(
    db: Any, bootmigrate_log: Any
) -> None:
    migrations = recorders(1, 2, 3)
    await migrate(db, migrations)
    assert (await migrate(db, migrations, rerun=2, build="b1")).applied == [2]
    writes_before = len(await history(db))

    report = await migrate(db, migrations, rerun=2, build="b1")

    assert (report.applied, report.holder, report.to_version) == ([], False, 3)
    assert len(await history(db)) == writes_before
    done = [r for r in bootmigrate_log.records if getattr(r, "event", None) == "rerun_already_done"]
    assert len(done) == 1 and "already done by" in done[0].getMessage()
    assert (done[0].migration_version, done[0].build) == (2, "b1")
    assert [v for v, _ in await ran(db)].count(2) == 2


def test_the_operator_command_always_runs(cli: Cli) -> None:
    assert cli("up", "--yes").returncode == 0

    for _ in range(2):
        done = cli("rerun", "2", "--yes", BOOTMIGRATE_BUILD="ops")
        assert done.returncode == 0, done.stderr

    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 2, 2, 2, 3]


class Commands(monitoring.CommandListener):
    """The commands a client sends, by name and collection."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent.append((event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.mark.anyio
async def test_an_up_to_date_boot_sends_one_command_and_reads_no_history(
    db: Any, driver: str, mongo_uri: str
) -> None:
    migrations = recorders(1, 2, 3)
    await migrate(db, migrations)
    await migrate(db, migrations, rerun=2, build="b1")  # history holds a rerun
    listener = Commands()
    async with open_client(driver, mongo_uri, event_listeners=[listener]) as client:
        await client.admin.command("ping")  # connect first: the handshake is not the boot
        listener.sent.clear()

        await migrate(client[db.name], migrations, build="b1")
        sent = list(listener.sent)  # before closing the client, which ends its sessions

    assert sent == [("find", "migrations")]
