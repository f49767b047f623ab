"""Events: one per protocol step, in protocol order, to hooks and as log records; a hook
that raises changes nothing; the table in docs/events.md names every event and field."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import anyio
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from bootmigrate import ControlLocked, Migration, MigrationFailed, Settings, migrate
from bootmigrate.events import EVENT_NAMES, Event, EventFields
from bootmigrate.integrations.starlette import migrate_lifespan
from tests.clients import close_client, make_client
from tests.in_process import recorder, recorders
from tests.migration_files import recording_migrations, write_migrations
from tests.polling import wait_for, wait_past_lease, wait_until
from tests.processes import Replicas, start_blocked_holder

DOCS = Path(__file__).resolve().parent.parent / "docs" / "events.md"
# Which server this is, and what the lock should know of it: asked once per call that takes
# the lock, and told apart from the protocol's order here.
SERVER = ("server_detected", "server_warning")


def names(events: list[Any]) -> list[str]:
    """Event names in order, without the server's description."""
    found = [e.name if isinstance(e, Event) else e["name"] for e in events]
    return [n for n in found if n not in SERVER]


def named(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The first printed event called ``name``."""
    return next(e for e in events if e["name"] == name)


def documented() -> dict[str, set[str]]:
    """docs/events.md's table: each event's name and the fields it lists."""
    rows: dict[str, set[str]] = {}
    text = DOCS.read_text()
    table = text[text.index("## The events") : text.index("The fields:")]
    for line in table.splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|[^|]*\|[^|]*\|([^|]*)\|\s*$", line)
        if match:
            rows[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return rows


# -- order, in one process --------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_holder_and_an_up_to_date_boot_emit_their_steps_in_order(db: Any) -> None:
    seen: list[Event] = []

    report = await migrate(db, recorders(1, 2), on_event=seen.append)
    again: list[Event] = []
    await migrate(db, recorders(1, 2), on_event=again.append)

    assert report.applied == [1, 2]
    assert names(seen) == [
        "started",
        "acquired",
        "migration_started",
        "migration_applied",
        "migration_started",
        "migration_applied",
        "released",
        "migrations_done",
        "done",
    ]
    assert names(again) == ["started", "up_to_date", "done"]
    assert len({e.call_id for e in seen}) == 1
    assert seen[0].call_id != again[0].call_id  # two calls, told apart
    by_name = {e.name: e for e in seen}
    acquired, done = by_name["acquired"], by_name["done"]
    assert (acquired.db_version, acquired.target_version, acquired.token) == (0, 2, 1)
    assert acquired.holder is not None and acquired.holder["id"] == acquired.call_id
    applied = [e for e in seen if e.name == "migration_applied"]
    assert [(e.migration_version, e.migration_name, e.direction) for e in applied] == [
        (1, "step_1", "up"),
        (2, "step_2", "up"),
    ]
    assert [e.db_version for e in applied] == [1, 2]
    assert all(e.duration_s is not None and e.duration_s >= 0 for e in applied)
    assert (by_name["released"].reason, by_name["released"].db_version) == ("done", 2)
    assert (done.from_version, done.db_version, done.applied, done.held) == (0, 2, (1, 2), True)
    assert again[-1].held is False and again[-1].applied == ()


@pytest.mark.anyio
async def test_every_event_is_a_log_record_with_its_fields(db: Any, bootmigrate_log: Any) -> None:
    seen: list[Event] = []

    await migrate(db, recorders(1), on_event=seen.append)

    records = [r for r in bootmigrate_log.records if hasattr(r, "event")]
    assert [r.event for r in records] == [e.name for e in seen]
    for event, record in zip(seen, records, strict=True):
        assert record.getMessage() == event.message
        assert (record.levelno, record.call_id) == (event.level, event.call_id)
        assert all(getattr(record, k) == v for k, v in event.fields().items())
        # The record names the code that took the step, not the emitter.
        assert record.module in ("runner", "apply", "lock", "servers"), record.module


@pytest.mark.anyio
async def test_a_failed_migration_and_a_call_that_finds_the_lock_stuck(db: Any) -> None:
    async def broken(db: Any) -> None:
        raise RuntimeError("disk full")

    migrations = [recorder(1), Migration(version=2, up=broken, name="broken")]
    seen: list[Event] = []
    with pytest.raises(MigrationFailed):
        await migrate(db, migrations, on_event=seen.append)
    later: list[Event] = []
    with pytest.raises(ControlLocked):
        await migrate(db, migrations, on_event=later.append)

    assert names(seen)[-4:] == [
        "migration_applied",
        "migration_started",
        "migration_failed",
        "failed",
    ]
    failed_step, failed = seen[-2], seen[-1]
    assert (failed_step.migration_version, failed_step.stuck) == (2, True)
    assert failed_step.error == "RuntimeError: disk full"
    assert (failed.error_type, failed.stuck) == ("MigrationFailed", True)
    assert names(later) == ["started", "failed"]
    assert (later[-1].error_type, later[-1].reason, later[-1].stuck) == (
        "ControlLocked",
        "stuck",
        True,
    )


@pytest.mark.anyio
async def test_a_call_refused_over_an_unfinished_down_counts_as_stuck(db: Any) -> None:
    # A down from 2 to 1 that did not finish, the lock released: no up may step over it.
    await db.migrations.insert_one(
        {
            "_id": "control",
            "locked": False,
            "version": 2,
            "unfinished": {
                "version": 2,
                "name": "step_2",
                "direction": "down",
                "from_version": 2,
                "to_version": 1,
            },
        }
    )
    seen: list[Event] = []
    with pytest.raises(ControlLocked):
        await migrate(db, recorders(1, 2, 3), on_event=seen.append)
    assert (seen[-1].name, seen[-1].reason, seen[-1].stuck) == ("failed", "unfinished", True)


async def _cancelled_inside(db: Any, idempotent: bool) -> list[Event]:
    inside = anyio.Event()
    seen: list[Event] = []

    async def forever(db: Any) -> None:
        inside.set()
        await anyio.sleep_forever()

    migrations = [Migration(version=1, up=forever, name="forever", idempotent=idempotent)]
    with anyio.fail_after(10), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(
                lambda: migrate(db, migrations, shutdown_grace=0.2, on_event=seen.append)
            )
            await inside.wait()
            scope.cancel()
    return seen


@pytest.mark.anyio
async def test_a_holder_cancelled_inside_a_migration_says_interrupted(db: Any) -> None:
    seen = await _cancelled_inside(db, idempotent=False)

    assert names(seen)[-4:] == ["migration_started", "stop_requested", "interrupted", "cancelled"]
    assert seen[-3].shutdown_grace_s == 0.2
    assert (seen[-2].migration_version, seen[-2].stuck) == (1, True)
    assert seen[-1].stuck is True


@pytest.mark.anyio
async def test_a_holder_cancelled_inside_a_repeatable_migration_releases_it(db: Any) -> None:
    seen = await _cancelled_inside(db, idempotent=True)

    assert names(seen)[-5:] == [
        "migration_started",
        "stop_requested",
        "interrupted",
        "released",
        "cancelled",
    ]
    assert (seen[-3].stuck, seen[-2].reason, seen[-1].stuck) == (False, "interrupted", False)


@pytest.mark.anyio
async def test_a_wait_only_call_waits_for_the_version_then_is_done(db: Any, client: Any) -> None:
    release, inside = anyio.Event(), anyio.Event()
    waiter: list[Event] = []

    async def slow(db: Any) -> None:
        inside.set()
        await release.wait()

    migrations = [Migration(version=1, up=slow, name="slow")]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: migrate(db, migrations))
        await inside.wait()
        tasks.start_soon(
            lambda: migrate(client[db.name], migrations, apply=False, on_event=waiter.append)
        )
        await wait_for(lambda: any(e.name == "waiting" for e in waiter), 20, "waiting")
        release.set()

    assert names(waiter) == ["started", "waiting", "wait_done", "done"]
    waiting = waiter[1]
    assert (waiting.db_version, waiting.target_version) == (0, 1)
    assert waiting.holder is not None and waiting.holder["pid"] == os.getpid()
    assert waiter[-1].held is False and waiter[-1].waited_s is not None


# -- hooks ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_hook_that_raises_breaks_nothing_and_is_logged_once(
    db: Any, bootmigrate_log: Any
) -> None:
    def broken(event: Event) -> None:
        raise ValueError(f"bad hook at {event.name}")

    seen: list[Event] = []

    report = await migrate(db, recorders(1, 2), on_event=[broken, seen.append])

    assert report.applied == [1, 2]
    assert names(seen)[-1] == "done"  # the hook after it still saw every event
    failures = [r for r in bootmigrate_log.records if getattr(r, "event", None) == "hook_failed"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and "bad hook at started" in str(
        failures[0].exc_info[1]
    )
    doc = await db.migrations.find_one({"_id": "control"})
    assert (doc["locked"], doc["version"]) == (False, 2)


def test_on_event_is_checked_and_kept_as_a_tuple() -> None:
    def hook(event: Event) -> None:
        pass

    assert Settings(on_event=hook).on_event == (hook,)
    assert Settings(on_event=[hook, hook]).hooks == (hook, hook)
    assert Settings().hooks == ()
    with pytest.raises(ValueError, match="on_event"):
        Settings(on_event="print")
    with pytest.raises(ValueError, match="on_event"):
        Settings(on_event=[hook, 3])


def test_on_event_is_an_integration_option(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    seen: list[Event] = []
    app = Starlette(
        lifespan=migrate_lifespan(
            lambda app: app.state.client[db_name],
            recorders(1),
            lifespan=_client_lifespan(driver, mongo_uri),
            on_event=seen.append,
        )
    )

    with TestClient(app):
        pass

    assert names(seen)[-1] == "done" and seen[-1].applied == (1,)


def _client_lifespan(driver: str, uri: str) -> Any:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        app.state.client = make_client(driver, uri)
        yield
        await close_client(app.state.client)

    return lifespan


# -- order, between processes -----------------------------------------------------------------

GATED = """
import asyncio, os

async def up(db):
    await db.ran.insert_one({"version": 1, "pid": os.getpid()})
    while not os.path.exists(os.environ["BM_GATE"]):
        await asyncio.sleep(0.02)
"""


@pytest.mark.multiprocess
def test_a_holder_and_its_waiter_in_two_processes_emit_in_protocol_order(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    migrations = write_migrations(
        tmp_path / "m",
        {"0001_gated.py": GATED, "0002_plain.py": "async def up(db):\n    pass\n"},
    )
    gate = tmp_path / "gate"
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    env = {"BM_GATE": str(gate)}
    holder = replicas.start(env=env, print_events=True, wait_timeout=60)
    waiter = None
    try:
        wait_until(lambda: sync_db.ran.find_one({"version": 1}), 30, "the holder inside 0001")
        waiter = replicas.start(env=env, print_events=True, wait_timeout=60)
        while waiter.read_event().get("name") != "waiting":
            pass
        gate.touch()
        held, waited = holder.result(), waiter.result()
    finally:
        holder.kill()
        if waiter is not None:
            waiter.kill()

    assert (held["exit_code"], waited["exit_code"]) == (0, 0), (held, waited)
    assert names(holder.events()) == [
        "started",
        "acquired",
        "migration_started",
        "migration_applied",
        "migration_started",
        "migration_applied",
        "released",
        "migrations_done",
        "done",
    ]
    assert names(waiter.events()) == ["started", "waiting", "wait_done", "done"]
    waiting = named(waiter.events(), "waiting")
    # The waiter names the holder's call: the id on the lock is the holder's call id.
    assert waiting["holder"]["id"] == holder.events()[0]["call_id"]
    assert waiting["holder"]["pid"] == holder.pid
    assert (waiting["db_version"], waiting["running"]["version"]) == (0, 1)
    assert waiter.events()[-1]["waited_s"] > 0 and waiter.events()[-1]["held"] is False


@pytest.mark.multiprocess
def test_a_paused_holder_says_lock_lost_and_its_taker_took_over(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    lease = 1.5
    migrations = recording_migrations(tmp_path / "m", 2, idempotent=True)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    holder = start_blocked_holder(replicas, 1, lease=lease, print_events=True)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        paused = sync_db.migrations.find_one({"_id": "control"})
        wait_past_lease(sync_db, paused["heartbeat"], lease, "the paused holder's")
        taker = replicas.start(lease=lease, wait_timeout=30, print_events=True)
        taken = taker.result()
        os.kill(holder.pid, signal.SIGCONT)
        resumed = holder.result()
    finally:
        holder.kill()

    assert (taken["exit_code"], resumed["exit_code"]) == (0, 1), (taken, resumed)
    assert names(taker.events())[:4] == ["started", "waiting", "took_over", "acquired"]
    took_over = named(taker.events(), "took_over")
    assert (took_over["holder"]["pid"], took_over["running"]["version"]) == (holder.pid, 1)
    assert took_over["silent_s"] >= lease
    assert names(holder.events())[-3:] == ["migration_started", "lock_lost", "failed"]
    assert holder.events()[-1]["error_type"] == "LockLost"


@pytest.mark.multiprocess
def test_a_killed_holder_inside_a_plain_migration_is_marked_interrupted(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    lease = 1.5
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path / "m", 2))
    holder = start_blocked_holder(replicas, 1, lease=lease)
    os.kill(holder.pid, signal.SIGKILL)
    holder.kill()

    worker = replicas.start(lease=lease, wait_timeout=30, print_events=True)
    result = worker.result()

    assert (result["exit_code"], result["error"]) == (1, "ControlLocked")
    # Marking the lock is not taking it: the next look finds it stuck, and fails fast.
    assert names(worker.events()) == [
        "started",
        "waiting",
        "marked_interrupted",
        "acquire_missed",
        "failed",
    ]
    marked, failed = named(worker.events(), "marked_interrupted"), worker.events()[-1]
    assert (marked["migration_version"], marked["stuck"]) == (1, True)
    assert (failed["reason"], failed["stuck"]) == ("stuck", True)


@pytest.mark.multiprocess
def test_a_holder_sigtermed_inside_a_migration_says_interrupted_after_the_grace(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path / "m", 2))
    holder = start_blocked_holder(replicas, 2, shutdown_grace=0.5, print_events=True)
    try:
        holder.process.send_signal(signal.SIGTERM)
        result = holder.result()
    finally:
        holder.kill()

    assert (result["exit_code"], result["error"]) == (143, "Cancelled"), result
    assert names(holder.events())[-4:] == [
        "migration_started",
        "stop_requested",
        "interrupted",
        "cancelled",
    ]
    interrupted, cancelled = holder.events()[-2], holder.events()[-1]
    assert (interrupted["migration_version"], interrupted["stuck"]) == (2, True)
    assert interrupted["duration_s"] >= 0.5
    assert cancelled["stuck"] is True


# -- the documentation ------------------------------------------------------------------------


def test_every_event_is_in_the_table_and_nothing_else() -> None:
    assert sorted(documented()) == sorted(EVENT_NAMES)


def test_the_table_names_only_fields_events_have() -> None:
    known = {f.name for f in fields(Event)}
    for name, listed in documented().items():
        assert listed <= known, (name, listed - known)


def test_mypy_checks_the_names_a_hook_compares_with(tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(
        "from bootmigrate.events import Event\n"
        "def misspelt(event: Event) -> bool:\n"
        "    return event.name == 'aquired'\n"
        "def bound(event: Event) -> None:\n"
        "    match event:\n"
        "        case Event(name='migration_applied', duration_s=float(seconds)):\n"
        "            reveal_type(seconds)\n"
    )
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(hook),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "hook.py:3: error: Non-overlapping equality check" in checked.stdout, checked.stdout
    assert 'hook.py:7: note: Revealed type is "float"' in checked.stdout, checked.stdout
    assert "import-untyped" not in checked.stdout  # the package says it is typed


def test_emit_keywords_are_the_event_fields() -> None:
    optional = {f.name for f in fields(Event)} - {"name", "call_id", "message", "level"}
    assert set(get_type_hints(EventFields)) == optional


@pytest.mark.anyio
async def test_events_set_only_the_fields_the_table_lists(db: Any) -> None:
    seen: list[Event] = []

    async def broken(db: Any) -> None:
        raise RuntimeError("boom")

    failing = [recorder(1), Migration(version=2, up=broken, name="broken")]
    await migrate(db, recorders(1), on_event=seen.append)  # a holder
    await migrate(db, recorders(1), on_event=seen.append)  # up to date
    await migrate(db, [], on_event=seen.append)  # an older build: the database is ahead
    with pytest.raises(MigrationFailed):
        await migrate(db, failing, on_event=seen.append)
    with pytest.raises(ControlLocked):
        await migrate(db, failing, on_event=seen.append)

    table = documented()
    for event in seen:
        assert set(event.fields()) <= table[event.name], (event.name, event.fields())
