"""The operator CLI, driven as a real command in subprocesses against the test server."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.migration_files import BROKEN, STEP
from tests.operator_cli import Cli
from tests.server import free_port


def one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def test_status_on_a_fresh_database_lists_pending_and_exits_3(cli: Cli) -> None:
    done = cli("status")

    assert done.returncode == 3, done.stderr
    assert "pending  1 step_1, 2 step_2, 3 step_3" in done.stdout
    assert "lock     free" in done.stdout


def test_status_json_schema(cli: Cli) -> None:
    status = cli.json("status")

    assert set(status) == {
        "collection",
        "exists",
        "database_exists",
        "version",
        "latest",
        "state",
        "pending",
        "out_of_order",
        "problem",
        "lock",
    }
    assert (status["state"], status["version"], status["latest"]) == ("pending", 0, 3)
    assert status["out_of_order"] == []
    assert status["pending"][0] == {
        "version": 1,
        "name": "step_1",
        "direction": "up",
        "description": "step 1",
    }
    assert set(status["lock"]) == {
        "locked",
        "holder",
        "since",
        "heartbeat_age_s",
        "lease_s",
        "lease_expired",
        "running",
        "failure",
        "unfinished",
        "on_expiry",
    }


def test_plan_shows_what_up_would_run_and_writes_nothing(cli: Cli) -> None:
    done = cli("plan")

    assert done.returncode == 0
    assert "version 0 -> 3" in done.stdout
    assert [s["version"] for s in cli.json("plan", "--to", "2")["steps"]] == [1, 2]
    assert cli.db.list_collection_names() == []


def test_up_applies_then_status_is_up_to_date(cli: Cli) -> None:
    done = cli("up", "--yes")

    assert done.returncode == 0, done.stderr
    assert "applied 1, 2, 3: version 0 -> 3" in done.stdout
    assert cli("status").returncode == 0
    assert cli.json("status")["state"] == "up-to-date"


def test_up_to_a_version(cli: Cli) -> None:
    assert cli.json("up", "--yes", "--to", "2")["applied"] == [1, 2]
    assert cli.control()["version"] == 2  # type: ignore[index]


def test_history_newest_first_with_limit(cli: Cli) -> None:
    cli("up", "--yes")

    records = cli.json("history", "--limit", "2")

    assert [(r["version"], r["outcome"]) for r in records] == [(3, "applied"), (2, "applied")]
    assert "step_3" in cli("history").stdout.splitlines()[1]


def test_down_needs_confirmation_and_refuses_without_a_terminal(cli: Cli) -> None:
    cli("up", "--yes")

    done = cli("down", "--to", "1")

    one_line_error(done, "stdin is not a terminal; pass --yes")
    assert cli.control()["version"] == 3  # type: ignore[index]


def test_down_with_yes_reverts_newest_first(cli: Cli) -> None:
    cli("up", "--yes")

    report = cli.json("down", "--to", "1", "--yes")

    assert (report["reverted"], report["to_version"]) == ([3, 2], 1)
    assert sorted(d["v"] for d in cli.db.items.find()) == [1]


def test_down_asks_at_a_terminal_and_proceeds_on_yes(cli: Cli) -> None:
    cli("up", "--yes")
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "bootmigrate", "down", "--to", "2"],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli.env,
        )
        os.write(leader, b"y\n")
        out, err = process.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)

    assert process.returncode == 0, err
    assert "Revert 1 migration(s), down to version 2?" in out
    assert "reverted 3: version 3 -> 2" in out


def test_down_steps_counts_applied_migrations_newest_first(cli: Cli) -> None:
    cli("up", "--yes")

    report = cli.json("down", "--steps", "2", "--yes")

    assert (report["reverted"], report["to_version"]) == ([3, 2], 1)
    assert cli.json("down", "--steps", "5", "--yes")["reverted"] == [1]  # no further than 0


@pytest.mark.parametrize("args", [(), ("--to", "1", "--steps", "1")], ids=["neither", "both"])
def test_down_takes_exactly_one_of_to_and_steps(cli: Cli, args: tuple[str, ...]) -> None:
    cli("up", "--yes")

    done = cli("down", *args, "--yes")

    assert (done.returncode, done.stderr) == (
        2,
        "error: give exactly one of --to N (a version) and --steps N (a count)\n",
    )
    assert cli.control()["version"] == 3  # type: ignore[index]


def test_rerun_needs_confirmation_and_refuses_without_a_terminal(cli: Cli) -> None:
    cli("up", "--yes")

    done = cli("rerun", "2")

    one_line_error(done, "stdin is not a terminal; pass --yes")
    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 2, 3]  # it did not run


def test_rerun_runs_one_migration_again(cli: Cli) -> None:
    cli("up", "--yes")

    report = cli.json("rerun", "2", "--yes")

    assert (report["applied"], report["to_version"]) == ([2], 3)
    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 2, 2, 3]


def test_stuck_lock_status_then_unlock_then_resume(cli: Cli) -> None:
    (cli.migrations / "0002_step_2.py").write_text(BROKEN)
    failed = cli("up", "--yes")
    one_line_error(failed, "0002 step_2 (up) failed")

    done = cli("status")

    assert done.returncode == 5
    assert "lock     stuck" in done.stdout
    assert "migration 2 step_2 (failed)" in done.stdout
    assert re.search(r"\(failed\) on \S+ at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\n", done.stdout)
    assert "RuntimeError: index build failed" in done.stdout
    assert re.search(r'where +File ".*0002_step_2\.py", line 2, in up\n', done.stdout)
    assert "fix the cause, then: bootmigrate unlock (it runs again from its start" in done.stdout
    assert cli.json("status")["lock"]["failure"]["version"] == 2

    unlocked = cli("unlock")
    assert unlocked.returncode == 0
    assert "unlocked: was stuck at version 1: migration 2 step_2 failed" in unlocked.stdout
    after = cli("status").stdout  # an unfinished up: the next boot resumes it, no fix to run
    assert re.search(r"next +the next boot \(or `bootmigrate up`\) runs it again", after)
    assert "finish it:" not in after
    assert cli.json("status")["lock"]["unfinished"]["version"] == 2
    assert cli.control()["locked"] is False  # type: ignore[index]
    unlock_record = cli.json("history", "--limit", "1")[0]
    assert (unlock_record["action"], unlock_record["version"], unlock_record["name"]) == (
        "unlock",
        1,
        "",  # the database's version, with no migration's name beside it
    )

    (cli.migrations / "0002_step_2.py").write_text(STEP.format(v=2))
    assert cli.json("up", "--yes")["applied"] == [2, 3]


def test_a_database_that_does_not_exist_is_said_and_up_asks_before_creating_it(
    cli: Cli,
) -> None:
    """A mistyped --db names a database nothing ever wrote to: `status` says so, and `up`
    refuses to create it and migrate there unless told to (--yes)."""
    said = cli("status", "--db", "tpyo")
    assert re.search(r"warning +database 'tpyo' does not exist on this server", said.stdout)
    assert cli.json("status", "--db", "tpyo")["database_exists"] is False

    refused = cli("up", "--db", "tpyo")
    one_line_error(refused, "database 'tpyo' does not exist on this server")
    assert "for a new database, pass --yes" in refused.stderr
    assert "tpyo" not in cli.db.client.list_database_names()

    assert cli.json("up", "--db", "tpyo", "--yes")["applied"] == [1, 2, 3]
    assert cli.json("status", "--db", "tpyo")["database_exists"] is True
    cli.db.client.drop_database("tpyo")


@pytest.mark.parametrize("command", [("history",), ("plan",), ("unlock",)])
def test_commands_that_find_nothing_say_when_the_database_does_not_exist(
    cli: Cli, command: tuple[str, ...]
) -> None:
    done = cli(*command, "--db", "tpyo")

    assert done.returncode == 0, done.stderr
    assert "warning: database 'tpyo' does not exist on this server" in done.stdout
    assert "tpyo" not in cli.db.client.list_database_names()
    assert cli("up", "--yes", "--to", "1").returncode == 0
    assert "does not exist" not in cli(*command).stdout


def test_status_shows_the_database_when_a_migration_file_is_broken(cli: Cli) -> None:
    cli("up", "--yes", "--to", "1")
    (cli.migrations / "0002_step_2.py").write_text("async def up(db)\n    pass\n")

    done = cli("status")

    assert done.returncode == 1, done.stderr
    assert re.search(r"state +invalid", done.stdout)
    assert re.search(r"version +1 *\n", done.stdout)
    assert re.search(r"latest +3 *\n", done.stdout)
    said = "0002_step_2.py failed to import: SyntaxError: expected ':' (line 1, column 17"
    assert said in done.stdout
    found = cli.json("status")
    assert (found["state"], found["version"], found["pending"]) == ("invalid", 1, [])
    assert said in found["problem"]

    # The commands that need the modules fail on one line, at the same file and line.
    one_line_error(cli("up"), said)


def test_an_import_error_in_a_migration_names_its_line(cli: Cli) -> None:
    (cli.migrations / "0003_step_3.py").write_text("X = 1\nimport no_such_module_here\n")

    one_line_error(
        cli("plan"),
        "0003_step_3.py failed to import: ModuleNotFoundError: No module named "
        "'no_such_module_here' (line 2)",
    )


def test_set_version_says_it_creates_a_database_that_does_not_exist(cli: Cli) -> None:
    done = cli("set-version", "1", "--yes", "--db", "tpyo2")

    assert done.returncode == 0, done.stderr
    assert "warning: database 'tpyo2' did not exist on this server, and now does" in done.stdout
    cli.db.client.drop_database("tpyo2")


def test_a_field_has_one_shape_across_commands(cli: Cli) -> None:
    """`holder` is who holds the lock (a document, or null) wherever it appears; whether a
    run took the lock itself is `held_lock`."""
    ran = cli.json("up", "--yes")

    assert (ran["held_lock"], "holder" not in ran) == (True, True)
    assert cli.json("status")["lock"]["holder"] is None
    assert cli.json("up", "--yes")["held_lock"] is False  # nothing to do: no lock taken


def failed_json(cli: Cli, *args: str, **env: str) -> dict[str, Any]:
    """A command's ``--json`` error: one object on stdout, nothing on stderr; the exit code
    is the one the object names."""
    done = cli(*args, "--json", **env)
    assert done.stderr == "", done.stderr
    said = json.loads(done.stdout)
    assert said["exit_code"] == done.returncode != 0, (said, done.returncode)
    return dict(said["error"])


def test_under_json_errors_are_one_object_on_stdout(cli: Cli) -> None:
    (cli.migrations / "0002_step_2.py").write_text(BROKEN)

    failed = failed_json(cli, "up", "--yes")
    assert (failed["type"], "0002 step_2 (up) failed" in failed["message"]) == (
        "MigrationFailed",
        True,
    )

    stuck = failed_json(cli, "up", "--yes")
    assert (stuck["type"], stuck["reason"]) == ("ControlLocked", "stuck")
    assert re.search(r" at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: ", stuck["message"])

    unreachable = failed_json(
        cli, "status", "--timeout", "0.5", MONGODB_URI="mongodb://127.0.0.1:1"
    )
    assert unreachable["type"] == "CommandFailed"
    assert unreachable["message"].startswith("cannot reach MongoDB at 127.0.0.1:1")

    refused = failed_json(cli, "set-version", "3")  # no terminal to confirm on, no --yes
    assert "pass --yes to confirm" in refused["message"]


def _live_lock(cli: Cli) -> None:
    now = cli.db.command("hello")["localTime"]
    cli.db.migrations.insert_one(
        {
            "_id": "control",
            "locked": True,
            "version": 1,
            "token": 3,
            "beats": 1,
            "heartbeat": now,
            "locked_at": now - timedelta(seconds=5),
            "owner": {"host": "app-7", "pid": 99, "build": "2.4.0", "lease": 3600.0, "id": "z"},
            "running": {"version": 2, "name": "step_2", "direction": "up"},
        }
    )


def test_status_of_a_live_lock_names_the_holder_and_exits_4(cli: Cli) -> None:
    _live_lock(cli)

    done = cli("status")

    assert done.returncode == 4
    assert "holder     app-7 pid 99 build 2.4.0" in done.stdout
    assert "(within its lease)" in done.stdout
    assert "running    2 step_2" in done.stdout
    lock = cli.json("status")["lock"]
    assert (lock["lease_expired"], lock["lease_s"]) == (False, 3600.0)
    assert 0 <= lock["heartbeat_age_s"] < 600


def test_unlock_refuses_a_live_holder_unless_forced(cli: Cli) -> None:
    _live_lock(cli)

    refused = cli("unlock")

    one_line_error(refused, "refusing to unlock: app-7 (pid 99, build 2.4.0) is alive")
    assert "--force" in refused.stderr
    assert cli.control()["locked"] is True  # type: ignore[index]
    forced = cli.json("unlock", "--force")
    assert forced["changed"] is True
    assert cli.control()["locked"] is False  # type: ignore[index]


def test_unlock_of_a_free_lock_changes_nothing(cli: Cli) -> None:
    cli("up", "--yes")

    done = cli("unlock")

    assert (done.returncode, done.stdout.strip()) == (0, "not locked: nothing to do (version 3)")


def test_set_version_skips_and_is_recorded(cli: Cli) -> None:
    cli("up", "--yes", "--to", "1")

    done = cli("set-version", "2", "--yes")

    assert done.returncode == 0, done.stderr
    assert "version set from 1 to 2" in done.stdout
    assert cli.control()["version"] == 2  # type: ignore[index]
    record = cli.json("history", "--limit", "1")[0]
    assert (record["outcome"], record["action"], record["version"]) == ("skipped", "set-version", 2)
    assert (record["from_version"], record["versions"]) == (1, [2])
    assert "from 1 to 2 (versions 2)" in cli("history", "--limit", "1").stdout
    assert cli.json("up", "--yes")["applied"] == [3]


def test_set_version_needs_confirmation(cli: Cli) -> None:
    one_line_error(cli("set-version", "2"), "pass --yes")
    assert cli.control() is None


def test_new_writes_the_next_migration_file(cli: Cli) -> None:
    created = cli.json("new", "Backfill display names")

    path = Path(created["path"])
    assert (path.name, created["version"]) == ("0004_backfill_display_names.py", 4)
    assert '"""Backfill display names."""' in path.read_text()
    assert "async def up(db: Any, ctx: MigrationContext) -> None:" in path.read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("rerun", "9", "--yes"), "cannot rerun version 9: this build has no such migration"),
        (("up", "--yes", "--to", "9"), "target 9 is not a version this build knows"),
        (("set-version", "9", "--yes"), "target 9 is not a version this build knows"),
        (("plan", "--to", "7"), "target 7 is not a version this build knows"),
    ],
)
def test_unknown_versions_are_one_clear_line(
    cli: Cli, args: tuple[str, ...], fragment: str
) -> None:
    one_line_error(cli(*args), fragment)


def test_down_past_the_floor_is_refused(cli: Cli) -> None:
    for name in ("0001_step_1.py", "0002_step_2.py"):
        (cli.migrations / name).unlink()
    cli.db.migrations.insert_one({"_id": "control", "locked": False, "version": 3})

    one_line_error(cli("down", "--to", "0", "--yes"), "below version 2, the oldest")
    assert cli.control()["version"] == 3  # type: ignore[index]


def test_unreachable_server_fails_within_the_timeout(cli: Cli) -> None:
    port = free_port()

    done = cli("status", "--uri", f"mongodb://127.0.0.1:{port}/", "--timeout", "1")

    one_line_error(done, f"cannot reach MongoDB at 127.0.0.1:{port} within 1 s (--timeout)")


def test_malformed_control_document_is_one_clear_line(cli: Cli) -> None:
    cli.db.migrations.insert_one({"_id": "control", "locked": "false", "version": 3})

    one_line_error(cli("up", "--yes"), "`locked` must be true or false, got 'false'")
    assert cli.control() == {"_id": "control", "locked": "false", "version": 3}


def test_bad_migrations_directory_is_one_clear_line(cli: Cli, tmp_path: Path) -> None:
    nowhere = str(tmp_path / "nowhere")

    one_line_error(cli("plan", "--migrations", nowhere), "neither a directory nor an importable")

    # status still shows the database, with the problem beside it
    found = cli.json("status", "--migrations", nowhere)
    assert found["state"] == "invalid" and "neither a directory" in found["problem"]


def test_debug_shows_the_traceback(cli: Cli) -> None:
    done = cli("plan", "--migrations", "no/such/dir", "--debug")

    assert done.returncode == 1 and "Traceback" in done.stderr


def test_database_name_is_required(cli: Cli) -> None:
    done = cli("status", BOOTMIGRATE_DB="")

    one_line_error(done, "no database named: pass --db")


def test_status_shows_a_running_migrations_progress(cli: Cli) -> None:
    _live_lock(cli)
    cli.db.migrations.update_one(
        {"_id": "control"}, {"$set": {"running.progress": {"done": 300, "total": 1200}}}
    )

    done = cli("status")

    assert "running    2 step_2 (300/1200 done)" in done.stdout
    assert cli.json("status")["lock"]["running"]["progress"]["done"] == 300


def test_validate_reports_a_changed_migration_and_exits_6(cli: Cli) -> None:
    assert cli("up", "--yes").returncode == 0
    assert cli("validate").returncode == 0
    (cli.migrations / "0002_step_2.py").write_text(STEP.format(v=20))

    done = cli("validate")

    assert done.returncode == 6
    assert "step_2" in done.stdout and "changed" in done.stdout
    assert "accepted with `bootmigrate repair`" in done.stdout
    assert [d["version"] for d in cli.json("validate")] == [2]


def test_repair_accepts_a_changed_checksum_after_showing_it(cli: Cli) -> None:
    assert cli("up", "--yes").returncode == 0
    step_2 = cli.migrations / "0002_step_2.py"
    step_2.write_text(
        "# a comment changes the checksum, not what the migration does\n" + STEP.format(v=2)
    )

    refused = cli("repair")  # no terminal to confirm on, no --yes
    assert refused.returncode == 1
    assert "step_2" in refused.stdout and "pass --yes" in refused.stderr  # shown, then refused
    assert cli("validate").returncode == 6  # nothing recorded

    done = cli.json("repair", "--yes")

    assert [d["version"] for d in done["accepted"]] == [2]
    assert cli("validate").returncode == 0
    record = cli.json("history", "--limit", "1")[0]
    assert (record["version"], record["action"], record["outcome"]) == (2, "repair", "manual")
    assert "checksum accepted by an operator" in record["note"]
    assert cli.json("repair", "--yes")["accepted"] == []  # nothing left to accept


def late_merge(cli: Cli) -> None:
    """The database at 3 with 1 and 3 applied; then 2 arrives, below it."""
    (cli.migrations / "0002_step_2.py").rename(cli.migrations.parent / "held_back.py")
    assert cli("up", "--yes").returncode == 0
    (cli.migrations.parent / "held_back.py").rename(cli.migrations / "0002_step_2.py")


def in_project_allowing_out_of_order(
    cli: Cli, folder: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``bootmigrate ARGS`` run in a project whose [tool.bootmigrate] allows it."""
    (folder / "pyproject.toml").write_text("[tool.bootmigrate]\nallow-out-of-order = true\n")
    return subprocess.run(
        [sys.executable, "-m", "bootmigrate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli.env,
        cwd=folder,
    )


def test_status_and_validate_report_a_migration_merged_late_and_exit_6(cli: Cli) -> None:
    late_merge(cli)

    found = cli("status")
    checked = cli("validate")
    booted = cli("up", "--yes")

    assert found.returncode == 6, found.stderr
    assert "out of order  0002 step_2: below version 3, never applied nor skipped" in found.stdout
    assert "bootmigrate skip 2" in found.stdout
    assert checked.returncode == 6, checked.stderr
    assert re.search(r"^2\s+step_2\s+out_of_order", checked.stdout, re.M), checked.stdout
    assert "bootmigrate up --out-of-order" in checked.stdout
    one_line_error(booted, "migration 2 (")
    assert cli.json("status")["state"] == "out-of-order"


def test_up_out_of_order_runs_it_once(cli: Cli) -> None:
    late_merge(cli)

    done = cli.json("up", "--out-of-order")

    assert (done["applied"], done["to_version"]) == ([2], 3)
    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 2, 3]
    assert cli("status").returncode == 0
    assert cli.json("up")["applied"] == []


