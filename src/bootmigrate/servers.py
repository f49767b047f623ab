"""Which server this is, and whether the lock (and a transactional plan) can be safe on it.

Users point bootmigrate at MongoDB look-alikes: Amazon DocumentDB, Azure Cosmos DB for MongoDB
(RU and vCore), FerretDB. The lock is only as safe as the server's atomic ``findAndModify``,
and a transactional migration needs one transaction to write the control and history
collections. :func:`detect_server` tells the servers apart from what they say about themselves
(the host names they are reached at, ``hello`` and ``buildInfo``: two round trips), and
:func:`refuse_unsafe_lock` and :func:`prepare_transactions` decide.

None of this runs on the boot where nothing is pending: the runner calls it only when the lock
is about to be taken, once per ``migrate()`` call. ``docs/deployments.md`` has the support
matrix and the sources of every fact used here.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from .drivers import transaction
from .errors import InvalidMigrations, MigrationError
from .events import Emitter
from .history import History, create_collection

log = logging.getLogger("bootmigrate")

Kind = Literal[
    "mongodb",
    "documentdb",
    "cosmos-ru",
    "cosmos-vcore",
    "ferretdb-1",
    "ferretdb-2",
    "unknown-compatible",
]
Topology = Literal["replica-set", "sharded", "standalone"]

# The host names each service hands out (its documentation, and the suffixes MongoDB's own
# drivers and tools match to recognise it). Checked in order: vCore before the generic RU one.
_HOST_SUFFIXES: tuple[tuple[str, Kind], ...] = (
    (".mongocluster.cosmos.azure.com", "cosmos-vcore"),
    (".cosmos.azure.com", "cosmos-ru"),
    (".mongo.cosmos.azure.cn", "cosmos-ru"),
    (".documents.azure.com", "cosmos-ru"),  # accounts created with server version 3.2
    (".documents.azure.cn", "cosmos-ru"),
    (".docdb.amazonaws.com", "documentdb"),
    (".docdb-elastic.amazonaws.com", "documentdb"),
)

_NAMES: dict[Kind, str] = {
    "mongodb": "MongoDB",
    "documentdb": "Amazon DocumentDB",
    "cosmos-ru": "Azure Cosmos DB for MongoDB (RU)",
    "cosmos-vcore": "Azure Cosmos DB for MongoDB (vCore)",
    "ferretdb-1": "FerretDB",
    "ferretdb-2": "FerretDB",
    "unknown-compatible": "a MongoDB-compatible server",
}

# Error code of a command the server does not have (CommandNotFound).
COMMAND_NOT_FOUND = 59


@dataclass(frozen=True)
class Server:
    """What a server is, as far as the lock and transactions are concerned.

    ``kind`` is the family; ``name`` names it for people (with its own version, when it
    reports one); ``version`` is the MongoDB version it reports. ``transactions``: whether
    one transaction can write both the control and the history collection (``None``: not
    known, so a transactional plan probes it). ``change_streams``: whether waiters can
    follow the control document (``None``: not known; waiters find out by opening one).
    """

    kind: Kind
    name: str
    version: str
    topology: Topology
    transactions: bool | None
    change_streams: bool | None


class UnsupportedServer(MigrationError):
    """The server cannot keep the migration lock safe; nothing was written.

    ``server`` names it, ``problem`` says why the lock cannot be safe there, ``fix`` what to
    do instead.
    """

    def __init__(self, *, server: str, problem: str, fix: str) -> None:
        # The fields it is built from, so that it pickles (see MigrationError).
        self._fields = {"server": server, "problem": problem, "fix": fix}
        self.server = server
        self.problem = problem
        self.fix = fix
        super().__init__(
            f"refusing to take the migration lock on {server}: {problem} {fix} Nothing was written."
        )


def parse_server(
    hello: Mapping[str, Any], build_info: Mapping[str, Any], hosts: Iterable[str] = ()
) -> Server:
    """The :class:`Server` that replied ``hello`` and ``buildInfo``, reached at ``hosts``
    (``host`` or ``host:port``). Pure: recorded replies can be parsed as well as live ones."""
    version = str(build_info.get("version") or "unknown")
    topology = _topology(hello)
    kind, own_version = _kind(build_info, _host_names(hosts, hello))
    if kind == "unknown-compatible":
        name = own_version or f"{_NAMES[kind]} (reporting MongoDB {version})"
    else:
        name = f"{_NAMES[kind]} {own_version or version}"
    return Server(
        kind=kind,
        name=name,
        version=version,
        topology=topology,
        transactions=_transactions(kind, topology, hello, version),
        change_streams=_change_streams(kind, topology),
    )


async def detect_server(db: Any, events: Emitter | None = None) -> Server:
    """Ask the server behind ``db`` what it is: ``hello`` and ``buildInfo`` (two round
    trips), and the host names the client was given. What it found is an event of
    ``events`` (default: a log record only)."""
    try:
        hello = await db.command("hello")
    except OperationFailure as exc:
        if exc.code != COMMAND_NOT_FOUND:
            raise
        hello = await db.command("isMaster")  # servers that predate `hello`
    try:
        build_info = await db.command("buildInfo")
    except OperationFailure:
        build_info = {}  # a server that hides it is judged by the rest
    server = parse_server(hello, build_info, _seed_hosts(db))
    events = events or Emitter.new()
    events.emit(
        "server_detected",
        "server: %s (%s, %s)",
        server.name,
        server.kind,
        server.topology,
        server_kind=server.kind,
        server_name=server.name,
        server_version=server.version,
        topology=server.topology,
    )
    for warning in server_warnings(server):
        events.emit(
            "server_warning",
            "%s",
            warning,
            level=logging.WARNING,
            server_kind=server.kind,
            server_name=server.name,
        )
    return server


def refuse_unsafe_lock(server: Server) -> None:
    """Raise :class:`UnsupportedServer` where two processes could both take the lock."""
    if server.kind == "ferretdb-1":
        raise UnsupportedServer(
            server=server.name,
            problem=(
                "FerretDB 1.x runs findAndModify as a read followed by a rewrite of the "
                "document by its _id, without checking the filter again, so two replicas can "
                "both see `locked: false` and both take the lock, and run the same migrations "
                "at once."
            ),
            fix=(
                "Upgrade to FerretDB 2.x (PostgreSQL with the DocumentDB extension), or migrate "
                "against MongoDB; see docs/deployments.md."
            ),
        )


def server_warnings(server: Server) -> list[str]:
    """What an operator should know about running the lock on ``server`` (logged once)."""
    notes: dict[Kind, str] = {
        "documentdb": (
            "change streams are off by default on Amazon DocumentDB: waiting replicas poll "
            "unless they are enabled (modifyChangeStreams) for this database"
        ),
        "cosmos-ru": (
            "Azure Cosmos DB for MongoDB (RU) throttles with error 16500 (TooManyRequests) "
            "when a collection runs out of request units: enable Server Side Retry, or a "
            "throttled lock write fails the boot; a transaction may only touch one "
            "collection, so transactional migrations are refused"
        ),
        "cosmos-vcore": (
            "on Azure Cosmos DB for MongoDB (vCore) change streams are a feature to enable, "
            "and a transaction lives at most 30 s"
        ),
        "ferretdb-2": (
            "FerretDB 2.x has no multi-document transactions (transactional migrations are "
            "refused) and no change streams (waiting replicas poll); its findAndModify runs "
            "in the DocumentDB extension, which bootmigrate's lock tests have not exercised: "
            "run them against it (MONGODB_URI) before relying on it"
        ),
        "unknown-compatible": (
            "not a server bootmigrate knows; the lock relies on its findAndModify being "
            "atomic on one document"
        ),
    }
    note = notes.get(server.kind)
    return [f"{server.name}: {note}"] if note else []


async def prepare_transactions(
    db: Any, server: Server, wanted: Sequence[str], *, control: Any, history: History
) -> None:
    """Before the lock is taken for a plan with transactional migrations (``wanted``):
    refuse (``InvalidMigrations``, nothing written) where one transaction cannot write the
    control and history collections. Otherwise create the history collection now, outside
    any transaction, since some servers cannot create one inside; and where it is not known
    whether a transaction can span both collections, try one (a refusal then leaves at most
    the two collections, empty)."""
    reason = transaction_refusal(server)
    if reason is None:
        await history.ensure_collection()
        if server.transactions is None:
            await create_collection(control)  # as acquiring would; a transaction cannot
            error = await probe_transaction(db, control, history.collection)
            if error is not None:
                reason = (
                    f"{server.name} could not write the control and history collections in "
                    f"one transaction ({error})"
                )
    if reason is not None:
        raise InvalidMigrations(
            f"migration {', '.join(wanted)} declares `transactional = True`, but {reason}. "
            "Run it on a deployment with multi-document transactions (a MongoDB replica set, "
            "even of one node, or a sharded cluster), or remove the declaration; nothing was "
            "run."
        )


def transaction_refusal(server: Server) -> str | None:
    """Why a transactional migration cannot run on ``server``, or ``None`` if it can (or
    may: ``server.transactions`` is then ``None`` and a probe decides)."""
    if server.transactions is not False:
        return None
    if server.kind == "cosmos-ru":
        return (
            f"{server.name} runs a transaction within one collection only, and a "
            "transactional migration also writes the control and history collections"
        )
    if server.kind in ("ferretdb-1", "ferretdb-2"):
        return f"{server.name} does not implement multi-document transactions"
    if server.topology == "standalone":
        return "this deployment does not support transactions (a standalone server)"
    return f"this deployment ({server.name}, {server.topology}) does not support transactions"


async def probe_transaction(db: Any, control: Any, history: Any) -> str | None:
    """Try one transaction that inserts into both collections, then abort it: ``None`` if
    the server accepted both writes, else its error. Nothing is left behind, since the
    transaction never commits."""
    probe = {"_id": f"bootmigrate-probe-{uuid.uuid4().hex}"}
    try:
        async with transaction(db, commit_within=5.0) as session:  # aborted, never committed
            await control.insert_one(dict(probe), session=session)
            await history.insert_one(dict(probe), session=session)
            raise _ProbeDone
    except _ProbeDone:
        return None
    except ConnectionFailure:
        raise  # not an answer about transactions: the caller's retry decides
    except OperationFailure as exc:
        return f"error {exc.code}: {(exc.details or {}).get('errmsg') or exc}"
    except PyMongoError as exc:
        return str(exc)


class _ProbeDone(Exception):
    """Raised inside the probe's transaction so that it aborts instead of committing."""


