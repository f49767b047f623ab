"""A MongoDB wire proxy for fault tests: it relays every message between the clients and a
server, and answers ``configureFailPoint`` itself, in the server's ``failCommand`` vocabulary.

SecantusDB has no fail points; with this proxy in front of it the same test code injects the
same faults as on a real MongoDB started with test commands enabled. Both directions are
relayed as framed messages, independently (streaming ``hello`` and exhaust cursors send many
replies to one request), and a message is decoded and rewritten only when a fail point needs
it. See docs/reliability.md, "The fault instrument".
"""

from __future__ import annotations

import asyncio
import datetime
import random
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.codec_options import CodecOptions, DatetimeConversion

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

CHECKSUM_PRESENT = 1
MORE_TO_COME = 1 << 1

HEADER = struct.Struct("<iiii")
MAX_MESSAGE = 64 * 1024 * 1024
# Decoded documents are re-encoded only when changed; keep out-of-range dates as they are.
CODEC: CodecOptions[dict[str, Any]] = CodecOptions(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)

HELLO_NAMES = frozenset({"hello", "isMaster", "ismaster"})
# The server matches failCommands against a command's name or one of its aliases.
ALIASES = {
    "isMaster": "hello",
    "ismaster": "hello",
    "findandmodify": "findAndModify",
}
PROXY_FAIL_POINTS = frozenset({"failCommand", "skewLocalTime"})
DEFAULT_ERRMSG = "Failing command via 'failCommand' failpoint"

CODE_NAMES = {
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    9: "FailedToParse",
    11: "UserNotFound",
    13: "Unauthorized",
    14: "TypeMismatch",
    24: "LockTimeout",
    26: "NamespaceNotFound",
    43: "CursorNotFound",
    48: "NamespaceExists",
    50: "MaxTimeMSExpired",
    59: "CommandNotFound",
    64: "WriteConcernFailed",
    79: "UnknownReplWriteConcern",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    96: "OperationFailed",
    100: "UnsatisfiableWriteConcern",
    112: "WriteConflict",
    121: "DocumentValidationFailure",
    133: "FailedToSatisfyReadPreference",
    134: "ReadConcernMajorityNotAvailableYet",
    189: "PrimarySteppedDown",
    251: "NoSuchTransaction",
    262: "ExceededTimeLimit",
    267: "PreparedTransactionInProgress",
    279: "ClientDisconnect",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11601: "Interrupted",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
}
# Codes a 4.4+ server labels RetryableWriteError on a retryable write (retryable writes spec).
RETRYABLE_CODES = frozenset({6, 7, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})
# Codes a server labels TransientTransactionError inside a transaction (commit/abort aside).
TRANSIENT_CODES = frozenset({24, 112, 251, 267})


class ConfigError(Exception):
    """A ``configureFailPoint`` the proxy refuses, answered as the server would (BadValue)."""


# --- framing ---------------------------------------------------------------------------


