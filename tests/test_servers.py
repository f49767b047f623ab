"""What bootmigrate makes of the server it runs against, and what it refuses there.

Two halves. Parsing of recorded ``hello``/``buildInfo`` replies of the MongoDB look-alikes,
which cannot run here: the replies are data (each one says where its shape comes from), and the
parser is pure. Then the real test server: what it reports, that detection happens only when
the lock is about to be taken, and that a transactional migration finds its history collection
already created on a fresh database.
"""

from __future__ import annotations

import os
import pickle
from datetime import datetime
from typing import Any

import pytest

from bootmigrate import InvalidMigrations, Migration, MigrationError, UnsupportedServer, migrate
from bootmigrate.servers import (
    Server,
    detect_server,
    parse_server,
    refuse_unsafe_lock,
    transaction_refusal,
)
from tests.clients import open_client
from tests.command_monitor import CommandLog
from tests.databases import async_database
from tests.in_process import control, dead_holder_lock, history, recorder, recorders

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 11, 26, 7, 0, 0)

# MongoDB's `hello` fields as the manual lists them
# (https://www.mongodb.com/docs/manual/reference/command/hello/): a replica set member adds
# setName, hosts, primary, me; a mongos answers `msg: "isdbgrid"`; every deployment with
# sessions reports logicalSessionTimeoutMinutes.
MONGODB_COMMON = {
    "isWritablePrimary": True,
    "maxBsonObjectSize": 16777216,
    "maxMessageSizeBytes": 48000000,
    "maxWriteBatchSize": 100000,
    "localTime": NOW,
    "logicalSessionTimeoutMinutes": 30,
    "connectionId": 7,
    "minWireVersion": 0,
    "maxWireVersion": 21,
    "readOnly": False,
    "ok": 1.0,
}
MONGODB_RS_HELLO = {
    **MONGODB_COMMON,
    "hosts": [
        "ac-abc-shard-00-00.xyz.mongodb.net:27017",
        "ac-abc-shard-00-01.xyz.mongodb.net:27017",
    ],
    "setName": "atlas-abc-shard-0",
    "setVersion": 9,
    "secondary": False,
    "primary": "ac-abc-shard-00-00.xyz.mongodb.net:27017",
    "me": "ac-abc-shard-00-00.xyz.mongodb.net:27017",
}
MONGOS_HELLO = {**MONGODB_COMMON, "msg": "isdbgrid"}
STANDALONE_HELLO = dict(MONGODB_COMMON)
# buildInfo as the manual lists it (https://www.mongodb.com/docs/manual/reference/command/buildInfo/).
MONGODB_BUILD_INFO = {
    "version": "7.0.14",
    "gitVersion": "0" * 40,
    "modules": [],
    "allocator": "tcmalloc",
    "javascriptEngine": "mozjs",
    "sysInfo": "deprecated",
    "versionArray": [7, 0, 14, 0],
    "bits": 64,
    "debug": False,
    "maxBsonObjectSize": 16777216,
    "storageEngines": ["devnull", "wiredTiger"],
    "ok": 1.0,
}

# FerretDB 1.x: internal/handler/msg_buildinfo.go and msg_hello.go at tag v1.24.2 of
# github.com/FerretDB/FerretDB. buildInfo carries `ferretdbVersion`; hello has no setName
# unless FerretDB was started with --repl-set-name.
FERRETDB_1_BUILD_INFO = {
    "version": "7.0.42",
    "gitVersion": "e9ed0af0e5d4b4bd1a5a1cb6e0c0ea2c5bbd7c79",
    "modules": [],
    "sysInfo": "deprecated",
    "versionArray": [7, 0, 42, 0],
    "bits": 64,
    "debug": False,
    "maxBsonObjectSize": 16777216,
    "buildEnvironment": {},
    "ferretdbVersion": "v1.24.2",
    "ferretdbFeatures": {"aggregationStages": ["$match", "$group"]},
    "ok": 1.0,
}
FERRETDB_1_HELLO = {**MONGODB_COMMON, "maxWireVersion": 21}
# FerretDB 2.x: internal/handler/msg_buildinfo.go and msg_hello.go at tag v2.7.0: buildInfo
# carries a `ferretdb` document instead; started with --repl-set-name=rs0 it reports setName
# and one host.
FERRETDB_2_BUILD_INFO = {
    **{k: v for k, v in FERRETDB_1_BUILD_INFO.items() if not k.startswith("ferretdb")},
    "version": "7.0.77",
    "versionArray": [7, 0, 77, 0],
    "ferretdb": {"version": "v2.7.0", "package": "docker"},
}
FERRETDB_2_HELLO = {
    **MONGODB_COMMON,
    "setName": "rs0",
    "hosts": ["localhost:27017"],
    "saslSupportedMechs": ["SCRAM-SHA-256"],
}

