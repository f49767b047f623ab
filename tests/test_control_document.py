"""Rocket.Chat's control document as it is, and malformed ones refused without a guess."""

from __future__ import annotations

import re
from typing import Any

import pytest

from bootmigrate import InvalidControlDocument, migrate
from tests.in_process import control, ran, recorders

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"locked": "false", "version": 19}, "`locked` must be true or false, got 'false'"),
        ({"version": 19}, "`locked` must be true or false, got None"),
        ({"locked": False, "version": "19"}, "`version` must be a non-negative integer"),
        ({"locked": False, "version": 19.0}, "NumberInt"),
        ({"locked": False, "version": -1}, "got -1"),
        ({"locked": False}, "`version` must be a non-negative integer, got None"),
        ({"locked": False, "version": True}, "got True"),
        ({"locked": True, "version": 3, "heartbeat": "yesterday"}, "`heartbeat` must be a date"),
        ({"locked": True, "version": 3, "token": "7"}, "`token` must be an integer"),
        ({"locked": True, "version": 3, "failure": "boom"}, "`failure` must be a sub-document"),
    ],
)
async def test_malformed_control_document_is_refused_and_left_as_it_is(
    db: Any, doc: dict[str, Any], message: str
) -> None:
    await db.migrations.insert_one({"_id": "control", **doc})

    with pytest.raises(InvalidControlDocument, match=re.escape(message)) as caught:
        await migrate(db, recorders(1, 20))

    assert "'migrations'" in str(caught.value)
    assert await control(db) == {"_id": "control", **doc}
    assert await ran(db) == []
    assert "migrations_history" not in await db.list_collection_names()


async def test_unknown_extra_fields_are_tolerated_and_kept(db: Any) -> None:
    await db.migrations.insert_one(
        {"_id": "control", "locked": False, "version": 1, "note": "set by ops"}
    )

    report = await migrate(db, recorders(1, 2))

    assert report.applied == [2]
    assert (await control(db) or {})["note"] == "set by ops"


async def test_hand_unlock_of_a_stuck_lock_is_honoured(db: Any) -> None:
    await db.migrations.insert_one(
        {
            "_id": "control",
            "locked": True,
            "version": 1,
            "token": 4,
            "failure": {"kind": "failed", "version": 2, "error": "boom", "host": "h"},
        }
    )
    await db.migrations.update_one({"_id": "control"}, {"$set": {"locked": False}})

    report = await migrate(db, recorders(1, 2, 3))

    assert report.applied == [2, 3]
    doc = await control(db)
    assert doc is not None and "failure" not in doc and doc["token"] == 5