def _topology(hello: Mapping[str, Any]) -> Topology:
    if hello.get("msg") == "isdbgrid":
        return "sharded"
    if hello.get("setName"):
        return "replica-set"
    return "standalone"


def _kind(build_info: Mapping[str, Any], hosts: set[str]) -> tuple[Kind, str | None]:
    """The family, and the server's own version where it reports one apart from the MongoDB
    version it emulates."""
    ferretdb = build_info.get("ferretdb")
    if isinstance(ferretdb, Mapping):  # FerretDB 2.x: {"ferretdb": {"version": "v2.7.0", ...}}
        return "ferretdb-2", str(ferretdb.get("version") or "2.x")
    if "ferretdbVersion" in build_info:  # FerretDB 1.x: {"ferretdbVersion": "v1.24.2", ...}
        return "ferretdb-1", str(build_info["ferretdbVersion"])
    if "secantusVersion" in build_info:  # the embedded test server
        return "unknown-compatible", f"SecantusDB {build_info['secantusVersion']}"
    for host in hosts:
        for suffix, kind in _HOST_SUFFIXES:
            if host.endswith(suffix):
                return kind, None
    if "_t" in build_info:  # Cosmos DB's own reply type (`"_t": "BuildInfoResponse"`)
        return "cosmos-ru", None
    return "mongodb", None


