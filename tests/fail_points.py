"""Fail points for tests, in MongoDB's own vocabulary: the same call sets a fault on a real
MongoDB (test commands enabled) and on the wire proxy in front of SecantusDB.

    async with fail_point(client, {"times": 1}, failCommands=["update"], errorCode=91):
        ...
    with fail_point(sync_client, "alwaysOn", failCommands=["find"], blockConnection=True,
                    blockTimeMS=500, appName="holder"):
        ...

``dropReply``, ``delayReplyMS`` and the ``skewLocalTime`` fail point exist only in the proxy
(tests/wire_proxy.py): ``fail_point`` skips the test on a real MongoDB when they are asked for.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from tests.wire_proxy import WireProxy

PROXY_ONLY_DATA = ("dropReply", "delayReplyMS")
PROXY_ONLY_FAIL_POINTS = ("skewLocalTime",)


def on_real_mongodb() -> bool:
    """Whether the suite runs against a MongoDB given by MONGODB_URI (no proxy in between)."""
    return bool(os.environ.get("MONGODB_URI"))


def needs_proxy(what: str) -> None:
    """Skip the calling test on a real MongoDB: ``what`` exists only in the wire proxy."""
    if on_real_mongodb():
        pytest.skip(f"{what} exists only in the test suite's wire proxy, not on MongoDB")


def with_app_name(uri: str, app_name: str) -> str:
    """``uri`` with ``appName`` set, so a fail point's ``appName`` can target that client
    (a worker process given this URI, for instance)."""
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "appname"]
    query.append(("appName", app_name))
    return urlunsplit(parts._replace(path=parts.path or "/", query=urlencode(query)))


def command_counts(proxy: WireProxy, app_name: str | None = None) -> Counter[str]:
    """How many of each command went through the proxy (failed ones included), from clients
    with this appName, or from every client."""
    return proxy.command_counts(app_name)


def _admin(target: Any) -> Any:
    # Look on the type: a client or database turns any unknown attribute into a database or
    # collection, so ``target.admin`` or ``target.client`` would always "exist".
    if hasattr(type(target), "list_database_names"):
        return target["admin"]
    return target.client["admin"]


class fail_point:  # lower case: it reads as a call, ``async with fail_point(...)``
    """Set a fail point for the duration of a block, and turn it off at exit, error or not.

    ``target``: a client or a database of either async driver (``async with``), or of
    synchronous PyMongo (``with``). ``mode``: "alwaysOn", {"times": N}, {"skip": N}.
    ``data``: the fail point's data, e.g. ``failCommands=["insert"], errorCode=11600,
    errorLabels=[...], appName=..., namespace="db.coll", writeConcernError={...},
    closeConnection=True, blockConnection=True, blockTimeMS=..., dropReply=True``.
    ``name``: the fail point, "failCommand" unless said otherwise.
    """

    def __init__(self, target: Any, mode: Any, *, name: str = "failCommand", **data: Any):
        if name in PROXY_ONLY_FAIL_POINTS:
            needs_proxy(f"the {name} fail point")
        for key in PROXY_ONLY_DATA:
            if key in data:
                needs_proxy(f"failCommand's {key}")
        self.admin = _admin(target)
        self.name = name
        self.on = {"configureFailPoint": name, "mode": mode, "data": data}
        self.off = {"configureFailPoint": name, "mode": "off"}
        self.count = 0  # times the fail point had fired before this block set it

    async def __aenter__(self) -> fail_point:
        self.count = int((await self.admin.command(self.on)).get("count", 0))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.admin.command(self.off)

    def __enter__(self) -> fail_point:
        self.count = int(self.admin.command(self.on).get("count", 0))
        return self

    def wait_entered(self, times: int = 1, timeout: float = 30.0) -> Any:
        """Until the fail point has fired ``times`` times since this block set it (the
        server's ``waitForFailPoint``); fails after ``timeout`` s. Await it with an async
        driver."""
        return self.admin.command(
            {
                "waitForFailPoint": self.name,
                "timesEntered": self.count + times,
                "maxTimeMS": int(timeout * 1000),
            }
        )

    def __exit__(self, *exc_info: object) -> None:
        self.admin.command(self.off)


def all_fail_points_off(sync_client: Any) -> None:
    """Turn off every fail point tests use, through a synchronous PyMongo client."""
    names = ("failCommand",) if on_real_mongodb() else ("failCommand", *PROXY_ONLY_FAIL_POINTS)
    for name in names:
        sync_client.admin.command({"configureFailPoint": name, "mode": "off"})