# Azure Cosmos DB for MongoDB (RU): reached at *.mongo.cosmos.azure.com:10255 with
# replicaSet=globaldb in the connection string Azure hands out (so hello's setName is
# "globaldb": a driver refuses a member whose setName differs); endpoint format from
# MicrosoftDocs/azure-databases-docs, articles/cosmos-db/mongodb/feature-support-70.md.
# No full Cosmos reply is published: the other fields are MongoDB's, and only the host name
# and setName are Cosmos's own.
COSMOS_RU_HOSTS = ["myaccount.mongo.cosmos.azure.com:10255"]
COSMOS_RU_HELLO = {
    **MONGODB_COMMON,
    "setName": "globaldb",
    "hosts": COSMOS_RU_HOSTS,
    "primary": COSMOS_RU_HOSTS[0],
    "me": COSMOS_RU_HOSTS[0],
    "maxWireVersion": 21,
}
COSMOS_RU_BUILD_INFO = {**MONGODB_BUILD_INFO, "version": "7.0.0", "versionArray": [7, 0, 0, 0]}
# An older Cosmos DB reply, recorded in mongodb-js/mongodb-build-info test/fixtures.js
# (COSMOSDB_BUILD_INFO): Cosmos names its reply type in `_t`.
COSMOS_OLD_BUILD_INFO = {
    "_t": "BuildInfoResponse",
    "ok": 1,
    "version": "3.2.0",
    "gitVersion": "45d947729a0315accb6d4f15a6b06be6d9c19fe7",
    "targetMinOS": "Windows 7/Windows Server 2008 R2",
    "modules": [],
    "allocator": "tcmalloc",
    "javascriptEngine": "Chakra",
    "sysInfo": "deprecated",
    "versionArray": [3, 2, 0, 0],
    "bits": 64,
    "debug": False,
    "maxBsonObjectSize": 524288,
}
# Azure Cosmos DB for MongoDB (vCore): *.mongocluster.cosmos.azure.com, from the vCore
# connection string in Microsoft's documentation and the same mongodb-build-info fixtures.
COSMOS_VCORE_HOSTS = ["fc-1234567890ab-000.mongocluster.cosmos.azure.com:10260"]
# Amazon DocumentDB: *.docdb.amazonaws.com with replicaSet=rs0 (the AWS developer guide,
# "Connecting to Amazon DocumentDB as a replica set", and mongodb-build-info's fixtures). No
# full reply is published either: buildInfo is reduced here to a version, assumed to be the
# MongoDB API version DocumentDB documents compatibility with (4.0, 5.0, 8.0); DocumentDB is
# recognised by its host name, as MongoDB's own tools do.
DOCUMENTDB_HOSTS = ["docdb-2026-01-01.cluster-abc.eu-central-1.docdb.amazonaws.com:27017"]
DOCUMENTDB_HELLO = {**MONGODB_COMMON, "setName": "rs0", "hosts": DOCUMENTDB_HOSTS}
DOCUMENTDB_BUILD_INFO = {"version": "5.0.0", "versionArray": [5, 0, 0, 0], "ok": 1.0}


def test_a_mongodb_replica_set_runs_everything() -> None:
    server = parse_server(MONGODB_RS_HELLO, MONGODB_BUILD_INFO)

    assert server == Server(
        kind="mongodb",
        name="MongoDB 7.0.14",
        version="7.0.14",
        topology="replica-set",
        transactions=True,
        change_streams=True,
    )
    assert transaction_refusal(server) is None
    refuse_unsafe_lock(server)  # does not raise