@dataclass
class Message:
    """One wire message: its header fields and the bytes after the 16-byte header."""

    request_id: int
    response_to: int
    op_code: int
    payload: bytes

    def to_bytes(self) -> bytes:
        header = HEADER.pack(
            16 + len(self.payload), self.request_id, self.response_to, self.op_code
        )
        return header + self.payload

    @property
    def more_to_come(self) -> bool:
        return self.op_code == OP_MSG and bool(_msg_flags(self.payload) & MORE_TO_COME)


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next framed message, or None when the peer closed the connection."""
    try:
        header = await reader.readexactly(16)
        length, request_id, response_to, op_code = HEADER.unpack(header)
        if not 16 <= length <= MAX_MESSAGE:
            return None  # not the MongoDB protocol: drop the connection
        payload = await reader.readexactly(length - 16)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return Message(request_id, response_to, op_code, payload)


def _msg_flags(payload: bytes) -> int:
    return int(struct.unpack_from("<I", payload)[0])


def _cstring_end(data: bytes, start: int) -> int:
    return data.index(b"\x00", start)


def _doc_end(data: bytes, start: int) -> int:
    return start + int(struct.unpack_from("<i", data, start)[0])


def split_op_msg(payload: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """OP_MSG flags and its sections as (kind, raw bytes after the kind byte); the checksum,
    if any, is left out."""
    flags = _msg_flags(payload)
    end = len(payload) - (4 if flags & CHECKSUM_PRESENT else 0)
    sections: list[tuple[int, bytes]] = []
    pos = 4
    while pos < end:
        kind = payload[pos]
        size = int(struct.unpack_from("<i", payload, pos + 1)[0])  # both kinds start with a size
        sections.append((kind, payload[pos + 1 : pos + 1 + size]))
        pos += 1 + size
    return flags, sections


def join_op_msg(flags: int, sections: list[tuple[int, bytes]]) -> bytes:
    """An OP_MSG payload; the checksum flag is dropped since the bytes changed."""
    parts = [struct.pack("<I", flags & ~CHECKSUM_PRESENT)]
    for kind, raw in sections:
        parts.append(bytes([kind]) + raw)
    return b"".join(parts)


def op_msg_body(payload: bytes) -> dict[str, Any]:
    """The kind-0 section of an OP_MSG, decoded."""
    _, sections = split_op_msg(payload)
    for kind, raw in sections:
        if kind == 0:
            return bson.decode(raw, CODEC)
    raise ValueError("OP_MSG without a body section")


def replace_op_msg_body(payload: bytes, body: dict[str, Any]) -> bytes:
    flags, sections = split_op_msg(payload)
    encoded = bson.encode(body, codec_options=CODEC)
    return join_op_msg(flags, [(k, encoded if k == 0 else raw) for k, raw in sections])


@dataclass
class LegacyQuery:
    """The parts of an OP_QUERY: flags, namespace, skip, limit, query and field selector."""

    flags: int
    namespace: str
    skip: int
    limit: int
    query: bytes
    rest: bytes

    @classmethod
    def parse(cls, payload: bytes) -> LegacyQuery:
        (flags,) = struct.unpack_from("<i", payload)
        name_end = _cstring_end(payload, 4)
        namespace = payload[4:name_end].decode()
        skip, limit = struct.unpack_from("<ii", payload, name_end + 1)
        start = name_end + 9
        end = _doc_end(payload, start)
        return cls(flags, namespace, skip, limit, payload[start:end], payload[end:])

    def to_payload(self) -> bytes:
        return (
            struct.pack("<i", self.flags)
            + self.namespace.encode()
            + b"\x00"
            + struct.pack("<ii", self.skip, self.limit)
            + self.query
            + self.rest
        )


REPLY_PREFIX = struct.Struct("<iqii")  # OP_REPLY: flags, cursorID, startingFrom, numberReturned


def op_reply_documents(payload: bytes) -> list[dict[str, Any]]:
    return bson.decode_all(payload[REPLY_PREFIX.size :], CODEC)


def op_reply_payload(docs: list[dict[str, Any]], prefix: bytes) -> bytes:
    return prefix + b"".join(bson.encode(d, codec_options=CODEC) for d in docs)


# --- commands ----------------------------------------------------------------------------


@dataclass
class Command:
    """A command a client sent: its name (first key), database and body."""

    name: str
    db: str
    body: dict[str, Any]

    @property
    def namespace(self) -> str:
        """The namespace the server gives the command, as failCommand's ``namespace`` sees it."""
        target = self.body.get("collection") if self.name == "getMore" else self.body[self.name]
        return f"{self.db}.{target}" if isinstance(target, str) else f"{self.db}.$cmd"

    @property
    def in_transaction(self) -> bool:
        return "autocommit" in self.body

    @property
    def retryable_write(self) -> bool:
        ends_transaction = self.name in ("commitTransaction", "abortTransaction")
        return ends_transaction or ("txnNumber" in self.body and not self.in_transaction)


def parse_command(message: Message) -> Command | None:
    """The command in a request, or None for anything else (OP_COMPRESSED, legacy ops)."""
    if message.op_code == OP_MSG:
        body = op_msg_body(message.payload)
        return Command(next(iter(body)), str(body.get("$db", "")), body) if body else None
    if message.op_code == OP_QUERY:
        query = LegacyQuery.parse(message.payload)
        if not query.namespace.endswith(".$cmd"):
            return None
        body = bson.decode(query.query, CODEC)
        if "$query" in body:  # the old wrapped form
            body = body["$query"]
        return Command(next(iter(body)), query.namespace[: -len(".$cmd")], body) if body else None
    return None


