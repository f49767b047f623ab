"""What a migration step receives as its optional second argument."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MigrationContext:
    """The optional second argument of a migration step: ``async def up(db, ctx)``.

    ``ctx.session`` is the transaction's session for a ``transactional`` migration (pass it to
    every operation), else ``None``. ``ctx.log`` logs with the migration's version attached.
    ``await ctx.progress(done, total)`` records how far a long migration has got on the
    control document (``running.progress``), where ``bootmigrate status`` shows it.
    """

    db: Any
    version: int
    name: str
    direction: str
    log: logging.LoggerAdapter[logging.Logger]
    session: Any = None
    report_progress: Callable[[int, int], Awaitable[None]] | None = field(default=None, repr=False)

    async def progress(self, done: int, total: int) -> None:
        """Record progress (one fenced write: call it per batch, not per document)."""
        if self.report_progress is not None:
            await self.report_progress(done, total)