def test_out_of_order_can_be_allowed_in_the_project_section(cli: Cli, tmp_path: Path) -> None:
    late_merge(cli)
    done = in_project_allowing_out_of_order(cli, tmp_path, "up", "--json")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["applied"] == [2]


def test_skip_records_a_late_migration_without_running_it(cli: Cli) -> None:
    late_merge(cli)

    done = cli.json("skip", "2", "--yes")

    assert done == {"skipped": [2]}
    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 3]
    assert cli("status").returncode == 0
    assert cli.json("up")["applied"] == []
    asked = cli("skip", "2")
    assert "would record 2 as skipped" in asked.stdout and "pass --yes" in asked.stderr
    one_line_error(cli("skip", "2", "--yes"), "cannot skip 2: already applied or skipped")
    one_line_error(cli("skip", "9", "--yes"), "cannot skip 9: not a migration of this build")


def test_down_over_a_skipped_migration_says_it_never_ran(cli: Cli) -> None:
    cli("up", "--yes", "--to", "1")
    assert cli("set-version", "2", "--yes").returncode == 0

    done = cli("down", "--to", "1", "--yes")

    assert done.returncode == 0, done.stderr
    assert "warning: 2 never ran (recorded as skipped)" in done.stdout
    asked = cli("down", "--to", "0")
    assert "pass --yes" in asked.stderr


def test_plan_shows_what_up_would_do_with_a_migration_merged_late(cli: Cli) -> None:
    late_merge(cli)

    refused = cli("plan")
    planned = cli.json("plan", "--out-of-order")

    one_line_error(refused, "migration 2 (0002 step_2) is below the database's version 3")
    assert planned["steps"] == [{"version": 2, "name": "step_2", "direction": "up"}]
    assert (planned["from_version"], planned["to_version"]) == (3, 3)


def test_config_shows_where_out_of_order_is_allowed(cli: Cli, tmp_path: Path) -> None:
    done = in_project_allowing_out_of_order(cli, tmp_path, "config", "--json")

    rows = {row["setting"]: row for row in json.loads(done.stdout)["settings"]}
    assert rows["allow-out-of-order (up, plan)"]["value"] is True
    assert rows["allow-out-of-order (up, plan)"]["from"].endswith("pyproject.toml")
