"""Benchmarks 3 and 4: hand-off latency (the holder's release to the last waiter returning)
and the load waiting replicas put on the server, for N waiting processes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pymongo import MongoClient

HERE = Path(__file__).resolve().parent

SLOW = """
import asyncio, os

async def up(db):
    while not os.path.exists({go!r}):
        await asyncio.sleep(0.005)
"""


def spawn(
    uri: str, db: str, migrations: Path, driver: str, algorithm: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "replica.py"),
            "--uri",
            uri,
            "--db",
            db,
            "--migrations",
            str(migrations),
            "--driver",
            driver,
            "--algorithm",
            algorithm,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def event(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"replica {process.pid} exited: {process.wait()}")
    found: dict[str, Any] = json.loads(line)
    return found


def measure(
    uri: str, waiters: int, hold: float, driver: str = "pymongo", algorithm: str = "bootmigrate"
) -> dict[str, Any]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    sync: MongoClient[dict[str, Any]] = MongoClient(uri)
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        migrations = Path(tmp) / "migrations"
        migrations.mkdir()
        (migrations / "0001_hold.py").write_text(SLOW.format(go=str(go)))
        holder = spawn(uri, name, migrations, driver, algorithm)
        deadline = time.monotonic() + 60
        while not (sync[name].migrations.find_one({"_id": "control"}) or {}).get("locked"):
            if time.monotonic() > deadline:
                raise RuntimeError("the holder never took the lock")
            time.sleep(0.01)
        others = [spawn(uri, name, migrations, driver, algorithm) for _ in range(waiters)]
        try:
            for process in others:
                assert event(process)["event"] == "started"
                if algorithm == "bootmigrate":
                    assert event(process)["event"] == "waiting"
            time.sleep(hold)  # everyone waits this long: the load figure is measured over it
            go.touch()
            assert event(holder)["event"] == "started"
            released = event(holder)
            done = [event(process) for process in others]
        finally:
            for process in [holder, *others]:
                process.kill()
                process.wait()
        sync.drop_database(name)
    sync.close()
    assert released["holder"] and not any(d["holder"] for d in done)
    latency = max(d["end"] for d in done) - released["end"]
    commands = sum(d["commands"] for d in done)
    waited = sum(d["waited"] for d in done) / len(done)
    return {
        "algorithm": algorithm,
        "waiters": waiters,
        "waited s (mean)": f"{waited:.1f}",
        "hand-off ms (last waiter)": f"{latency * 1000:.0f}",
        "waiter ops/s (all)": f"{commands / waited:.1f}",
        "ops/s per waiter": f"{commands / waited / waiters:.2f}",
    }
