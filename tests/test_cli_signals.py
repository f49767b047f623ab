"""The operator CLI stopped by SIGTERM, as a Job's or init container's process 1 is: it stops
as a booting replica does, and exits 143 with one line saying so."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.migration_files import recording_migrations
from tests.operator_cli import Cli
from tests.polling import wait_until
from tests.processes import Replicas

pytestmark = pytest.mark.multiprocess


def start(cli: Cli, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bootmigrate", *args],
        env={**cli.env, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(process: subprocess.Popen[str], fragment: str) -> None:
    """Read the command's stderr (its -v log) until a line contains ``fragment``."""
    assert process.stderr is not None
    for line in process.stderr:
        if fragment in line:
            return
    raise AssertionError(f"the command exited ({process.wait()}) before logging {fragment!r}")


def test_sigterm_stops_up_inside_a_migration_past_its_grace_as_interrupted(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    cli = Cli.for_replicas(Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3)))
    up = start(cli, "up", "--yes", "--shutdown-grace", "0.5", BM_BLOCK_AT="2")
    try:
        wait_until(lambda: sync_db.ran.find_one({"version": 2}), 30, "up to enter migration 2")
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=30)
    finally:
        up.kill()

    assert up.returncode == 143, err
    assert "stopped by SIGTERM" in err
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (True, 1)
    assert (control["failure"]["kind"], control["failure"]["version"]) == ("interrupted", 2)


def test_sigterm_stops_wait_at_once_writing_nothing(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    cli = Cli.for_replicas(Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3)))
    waiting = start(cli, "wait", "--timeout", "300", "-v")
    try:
        read_until(waiting, "only waits")
        waiting.send_signal(signal.SIGTERM)
        _, err = waiting.communicate(timeout=10)  # not the 300 s it would wait
    finally:
        waiting.kill()

    assert waiting.returncode == 143, err
    assert sync_db.list_collection_names() == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_grace_is_answered_not_obeyed(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, signum: signal.Signals
) -> None:
    cli = Cli.for_replicas(Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3)))
    up = start(cli, "up", "--yes", "--shutdown-grace", "1", "-v", BM_BLOCK_AT="2")
    try:
        wait_until(lambda: sync_db.ran.find_one({"version": 2}), 30, "up to enter migration 2")
        up.send_signal(signum)
        read_until(up, "asked to stop while a migration runs")
        up.send_signal(signum)  # Ctrl-C again, or a supervisor's second SIGTERM
        read_until(up, "already stopping")
        _, err = up.communicate(timeout=30)
    finally:
        up.kill()

    assert up.returncode == 128 + signum, err
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["failure"]["kind"], control["failure"]["version"]) == ("interrupted", 2)
