"""Real uvicorn, gunicorn (uvicorn workers) and aiohttp (``web.run_app``) processes stopped
with real signals while they migrate at boot, and serving while they migrate.

Each server process serves tests/served_app.py on both drivers; migrations block inside a
step until the test creates a file (tests/migration_files.py), never on a sleep. The seconds
a process takes to exit after SIGTERM are asserted against a poll deadline far below what the
server would otherwise take (``wait_timeout``, a lease); ``benchmarks/shutdown.py`` measures
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app_processes import SERVERS, AppProcess, start_app
from tests.migration_files import BROKEN, recording_migrations, write_migrations
from tests.polling import wait_until
from tests.processes import Replicas, start_blocked_holder

pytestmark = pytest.mark.multiprocess
EACH_SERVER = pytest.mark.parametrize("server", SERVERS)

# Every wait below would otherwise last wait_timeout (300 s) or a lease (60 s).
WAIT_TIMEOUT = 300
LEASE = 60
EXIT_WITHIN = 5.0  # poll deadline from the signal to the process's exit
BOOT_WITHIN = 20.0  # poll deadline for a whole boot: start the server, read, fail fast
STABLE = ("_id", "locked", "version", "token", "owner", "locked_at", "running", "failure")

Start = Callable[..., AppProcess]


@pytest.fixture
def apps(mongo_uri: str, db_name: str, driver: str) -> Iterator[Start]:
    """Starts server processes on the test's database and driver; kills what is left."""
    started: list[AppProcess] = []

    def start(
        server: str,
        migrations: Path,
        env: dict[str, str] | None = None,
        workers: int = 1,
        **options: Any,
    ) -> AppProcess:
        options = {"wait_timeout": WAIT_TIMEOUT, "lease": LEASE, **options}
        app = start_app(
            server,
            uri=mongo_uri,
            db_name=db_name,
            driver=driver,
            migrations=migrations,
            env=env,
            workers=workers,
            **options,
        )
        started.append(app)
        return app

    yield start
    for app in started:
        app.kill()


def control(sync_db: Any) -> dict[str, Any]:
    found: dict[str, Any] = sync_db.migrations.find_one({"_id": "control"}) or {}
    return found


def ran(sync_db: Any) -> list[int]:
    return [d["version"] for d in sync_db.ran.find()]


def inside(sync_db: Any, version: int) -> None:
    wait_until(lambda: version in ran(sync_db), 30, f"the server to enter migration {version}")


def report(app: AppProcess, what: str, seconds: float) -> None:
    print(f"{app.server}: {what}: exited {seconds:.3f} s after SIGTERM ({app.process.returncode})")