def without_compression(message: Message, command: Command) -> Message:
    """A handshake that offers no compressor, so the server agrees to none and OP_COMPRESSED
    never appears (were it to, it would be relayed untouched, unread)."""
    if "compression" not in command.body:
        return message
    body = {k: v for k, v in command.body.items() if k != "compression"}
    if message.op_code == OP_MSG:
        payload = replace_op_msg_body(message.payload, body)
    else:
        query = LegacyQuery.parse(message.payload)
        query.query = bson.encode(body, codec_options=CODEC)
        payload = query.to_payload()
    return Message(message.request_id, message.response_to, message.op_code, payload)


def error_labels(code: int, command: Command) -> list[str]:
    """The labels a 4.4+ server adds to an error with this code on this command."""
    if command.in_transaction and command.name not in ("commitTransaction", "abortTransaction"):
        return ["TransientTransactionError"] if code in TRANSIENT_CODES else []
    if command.retryable_write and code in RETRYABLE_CODES:
        return ["RetryableWriteError"]
    return []


# --- fail points -------------------------------------------------------------------------


@dataclass
class Mode:
    """When a fail point fires: ``alwaysOn``, ``off``, ``{times: N}``, ``{skip: N}`` or
    ``{activationProbability: p}``, counted on the commands that match its filters."""

    kind: str = "off"
    n: int = 0
    probability: float = 1.0

    @classmethod
    def parse(cls, mode: Any) -> Mode:
        if mode in ("alwaysOn", "off"):
            return cls(str(mode))
        if isinstance(mode, dict) and len(mode) == 1:
            ((key, value),) = mode.items()
            if key in ("times", "skip") and isinstance(value, int) and value >= 0:
                return cls(key if key == "skip" or value > 0 else "off", value)
            if key == "activationProbability" and isinstance(value, (int, float)):
                return cls("random", probability=float(value))
        raise ConfigError(
            f"mode {mode!r} is not one of 'alwaysOn', 'off', {{times: N}}, {{skip: N}}, "
            "{activationProbability: p}"
        )

    def fires(self) -> bool:
        """Whether this hit fires; counts the hit down."""
        if self.kind == "alwaysOn":
            return True
        if self.kind == "times":
            self.n -= 1
            if self.n <= 0:
                self.kind = "off"
            return True
        if self.kind == "skip":
            if self.n > 0:
                self.n -= 1
                return False
            return True
        if self.kind == "random":
            return random.random() < self.probability
        return False


@dataclass
class FailPoint:
    """A fail point's mode, its data, and how many times it fired since the proxy started."""

    mode: Mode = field(default_factory=Mode)
    data: dict[str, Any] = field(default_factory=dict)
    entered: int = 0


@dataclass
class Fault:
    """What ``failCommand`` does to one command it fired on."""

    block_seconds: float = 0.0
    close_connection: bool = False
    error: dict[str, Any] | None = None
    write_concern_error: dict[str, Any] | None = None
    drop_reply: bool = False
    delay_reply_seconds: float = 0.0