def _transactions(
    kind: Kind, topology: Topology, hello: Mapping[str, Any], version: str
) -> bool | None:
    """Whether a transaction can span the control and history collections."""
    # Transactions need a replica set or a mongos, whatever the server: the drivers only
    # send them there.
    if topology == "standalone" or hello.get("logicalSessionTimeoutMinutes") is None:
        return False
    if kind in ("ferretdb-1", "ferretdb-2", "cosmos-ru"):
        return False
    if kind in ("cosmos-vcore", "unknown-compatible"):
        return None  # documented only in part: probed
    needed = (4, 2) if topology == "sharded" else (4, 0)
    return _major_minor(version) >= needed


def _change_streams(kind: Kind, topology: Topology) -> bool | None:
    if kind in ("ferretdb-1", "ferretdb-2") or topology == "standalone":
        return False
    if kind == "mongodb":
        return True
    return None  # off by default, or with restrictions: the watcher finds out


def _major_minor(version: str) -> tuple[int, int]:
    major, minor, *_ = [*(int(n) for n in re.findall(r"\d+", version)[:2]), 0, 0]
    return major, minor


def _host_names(hosts: Iterable[str], hello: Mapping[str, Any]) -> set[str]:
    """Lower-case host names, without ports, from the client's seeds and the replica set's
    own list of its members."""
    names = [*hosts, *(hello.get("hosts") or ()), hello.get("me") or "", hello.get("primary") or ""]
    return {str(n).rsplit(":", 1)[0].lower().rstrip(".") for n in names if n}


def _seed_hosts(db: Any) -> list[str]:
    try:
        return [host for host, _port in db.client.topology_description.server_descriptions()]
    except Exception:  # only a hint; hello's own host list is the other one
        return []