def test_a_mongos_is_a_sharded_cluster_with_transactions() -> None:
    server = parse_server(MONGOS_HELLO, MONGODB_BUILD_INFO)

    assert (server.kind, server.topology, server.transactions) == ("mongodb", "sharded", True)


def test_a_standalone_mongodb_has_neither_transactions_nor_change_streams() -> None:
    server = parse_server(STANDALONE_HELLO, MONGODB_BUILD_INFO)

    assert (server.topology, server.transactions, server.change_streams) == (
        "standalone",
        False,
        False,
    )
    assert transaction_refusal(server) == (
        "this deployment does not support transactions (a standalone server)"
    )


def test_ferretdb_1_is_refused_naming_it_why_and_what_to_do() -> None:
    server = parse_server(FERRETDB_1_HELLO, FERRETDB_1_BUILD_INFO)

    assert (server.kind, server.name, server.version) == (
        "ferretdb-1",
        "FerretDB v1.24.2",
        "7.0.42",
    )
    with pytest.raises(UnsupportedServer) as caught:
        refuse_unsafe_lock(server)
    message = str(caught.value)
    assert "FerretDB v1.24.2" in message
    assert "findAndModify" in message and "both take the lock" in message
    assert "Upgrade to FerretDB 2.x" in message and "Nothing was written" in message
    assert caught.value.server == "FerretDB v1.24.2"


def test_ferretdb_2_takes_the_lock_but_refuses_transactional_migrations() -> None:
    server = parse_server(FERRETDB_2_HELLO, FERRETDB_2_BUILD_INFO)

    assert (server.kind, server.name, server.topology) == (
        "ferretdb-2",
        "FerretDB v2.7.0",
        "replica-set",
    )
    refuse_unsafe_lock(server)  # does not raise
    assert (server.transactions, server.change_streams) == (False, False)
    assert transaction_refusal(server) == (
        "FerretDB v2.7.0 does not implement multi-document transactions"
    )


def test_cosmos_ru_reports_a_replica_set_but_transactions_stay_in_one_collection() -> None:
    server = parse_server(COSMOS_RU_HELLO, COSMOS_RU_BUILD_INFO, COSMOS_RU_HOSTS)

    assert (server.kind, server.topology, server.transactions) == (
        "cosmos-ru",
        "replica-set",
        False,
    )
    reason = transaction_refusal(server)
    assert reason is not None
    assert "Azure Cosmos DB for MongoDB (RU)" in reason and "one collection only" in reason


def test_cosmos_ru_is_recognised_by_its_reply_type_without_its_host_name() -> None:
    server = parse_server({**MONGODB_COMMON, "setName": "globaldb"}, COSMOS_OLD_BUILD_INFO)

    assert server.kind == "cosmos-ru"


def test_cosmos_vcore_is_told_apart_from_ru_and_probed_for_transactions() -> None:
    hello = {**MONGODB_COMMON, "setName": "rs0", "hosts": COSMOS_VCORE_HOSTS}
    server = parse_server(hello, MONGODB_BUILD_INFO, COSMOS_VCORE_HOSTS)

    assert (server.kind, server.transactions, server.change_streams) == (
        "cosmos-vcore",
        None,
        None,
    )
    assert transaction_refusal(server) is None  # a probe decides


def test_documentdb_is_recognised_by_its_host_and_runs_transactions() -> None:
    server = parse_server(DOCUMENTDB_HELLO, DOCUMENTDB_BUILD_INFO, DOCUMENTDB_HOSTS)

    assert server == Server(
        kind="documentdb",
        name="Amazon DocumentDB 5.0.0",
        version="5.0.0",
        topology="replica-set",
        transactions=True,
        change_streams=None,
    )


def test_host_names_compare_without_case_port_or_final_dot() -> None:
    server = parse_server(
        DOCUMENTDB_HELLO, DOCUMENTDB_BUILD_INFO, ["X.Cluster-abc.EU-central-1.DocDB.AmazonAWS.com."]
    )

    assert server.kind == "documentdb"