def validate(name: str, mode: Mode, data: Any) -> dict[str, Any]:
    """The fail point's data, checked so that a mistyped fault fails loudly, not silently."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: 'data' must be a document, got {data!r}")
    if mode.kind == "off":
        return data
    if name == "skewLocalTime":
        if not isinstance(data.get("seconds"), (int, float)):
            raise ConfigError("skewLocalTime needs data {seconds: <number>, appName?: <name>}")
        return data
    commands = data.get("failCommands")
    if not (isinstance(commands, list) and commands and all(isinstance(c, str) for c in commands)):
        raise ConfigError("failCommand needs data.failCommands, a list of command names")
    actions = (
        "errorCode",
        "closeConnection",
        "blockConnection",
        "writeConcernError",
        "dropReply",
        "delayReplyMS",
    )
    if not any(data.get(a) for a in actions):
        raise ConfigError(f"failCommand needs one of {', '.join(actions)} in data")
    if "errorCode" in data and not isinstance(data["errorCode"], int):
        raise ConfigError("failCommand: errorCode must be an integer")
    if data.get("blockConnection") and not isinstance(data.get("blockTimeMS"), (int, float)):
        raise ConfigError("failCommand: blockConnection needs blockTimeMS, a number")
    if "writeConcernError" in data and not isinstance(data["writeConcernError"], dict):
        raise ConfigError("failCommand: writeConcernError must be a document")
    return data


class FailPoints:
    """The proxy's fail points, shared by all its connections as a server's are."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._points = {name: FailPoint() for name in PROXY_FAIL_POINTS}

    def configure(self, body: dict[str, Any]) -> dict[str, Any]:
        """Apply a ``configureFailPoint`` command; the reply the server would give."""
        name = body["configureFailPoint"]
        if "mode" not in body:
            raise ConfigError("configureFailPoint needs a 'mode'")
        mode = Mode.parse(body["mode"])
        data = validate(name, mode, body.get("data", {}))
        with self._lock:
            point = self._points[name]
            count = point.entered
            point.mode, point.data = mode, data
        return {"count": count, "ok": 1.0}

    def all_off(self) -> None:
        """Turn every fail point off (counts of times entered are kept)."""
        with self._lock:
            for point in self._points.values():
                point.mode = Mode()

    def entered(self, name: str) -> int:
        with self._lock:
            return self._points[name].entered

    def fault_for(self, command: Command, app_name: str | None) -> Fault | None:
        """What ``failCommand`` does to this command, counting the hit if it matches."""
        if command.name == "configureFailPoint":  # never failed, as on the server
            return None
        with self._lock:
            point = self._points["failCommand"]
            data = point.data
            if point.mode.kind == "off" or not _matches(data, command, app_name):
                return None
            if not point.mode.fires():
                return None
            point.entered += 1
        fault = Fault(
            block_seconds=float(data.get("blockTimeMS", 0)) / 1000
            if data.get("blockConnection")
            else 0.0,
            close_connection=bool(data.get("closeConnection")),
            write_concern_error=data.get("writeConcernError"),
            drop_reply=bool(data.get("dropReply")),
            delay_reply_seconds=float(data.get("delayReplyMS", 0)) / 1000,
        )
        if "errorCode" in data:
            code = int(data["errorCode"])
            error: dict[str, Any] = {"ok": 0.0, "errmsg": data.get("errmsg", DEFAULT_ERRMSG)}
            error["code"] = code
            if code in CODE_NAMES:
                error["codeName"] = CODE_NAMES[code]
            labels = data["errorLabels"] if "errorLabels" in data else error_labels(code, command)
            if labels:
                error["errorLabels"] = list(labels)
            fault.error = error
        return fault

    def skew_for(self, app_name: str | None) -> float:
        """Seconds to add to ``hello.localTime`` for this connection (0 when off)."""
        with self._lock:
            point = self._points["skewLocalTime"]
            wanted = point.data.get("appName")
            if point.mode.kind == "off" or (wanted is not None and wanted != app_name):
                return 0.0
            if not point.mode.fires():
                return 0.0
            point.entered += 1
            return float(point.data["seconds"])


def _matches(data: dict[str, Any], command: Command, app_name: str | None) -> bool:
    if "appName" in data and data["appName"] != app_name:
        return False
    if "namespace" in data and data["namespace"] != command.namespace:
        return False
    name = ALIASES.get(command.name, command.name)
    return any(ALIASES.get(c, c) == name for c in data["failCommands"])


# --- the proxy ---------------------------------------------------------------------------


@dataclass
class ReplyPlan:
    """What to do with the reply to one request, decided when the request passed."""

    command: Command
    write_concern_error: dict[str, Any] | None = None
    drop: bool = False
    delay: float = 0.0


