"""bootmigrate's log lines visible by default, without configuring the root logger.

Under uvicorn's and gunicorn's default logging nothing configures the root logger: a
library's INFO records are dropped (the root's level is WARNING) and its warnings reach
Python's last-resort handler as bare lines. So the ``bootmigrate`` logger carries one
handler of its own, :data:`FALLBACK`, which writes INFO and above to stderr, with the time
and level, only while no other handler would see the records: on the ``bootmigrate``
logger, or on any logger above it that they propagate to. Configuring logging (any handler
on the root logger, ``logging.basicConfig()``, a ``dictConfig``) therefore takes over
silently, with the levels configured, and no line is written twice.

To turn it off without configuring anything else:
``logging.getLogger("bootmigrate").removeHandler(bootmigrate.logs.FALLBACK)``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
FALLBACK_LEVEL = logging.INFO


class FallbackHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes a record to stderr (whatever ``sys.stderr`` is at the time, as Python's own
    last-resort handler does) only when no other handler up the hierarchy would see it."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, FALLBACK_LEVEL)  # no stream of its own: see `stream`
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if falls_back(logging.getLogger(record.name)):
            super().emit(record)


FALLBACK = FallbackHandler()


def falls_back(logger: logging.Logger) -> bool:
    """Whether ``logger``'s records go to :data:`FALLBACK` alone: it is installed on the way
    up, and no other handler is (on ``logger`` or a logger it propagates to)."""
    found = False
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if handler is not FALLBACK:
                return False
            found = True
        if not current.propagate:
            break
        current = current.parent
    return found


def visible(logger: logging.Logger, level: int) -> bool:
    """Whether a record at ``level`` is made: as the logger's level says, or, while logging
    is not configured, at INFO and above for the fallback handler. A level set on the
    ``bootmigrate`` logger (or one below it), and ``logging.disable()``, are obeyed even
    then: only the root's default WARNING is overridden."""
    if logger.isEnabledFor(level):
        return True
    return (
        level >= FALLBACK_LEVEL
        and logging.root.manager.disable < level
        and not logger.disabled
        and not _level_set_below_root(logger)
        and falls_back(logger)
    )


def _level_set_below_root(logger: logging.Logger) -> bool:
    current: logging.Logger | None = logger
    while current is not None and current is not logging.root:
        if current.level != logging.NOTSET:
            return True
        current = current.parent
    return False


def log_record(
    logger: logging.Logger,
    level: int,
    template: str,
    args: tuple[object, ...],
    extra: Mapping[str, Any],
    *,
    stacklevel: int = 1,
) -> None:
    """Log ``template % args`` with ``extra`` if :func:`visible`; ``stacklevel`` as for
    ``Logger.log``, counted from the caller of this function."""
    if visible(logger, level):
        # `_log` skips the logger's level check, which `visible` has just made.
        logger._log(level, template, args, extra=extra, stacklevel=stacklevel + 1)


class MigrationLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``ctx.log``: the ``bootmigrate`` logger with the migration's version on each record,
    visible by default like the library's own lines."""

    def isEnabledFor(self, level: int) -> bool:
        return visible(self.logger, level)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            msg, processed = self.process(msg, kwargs)
            options = {**processed, "stacklevel": processed.get("stacklevel", 1) + 1}
            self.logger._log(level, msg, args, **options)


def install() -> None:
    """Put :data:`FALLBACK` on the ``bootmigrate`` logger (once)."""
    logger = logging.getLogger("bootmigrate")
    if FALLBACK not in logger.handlers:
        logger.addHandler(FALLBACK)


install()
