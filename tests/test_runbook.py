"""docs/operations.md's runbooks, run exactly as written against the test server."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.migration_files import BROKEN, STEP
from tests.operator_cli import Cli

RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def runbook(name: str) -> list[str]:
    """The lines of the shell block that follows ``<!-- runbook: name -->``."""
    text = RUNBOOK.read_text()
    match = re.search(rf"<!-- runbook: {name} -->\n```sh\n(.*?)```", text, re.S)
    assert match, f"no runbook {name!r} in {RUNBOOK.name}"
    return [line for line in match[1].splitlines() if line.strip()]


def follow(cli: Cli, name: str, on_comment: Callable[[str], None] = lambda line: None) -> None:
    for line in runbook(name):
        if line.startswith("#"):
            on_comment(line)
            continue
        command, _, comment = line.partition("#")
        words = shlex.split(command)
        assert words[0] == "bootmigrate", line
        done = cli(*words[1:])
        expected = {0}
        if found := re.search(r"exit (\d+)(?: or (\d+))?", comment):
            expected = {int(code) for code in found.groups() if code is not None}
        assert done.returncode in expected, (line, done.stdout, done.stderr)


def break_step_2(cli: Cli) -> None:
    (cli.migrations / "0002_step_2.py").write_text(BROKEN)
    assert cli("up", "--yes").returncode == 1


def test_failed_migration(cli: Cli) -> None:
    break_step_2(cli)

    def fix(line: str) -> None:
        if line.startswith("# fix the cause"):
            (cli.migrations / "0002_step_2.py").write_text(STEP.format(v=2))

    follow(cli, "failed-migration", fix)

    assert cli.control()["version"] == 3  # type: ignore[index]
    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 2, 3]


def test_foreign_lock(cli: Cli) -> None:
    cli.db.migrations.insert_one({"_id": "control", "locked": True, "version": 1})

    follow(cli, "foreign-lock")

    assert cli.control() == {"_id": "control", "locked": False, "version": 1}


def test_skip(cli: Cli) -> None:
    assert cli("up", "--yes", "--to", "1").returncode == 0

    follow(cli, "skip")

    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 3]
    assert cli.control()["version"] == 3  # type: ignore[index]


def test_skip_failed(cli: Cli) -> None:
    break_step_2(cli)

    follow(cli, "skip-failed")

    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 3]
    assert cli.control()["locked"] is False  # type: ignore[index]


def test_rollback(cli: Cli) -> None:
    assert cli("up", "--yes").returncode == 0

    follow(cli, "rollback")

    assert sorted(d["v"] for d in cli.db.items.find()) == [1]


def merge_3_after_4(cli: Cli) -> None:
    """Migration 4 ran before migration 3 reached the build."""
    (cli.migrations / "0004_step_4.py").write_text(STEP.format(v=4))
    (cli.migrations / "0003_step_3.py").rename(cli.migrations.parent / "late.py")
    assert cli("up", "--yes").returncode == 0
    (cli.migrations.parent / "late.py").rename(cli.migrations / "0003_step_3.py")


def test_out_of_order(cli: Cli) -> None:
    merge_3_after_4(cli)

    follow(cli, "out-of-order")

    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 2, 3, 4]
    assert cli.control()["version"] == 4  # type: ignore[index]


def test_out_of_order_skip(cli: Cli) -> None:
    merge_3_after_4(cli)

    follow(cli, "out-of-order-skip")

    assert sorted(d["v"] for d in cli.db.items.find()) == [1, 2, 4]
    assert cli("status").returncode == 0


@pytest.mark.parametrize(
    "name",
    [
        "failed-migration",
        "foreign-lock",
        "skip",
        "skip-failed",
        "rollback",
        "out-of-order",
        "out-of-order-skip",
    ],
)
def test_runbooks_only_use_real_commands(name: str) -> None:
    commands = {
        *("status", "plan", "up", "down", "rerun", "unlock", "set-version", "history", "new"),
        "skip",
    }
    for line in runbook(name):
        if not line.startswith("#"):
            assert shlex.split(line.partition("#")[0])[1] in commands, line
