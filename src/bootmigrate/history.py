"""The history collection: one record per migration run, kept apart from the control document."""

from __future__ import annotations

import traceback
from datetime import datetime
from typing import Any, Literal

from .control import Owner, utc_now

Outcome = Literal["applied", "failed", "interrupted", "skipped", "manual"]
Direction = Literal["up", "down", "rerun"]

# Enough of a traceback to find the failing line without bloating the control document.
TRACEBACK_TAIL_CHARS = 2000


def error_fields(exc: BaseException) -> dict[str, str]:
    """The error and the tail of its traceback, as stored in a failure record."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": text[-TRACEBACK_TAIL_CHARS:]}


class History:
    """Append-only records of what ran, where and how it ended."""

    def __init__(self, coll: Any, owner: Owner) -> None:
        self._coll = coll
        self._owner = owner

    async def record(
        self,
        *,
        version: int,
        name: str,
        direction: Direction | None,
        outcome: Outcome,
        action: str | None = None,
        started_at: datetime | None = None,
        duration: float | None = None,
        token: int | None = None,
        error: BaseException | None = None,
        note: str | None = None,
        checksum: str | None = None,
        session: Any = None,
    ) -> None:
        finished_at = utc_now()
        doc: dict[str, Any] = {
            "version": version,
            "name": name,
            "direction": direction,
            "outcome": outcome,
            "started_at": started_at or finished_at,
            "finished_at": finished_at,
            "duration_s": duration,
            "host": self._owner.host,
            "pid": self._owner.pid,
            "build": self._owner.build,
            "token": token,
            "error": None,
        }
        if error is not None:
            doc.update(error_fields(error))
        if checksum:
            doc["checksum"] = checksum
        if action:
            doc["action"] = action
        if note:
            doc["note"] = note
        await self._coll.insert_one(doc, session=session)
