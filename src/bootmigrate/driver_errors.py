"""Database errors sorted in two: worth trying again, or not.

An error is *transient* when the same operation may succeed a moment later: the connection
dropped or timed out, the primary stepped down or is shutting down, the server is throttling
(Azure Cosmos DB's 16500 TooManyRequests), a time limit or a write-concern wait ran out. The
driver says so with an error label (``RetryableWriteError``, ``TransientTransactionError``,
and the overload labels of recent servers) or the server with one of the codes below. Those
are retried with backoff within the call's deadline, where connection failures always were.

Everything else is *permanent*: the same command would get the same answer (no privilege, a
view where a collection should be, an unsupported command), so it ends the call at once as a
:class:`~bootmigrate.errors.DatabaseError` naming what bootmigrate was doing, the server's
code and message, and what to do. A transient error that outlasts the deadline becomes
:class:`~bootmigrate.errors.DatabaseUnavailable`, as an unreachable server always did.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from .errors import DatabaseError, shorten

# Codes worth retrying: the retryable-writes specification's (not primary, shutting down,
# network), time limits, a write concern that timed out, and throttling.
TRANSIENT_CODES: Mapping[int, str] = {
    6: "HostUnreachable",
    7: "HostNotFound",
    50: "MaxTimeMSExpired",
    64: "WriteConcernFailed",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    134: "ReadConcernMajorityNotAvailableYet",
    189: "PrimarySteppedDown",
    262: "ExceededTimeLimit",
    9001: "SocketException",
    10058: "LegacyNotPrimary",
    10107: "NotWritablePrimary",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    16500: "TooManyRequests",
}

TRANSIENT_LABELS = frozenset(
    {"RetryableWriteError", "TransientTransactionError", "RetryableError", "SystemOverloadedError"}
)

_THROTTLED = 16500
_NOT_PRIMARY = frozenset({189, 10058, 10107, 11602, 13435, 13436})

# What an operator can do about the permanent errors seen in practice.
_FIXES: Mapping[int, str] = {
    13: "Grant the user the readWrite role on this database: bootmigrate reads and writes the "
    "control and history collections.",
    18: "Check the user name, password and authSource in the connection string.",
    115: "This server does not support a command bootmigrate needs (findAndModify, hello); "
    "use MongoDB 4.2 or later, or a compatible server that supports it.",
    166: "The control collection is a view, which cannot be written: use another collection "
    "name (collection=...), or drop the view.",
    79: "bootmigrate writes with w: 'majority': check the replica set's configuration.",
    100: "bootmigrate writes with w: 'majority', which this deployment cannot satisfy: check "
    "that a majority of voting members is up.",
}
_DEFAULT_FIX = (
    "Retrying would not help: fix the cause the server names, then start the service again; "
    "nothing more was written."
)


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same operation again may succeed (see the module's docstring)."""
    if isinstance(exc, ConnectionFailure):
        return True
    if not isinstance(exc, PyMongoError):
        return False
    if any(exc.has_error_label(label) for label in TRANSIENT_LABELS):
        return True
    return getattr(exc, "code", None) in TRANSIENT_CODES


def describe(exc: BaseException) -> str:
    """The server's answer in one line: code, code name and message, without the reply dump
    the driver adds to its own text."""
    code = _details(exc).get("code")
    if not isinstance(code, int):
        return shorten(f"{type(exc).__name__}: {exc}")
    name = _code_name(exc)
    text = f"error {code}{f' ({name})' if name else ''}: {shorten(_message(exc))}"
    if code == _THROTTLED:
        text += " (the server is throttling requests: raise its provisioned throughput)"
    elif code in _NOT_PRIMARY:
        text += " (no writable primary: an election in progress?)"
    return text


def database_error(operation: str, exc: PyMongoError) -> DatabaseError:
    """The :class:`DatabaseError` for a permanent error met while doing ``operation``."""
    code = getattr(exc, "code", None)
    if isinstance(exc, OperationFailure) and code is not None:
        return DatabaseError(
            operation=operation,
            code=code,
            code_name=_code_name(exc),
            detail=_message(exc),
            fix=_FIXES.get(code, _DEFAULT_FIX),
        )
    return DatabaseError(
        operation=operation,
        code=None,
        detail=f"{type(exc).__name__}: {exc}",
        fix=_DEFAULT_FIX,
    )


class TryAgain(Exception):
    """A transient error met while doing ``operation``: the caller's waiter tries again after
    a nap, and reports ``str(self)`` if the deadline comes first."""

    def __init__(self, operation: str, cause: BaseException) -> None:
        super().__init__(f"{operation}: {describe(cause)}")
        self.operation = operation
        self.cause = cause


@contextmanager
def sorted_errors(operation: str) -> Iterator[None]:
    """Around one step of a call: a transient driver error becomes :class:`TryAgain`, a
    permanent one :class:`DatabaseError`; anything else passes through untouched."""
    try:
        yield
    except PyMongoError as exc:
        if is_transient(exc):
            raise TryAgain(operation, exc) from exc
        raise database_error(operation, exc) from exc


def _details(exc: BaseException) -> Mapping[str, Any]:
    """The server's reply behind an error (``NotPrimaryError`` has one too, though it is a
    connection failure rather than an ``OperationFailure``)."""
    details = getattr(exc, "details", None)
    return details if isinstance(details, Mapping) else {}


def _code_name(exc: BaseException) -> str | None:
    details = _details(exc)
    name = details.get("codeName")
    if isinstance(name, str) and name:
        return name
    return TRANSIENT_CODES.get(details.get("code", -1))


def _message(exc: BaseException) -> str:
    message = _details(exc).get("errmsg")
    return str(message) if message else str(exc)