@EACH_SERVER
def test_sigterm_while_waiting_on_a_held_lock_stops_at_once_and_writes_nothing(
    server: str, apps: Start, sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    migrations = recording_migrations(tmp_path / "m", 3)
    holder = start_blocked_holder(Replicas(mongo_uri, sync_db, driver, migrations), 2, lease=5)
    try:
        app = apps(server, migrations)
        app.wait_for_line("waiting for")
        before, history = control(sync_db), sync_db.migrations_history.count_documents({})
        sent = app.signal()
        seconds = app.exit_seconds(sent, EXIT_WITHIN)
        after = control(sync_db)
    finally:
        holder.kill()

    report(app, "waiting on a lock", seconds)
    assert "stopped by SIGTERM while migrating at startup" in app.output
    assert {k: after.get(k) for k in STABLE} == {k: before.get(k) for k in STABLE}
    assert sync_db.migrations_history.count_documents({}) == history


@EACH_SERVER
def test_sigterm_between_migrations_releases_the_lock_at_the_version_reached(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    # The server sends itself SIGTERM as migration 1 is recorded, before 2 starts.
    app = apps(
        server,
        recording_migrations(tmp_path / "m", 3),
        env={"BM_SIGTERM_ON": "applied migration 0001"},
    )
    app.exit_seconds(app.started, BOOT_WITHIN)
    assert "stopped by SIGTERM while migrating at startup" in app.output

    found = control(sync_db)
    assert (found["locked"], found["version"]) == (False, 1)
    assert "running" not in found and "failure" not in found
    assert ran(sync_db) == [1]


@EACH_SERVER
def test_kubernetes_stop_inside_a_migration_past_its_grace_leaves_it_interrupted_and_the_next_boot_fails_fast(  # noqa: E501
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    migrations = recording_migrations(tmp_path / "m", 3)
    grace = 1.0
    app = apps(server, migrations, env={"BM_BLOCK_AT": "2"}, shutdown_grace=grace)
    inside(sync_db, 2)  # migration 2 never finishes by itself

    # terminationGracePeriodSeconds sized from shutdown_grace, then SIGKILL to the pod.
    killed = app.kubernetes_stop(grace_period=grace + 2)

    assert not killed, f"{server} still ran when the grace period ended:\n{app.output[-3000:]}"
    found = control(sync_db)
    assert (found["locked"], found["version"]) == (True, 1)
    assert (found["failure"]["kind"], found["failure"]["version"]) == ("interrupted", 2)
    # The next pod reports it at once: no lease or wait_timeout to sit out.
    next_boot = apps(server, migrations)
    seconds = next_boot.exit_seconds(next_boot.started, BOOT_WITHIN)
    print(f"{server}: next boot failed {seconds:.2f} s after it started")
    assert "ControlLocked" in next_boot.output and "interrupted" in next_boot.output
    assert ran(sync_db) == [1, 2]


@EACH_SERVER
def test_sigterm_inside_a_migration_that_finishes_within_its_grace_applies_it_and_releases(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    app = apps(
        server,
        recording_migrations(tmp_path / "m", 3),
        env={"BM_BLOCK_AT": "2", "BM_RELEASE_FILE": str(release)},
        shutdown_grace=60,
    )
    inside(sync_db, 2)
    app.signal()
    app.wait_for_line("asked to stop while a migration runs")
    assert app.process.poll() is None  # the migration has its grace: the server waits for it
    sent = time.monotonic()
    release.touch()
    seconds = app.exit_seconds(sent, EXIT_WITHIN)

    report(app, "a migration finishing within its grace", seconds)
    found = control(sync_db)
    assert (found["locked"], found["version"]) == (False, 2)
    assert "running" not in found and "failure" not in found
    assert ran(sync_db) == [1, 2]  # 3 did not start: the stop came first
    outcomes = [r["outcome"] for r in sync_db.migrations_history.find()]
    assert outcomes == ["applied", "applied"]


@EACH_SERVER
def test_serving_while_migrating_is_live_at_once_and_ready_once_migrated(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    app = apps(
        server,
        recording_migrations(tmp_path / "m", 3),
        env={"BM_BLOCK_AT": "2", "BM_RELEASE_FILE": str(release)},
        serve_while_migrating=True,
    )
    app.wait_for_status("/healthz", 200)
    inside(sync_db, 2)
    assert app.get("/healthz") == (200, {"status": "ok"})
    status, body = app.get("/readyz")
    assert (status, body["ready"], body["state"]) == (503, False, "migrating"), body
    assert "migrating at startup" in body["reason"]

    release.touch()
    ready = app.wait_for_status("/readyz", 200)

    assert ready["ready"] is True and ready["report"]["applied"] == [1, 2, 3]
    assert control(sync_db)["locked"] is False
    app.exit_seconds(app.signal(), EXIT_WITHIN)  # an ordinary shutdown


@EACH_SERVER
def test_a_failure_while_serving_fails_readiness_with_the_reason_and_keeps_serving(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    migrations = write_migrations(tmp_path / "m", {"0001_broken.py": BROKEN})
    app = apps(server, migrations, serve_while_migrating=True)

    failed = app.wait_for_status("/readyz", 503)
    while failed["state"] == "migrating":
        failed = app.wait_for_status("/readyz", 503)

    assert (failed["ready"], failed["state"]) == (False, "failed"), failed
    assert "index build failed: duplicate key" in failed["reason"]
    assert "bootmigrate unlock" in failed["reason"]  # the operator's fix, as the error says
    assert app.get("/healthz")[0] == 200
    assert app.process.poll() is None  # without exit_on_failure it keeps serving, unready


@EACH_SERVER
def test_exit_on_failure_stops_the_server_after_a_failure_while_serving(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    migrations = recording_migrations(tmp_path / "m", 1)
    write_migrations(migrations, {"0002_broken.py": BROKEN})
    app = apps(
        server,
        migrations,
        env={"BM_BLOCK_AT": "1", "BM_RELEASE_FILE": str(release)},
        serve_while_migrating=True,
        exit_on_failure=True,
    )
    inside(sync_db, 1)
    assert app.wait_for_status("/readyz", 503)["state"] == "migrating"

    release.touch()  # 1 finishes, 2 fails
    seconds = app.exit_seconds(time.monotonic(), EXIT_WITHIN)

    print(f"{server}: stopped {seconds:.2f} s after the failure ({app.process.returncode})")
    assert "exit_on_failure: stopping the server" in app.output
    assert "index build failed" in app.output
    assert control(sync_db)["failure"]["version"] == 2


@EACH_SERVER
def test_sigterm_while_serving_and_migrating_cancels_the_migration_after_its_grace(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    app = apps(
        server,
        recording_migrations(tmp_path / "m", 3),
        env={"BM_BLOCK_AT": "2"},
        serve_while_migrating=True,
        shutdown_grace=0.5,
    )
    app.wait_for_status("/healthz", 200)
    inside(sync_db, 2)
    seconds = app.exit_seconds(app.signal(), EXIT_WITHIN)

    report(app, "serving, inside a migration past a 0.5 s grace", seconds)
    found = control(sync_db)
    assert (found["locked"], found["version"]) == (True, 1)
    assert (found["failure"]["kind"], found["failure"]["version"]) == ("interrupted", 2)


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_exit_on_failure_stops_a_server_with_two_workers_for_good(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    # Each worker fails (one runs the broken migration, the other finds the lock stuck): a
    # worker that stopped only itself would be restarted by the supervisor, into the same
    # failure, forever.
    migrations = write_migrations(tmp_path / "m", {"0001_broken.py": BROKEN})
    app = apps(server, migrations, workers=2, serve_while_migrating=True, exit_on_failure=True)

    seconds = app.exit_seconds(app.started, BOOT_WITHIN)

    print(f"{server} --workers 2: exited {seconds:.2f} s after it started")
    assert "exit_on_failure: stopping the server" in app.output
    assert control(sync_db)["failure"]["version"] == 1


@EACH_SERVER
def test_a_serving_replica_whose_wait_ran_out_is_ready_once_the_holder_is_done(
    server: str, apps: Start, sync_db: Any, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    migrations = recording_migrations(tmp_path / "m", 1)
    holder = apps(
        server,
        migrations,
        env={"BM_BLOCK_AT": "1", "BM_RELEASE_FILE": str(release)},
        serve_while_migrating=True,
    )
    inside(sync_db, 1)  # the holder migrates, for longer than the waiter waits
    waiter = apps(
        server, migrations, serve_while_migrating=True, wait_timeout=1, exit_on_failure=True
    )
    waiter.wait_for_line("tries again in")
    status, body = waiter.get("/readyz")
    assert (status, body["state"]) == (503, "migrating"), body
    assert "(wait_timeout)" in body["reason"] and "trying again" in body["reason"]

    release.touch()
    ready = waiter.wait_for_status("/readyz", 200)

    assert ready["report"]["applied"] == []  # the holder migrated; the waiter found it done
    assert holder.wait_for_status("/readyz", 200)["report"]["applied"] == [1]
    assert "exit_on_failure: stopping" not in waiter.output  # a wait that ran out is not final
    assert waiter.process.poll() is None
