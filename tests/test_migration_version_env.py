"""MIGRATION_VERSION, read by migrate() as Rocket.Chat reads it."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import InvalidTarget, migrate
from bootmigrate.envvar import VersionRequest, parse_version_request
from tests.in_process import control, ran, recorders


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("", None),
        ("latest", VersionRequest()),
        ("12", VersionRequest(target=12)),
        ("12,rerun", VersionRequest(rerun=12)),
        (" 12 , exit ", VersionRequest(target=12, exit=True)),
    ],
)
def test_values_are_understood(raw: str | None, expected: VersionRequest | None) -> None:
    assert parse_version_request(raw) == expected


@pytest.mark.parametrize("raw", ["newest", "12,redo", "-1", "1.5", "12,rerun,exit"])
def test_anything_else_is_refused(raw: str) -> None:
    with pytest.raises(InvalidTarget, match="use latest, N, N,rerun or N,exit"):
        parse_version_request(raw)


@pytest.mark.anyio
async def test_a_version_stops_there(db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGRATION_VERSION", "2")

    report = await migrate(db, recorders(1, 2, 3))

    assert (report.applied, report.exit_requested) == ([1, 2], False)


@pytest.mark.anyio
async def test_rerun_runs_that_migration_again(db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    await migrate(db, recorders(1, 2, 3))
    monkeypatch.setenv("MIGRATION_VERSION", "2,rerun")

    report = await migrate(db, recorders(1, 2, 3))

    assert report.applied == [2]
    assert (await ran(db))[-1] == (2, "up")
    assert (await control(db) or {})["version"] == 3


@pytest.mark.anyio
async def test_exit_migrates_then_asks_the_caller_to_exit(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIGRATION_VERSION", "3,exit")

    report = await migrate(db, recorders(1, 2, 3))

    assert (report.applied, report.exit_requested) == ([1, 2, 3], True)


@pytest.mark.anyio
async def test_explicit_arguments_win_over_the_environment(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIGRATION_VERSION", "1")

    report = await migrate(db, recorders(1, 2, 3), target=3)

    assert report.applied == [1, 2, 3]


@pytest.mark.anyio
async def test_an_unknown_version_names_the_variable(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIGRATION_VERSION", "7")

    with pytest.raises(InvalidTarget, match="MIGRATION_VERSION='7': target 7 is not a version"):
        await migrate(db, recorders(1, 2, 3))

    assert await db.list_collection_names() == []