class _Link:
    """One client connection and its own upstream connection, relayed both ways."""

    def __init__(
        self,
        proxy: WireProxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.server_writer: asyncio.StreamWriter | None = None
        self.app_name: str | None = None
        self.plans: dict[int, ReplyPlan] = {}

    def abort(self) -> None:
        """Cut both connections at once, as a crashed peer or a closed socket would."""
        for writer in (self.client_writer, self.server_writer):
            if writer is not None:
                writer.transport.abort()

    async def run(self) -> None:
        try:
            server_reader, self.server_writer = await asyncio.open_connection(
                self.proxy.upstream_host, self.proxy.upstream_port
            )
        except OSError:
            self.abort()
            return
        directions = [
            asyncio.ensure_future(self._client_to_server()),
            asyncio.ensure_future(self._server_to_client(server_reader)),
        ]
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.abort()
            for task in directions:
                task.cancel()
            await asyncio.gather(*directions, return_exceptions=True)

    def _reply(self, request: Message, doc: dict[str, Any]) -> None:
        if request.more_to_come:
            return  # an unacknowledged request gets no reply
        if request.op_code == OP_QUERY:
            payload = op_reply_payload([doc], REPLY_PREFIX.pack(0, 0, 0, 1))
            op_code = OP_REPLY
        else:
            payload = join_op_msg(0, [(0, bson.encode(doc, codec_options=CODEC))])
            op_code = OP_MSG
        reply = Message(self.proxy.next_request_id(), request.request_id, op_code, payload)
        self.client_writer.write(reply.to_bytes())

    async def _client_to_server(self) -> None:
        assert self.server_writer is not None
        while (message := await read_message(self.client_reader)) is not None:
            command = parse_command(message)
            if command is None:
                self.server_writer.write(message.to_bytes())
                continue
            if command.name in HELLO_NAMES:
                message = self._handshake(message, command)
            self.proxy.count(self.app_name, command.name)
            if command.name == "configureFailPoint" and (
                command.body["configureFailPoint"] in PROXY_FAIL_POINTS
            ):
                self._reply(message, self.proxy.configure(command))
                continue
            if command.name == "waitForFailPoint" and (
                command.body["waitForFailPoint"] in PROXY_FAIL_POINTS
            ):
                self._reply(message, await self.proxy.wait_for_fail_point(command))
                continue
            fault = self.proxy.fail_points.fault_for(command, self.app_name)
            plan = ReplyPlan(command)
            if fault is not None:
                if fault.block_seconds:
                    await asyncio.sleep(fault.block_seconds)
                if fault.close_connection:
                    self.abort()
                    return
                if fault.error is not None:
                    self._reply(message, fault.error)
                    continue
                plan.write_concern_error = fault.write_concern_error
                plan.drop = fault.drop_reply
                plan.delay = fault.delay_reply_seconds
            if command.name in HELLO_NAMES or plan.write_concern_error or plan.drop or plan.delay:
                self.plans[message.request_id] = plan
            self.server_writer.write(message.to_bytes())

    def _handshake(self, message: Message, command: Command) -> Message:
        """Learn the connection's appName; take ``compression`` out so none is negotiated."""
        client = command.body.get("client")
        if isinstance(client, dict) and self.app_name is None:
            name = client.get("application", {}).get("name")
            self.app_name = str(name) if name is not None else None
        return without_compression(message, command)

    async def _server_to_client(self, server_reader: asyncio.StreamReader) -> None:
        while (message := await read_message(server_reader)) is not None:
            plan = self.plans.pop(message.response_to, None)
            if plan is not None:
                if message.more_to_come:  # exhaust: the next reply answers this one
                    self.plans[message.request_id] = plan
                if plan.drop:
                    self.abort()
                    return
                if plan.delay:  # the command ran; its answer is slow to come back
                    await asyncio.sleep(plan.delay)
                message = self._rewrite_reply(message, plan)
            self.client_writer.write(message.to_bytes())

    def _rewrite_reply(self, message: Message, plan: ReplyPlan) -> Message:
        if message.op_code == OP_MSG:
            body = op_msg_body(message.payload)
            if not self._rewrite_body(body, plan):
                return message
            payload = replace_op_msg_body(message.payload, body)
        elif message.op_code == OP_REPLY:
            docs = op_reply_documents(message.payload)
            if not docs or not self._rewrite_body(docs[0], plan):
                return message
            payload = op_reply_payload(docs, message.payload[: REPLY_PREFIX.size])
        else:
            return message
        return Message(message.request_id, message.response_to, message.op_code, payload)

    def _rewrite_body(self, body: dict[str, Any], plan: ReplyPlan) -> bool:
        """Change a reply in place; whether anything changed."""
        changed = False
        if plan.command.name in HELLO_NAMES:
            if body.pop("compression", None) is not None:
                changed = True
            skew = self.proxy.fail_points.skew_for(self.app_name)
            local_time = body.get("localTime")
            if skew and isinstance(local_time, datetime.datetime):
                body["localTime"] = local_time + datetime.timedelta(seconds=skew)
                changed = True
        if plan.write_concern_error is not None and body.get("ok"):
            body["writeConcernError"] = dict(plan.write_concern_error)
            code = plan.write_concern_error.get("code")
            if isinstance(code, int) and "errorLabels" not in body:
                labels = error_labels(code, plan.command)
                if labels:
                    body["errorLabels"] = labels
            changed = True
        return changed


class WireProxy:
    """A MongoDB wire proxy on 127.0.0.1 in front of ``upstream`` ("host:port"), with the
    ``failCommand`` and ``skewLocalTime`` fail points. Runs its own event loop in a daemon
    thread: ``start()``/``stop()``, or use it as a context manager."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream_host = host.strip("[]") or "127.0.0.1"
        self.upstream_port = int(port)
        self.port = 0
        self.fail_points = FailPoints()
        self._counts: Counter[tuple[str | None, str]] = Counter()
        self._counts_lock = threading.Lock()
        self._request_ids = iter(range(1 << 30, 1 << 31))
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def uri(self) -> str:
        """A connection string for clients to go through the proxy."""
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> WireProxy:
        """Listen on a free port; returns once clients can connect."""
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="wire-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the wire proxy did not start listening within 10 s")
        return self

    def stop(self) -> None:
        """Close the listener and every relayed connection, and end the thread."""
        if self._thread is None:
            return
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(5)
        self._thread = None

    def __enter__(self) -> WireProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Counting, from any thread.

    def count(self, app_name: str | None, command: str) -> None:
        with self._counts_lock:
            self._counts[(app_name, command)] += 1

    def command_counts(self, app_name: str | None = None) -> Counter[str]:
        """How many of each command passed through (fail points' victims included), from
        clients with this appName, or from all clients when it is None."""
        with self._counts_lock:
            counts: Counter[str] = Counter()
            for (app, command), n in self._counts.items():
                if app_name is None or app == app_name:
                    counts[command] += n
            return counts

    def reset_counts(self) -> None:
        with self._counts_lock:
            self._counts.clear()

    # The loop's side.

    def next_request_id(self) -> int:
        return next(self._request_ids)

    def configure(self, command: Command) -> dict[str, Any]:
        if command.db != "admin":
            return {
                "ok": 0.0,
                "errmsg": "configureFailPoint may only be run against the admin database.",
                "code": 13,
                "codeName": "Unauthorized",
            }
        try:
            return self.fail_points.configure(command.body)
        except ConfigError as exc:
            return {"ok": 0.0, "errmsg": str(exc), "code": 2, "codeName": "BadValue"}

    async def wait_for_fail_point(self, command: Command) -> dict[str, Any]:
        """``waitForFailPoint``: until the fail point has fired ``timesEntered`` times in all."""
        name = command.body["waitForFailPoint"]
        target = int(command.body.get("timesEntered", 1))
        deadline = time.monotonic() + float(command.body.get("maxTimeMS", 30_000)) / 1000
        while self.fail_points.entered(name) < target:
            if time.monotonic() > deadline:
                return {
                    "ok": 0.0,
                    "errmsg": f"{name} was not entered {target} times in time",
                    "code": 50,
                    "codeName": "MaxTimeMSExpired",
                }
            await asyncio.sleep(0.005)
        return {"ok": 1.0}

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._loop.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(self, reader, writer)
        self._links.add(link)
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # stop(): asyncio's stream callback would log a cancelled task as an error
        finally:
            self._links.discard(link)