def test_unsupported_server_pickles_with_its_fields() -> None:
    error = UnsupportedServer(server="FerretDB v1.24.2", problem="why.", fix="what.")

    copy = pickle.loads(pickle.dumps(error))

    assert isinstance(copy, MigrationError)
    assert (copy.server, copy.problem, copy.fix, str(copy)) == (
        error.server,
        error.problem,
        error.fix,
        str(error),
    )


# -- the real server ------------------------------------------------------------------------


async def test_detects_the_test_server_for_what_it_is(db: Any) -> None:
    build_info = await db.command("buildInfo")

    server = await detect_server(db)

    assert server.version == build_info["version"]
    assert server.topology == "replica-set"
    if os.environ.get("MONGODB_URI"):  # CI's real MongoDB
        assert (server.kind, server.transactions, server.change_streams) == ("mongodb", True, True)
    else:  # SecantusDB: reports MongoDB 8.2.11 and names itself in `secantusVersion`
        assert server.kind == "unknown-compatible"
        assert server.name == f"SecantusDB {build_info['secantusVersion']}"
        assert server.transactions is None  # so a transactional plan probes it


async def test_detects_a_standalone_server(driver: str, standalone_uri: str) -> None:
    async with async_database(driver, standalone_uri) as db:
        server = await detect_server(db)

    assert (server.topology, server.transactions, server.change_streams) == (
        "standalone",
        False,
        False,
    )


async def test_the_server_is_asked_when_the_lock_is_taken_never_when_up_to_date(
    db: Any, driver: str, mongo_uri: str
) -> None:
    await migrate(db, recorders(1))
    commands = CommandLog()
    async with open_client(driver, mongo_uri, event_listeners=[commands]) as client:
        watched = client[db.name]
        await watched.command("ping")  # the handshake is the driver's, not ours

        commands.clear()
        await migrate(watched, recorders(1))  # up to date
        up_to_date = commands.names()

        commands.clear()
        await migrate(watched, recorders(1, 2, 3, 4))  # three to run, one lock
        migrating = commands.names()

    assert "buildInfo" not in up_to_date and "hello" not in up_to_date
    assert migrating.count("buildInfo") == 1  # once for the call, not once per migration
    assert migrating.count("hello") == 1  # detection's; the lease's clock is read only by waiters


async def test_a_replica_taking_over_a_dead_holder_asks_the_server_too(
    db: Any, driver: str, mongo_uri: str
) -> None:
    """A takeover is a way to the lock like an acquire: the server is checked (refused if the
    lock cannot be safe there, transactional plans prepared) once the lock is taken."""
    await dead_holder_lock(db, version=0, running=None, lease=0.3)
    commands = CommandLog()
    async with open_client(driver, mongo_uri, event_listeners=[commands]) as client:
        report = await migrate(client[db.name], recorders(1, 2), max_poll_interval=0.1)

    assert report.holder and report.applied == [1, 2]
    assert commands.names().count("buildInfo") == 1


def transactional(version: int, seen: list[bool]) -> Migration:
    """A transactional migration that notes whether the history collection existed when it
    started (it runs inside the transaction that will record into it)."""

    async def up(db: Any, ctx: Any) -> None:
        seen.append("migrations_history" in await db.list_collection_names())
        await db.accounts.insert_one({"v": version}, session=ctx.session)

    return Migration(version=version, up=up, name=f"tx_{version}", transactional=True)


async def test_history_collection_exists_before_the_first_transactional_migration(
    db: Any,
) -> None:
    seen: list[bool] = []

    report = await migrate(db, [transactional(1, seen)])  # a fresh database

    assert report.applied == [1]
    assert seen == [True]
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [(1, "applied")]


async def test_a_transaction_probe_leaves_nothing_behind(db: Any) -> None:
    await migrate(db, [recorder(1), transactional(2, [])])

    assert await db.migrations.count_documents({}) == 1
    assert await control(db) is not None
    assert [r["version"] for r in await history(db)] == [1, 2]


async def test_a_refused_transactional_plan_takes_no_lock_and_writes_nothing(
    driver: str, standalone_uri: str
) -> None:
    async with async_database(driver, standalone_uri) as db:
        with pytest.raises(InvalidMigrations, match=r"migration 0001 tx_1 declares"):
            await migrate(db, [transactional(1, [])])

        assert await db.list_collection_names() == []
