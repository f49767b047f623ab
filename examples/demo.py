"""The demo: several replicas of the example service boot at once against one database.

Starts an embedded SecantusDB server, seeds customers written by "the previous release",
boots the replicas at the same moment (real uvicorn processes, one port each), relays their
interleaved logs, waits for every replica's /readyz, prints who migrated and how long the others
waited, and stops everything it started, also on Ctrl-C.

    python examples/demo.py [--replicas 5] [--customers 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "shop"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--customers", type=int, default=4000)
    parser.add_argument("--build", default="2.0.0")
    args = parser.parse_args()
    # SIGTERM ends the demo the way Ctrl-C does: through the cleanup below. SIGINT is set
    # too, because a shell starting the demo in the background hands it SIGINT ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Processes stop (ExitStack) before their data directory is removed.
    with tempfile.TemporaryDirectory(prefix="bootmigrate-demo-") as tmp, ExitStack() as cleanup:
        try:
            return run(args, Path(tmp), cleanup)
        except KeyboardInterrupt:
            say("interrupted: stopping everything the demo started")
            return 130


def run(args: argparse.Namespace, tmp: Path, cleanup: ExitStack) -> int:
    port = free_port()
    say(f"starting SecantusDB on 127.0.0.1:{port} (data in a temporary directory)")
    server = spawn(
        "secantusdb",
        [
            sys.executable,
            "-m",
            "secantus",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            str(tmp / "data"),
            "--log-level",
            "WARNING",
        ],
        cleanup,
    )
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    wait_for_server(uri, server)
    seed(uri, args.customers)

    ports = [free_port() for _ in range(args.replicas)]
    say(
        f"booting {args.replicas} replicas of the example service at once (build "
        f"{args.build}); each runs bootmigrate.migrate() in its lifespan"
    )
    replicas = [
        spawn(
            f"replica-{n}",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "examples.fastapi_app:main",
                "--host",
                "127.0.0.1",
                "--port",
                str(replica_port),
                "--log-level",
                "warning",
            ],
            cleanup,
            env={
                "MONGODB_URI": uri,
                "MONGODB_DB": DATABASE,
                "BOOTMIGRATE_BUILD": args.build,
                "REPLICA": f"replica-{n}",
                "BACKFILL_PAUSE_S": "0.05",
            },
        )
        for n, replica_port in enumerate(ports, start=1)
    ]
    reports = [
        ready(replica_port, process) for replica_port, process in zip(ports, replicas, strict=True)
    ]
    return summarise(reports, ports)


def spawn(
    name: str, command: list[str], cleanup: ExitStack, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start a process in its own session, relay its output prefixed with ``name``, and
    register its termination with ``cleanup``."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    # Registered before anything else can be interrupted, so no process outlives the demo.
    cleanup.callback(stop, name, process)
    say(f"started {name} (pid {process.pid})")
    threading.Thread(target=relay, args=(name, process), daemon=True).start()
    return process


def relay(name: str, process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        print(f"  {name:>10} | {line.rstrip()}", flush=True)


def stop(name: str, process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    say(f"stopped {name} (pid {process.pid})")


def wait_for_server(uri: str, server: subprocess.Popen[str]) -> None:
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=200)
    deadline = time.monotonic() + 30
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit("the database server exited at startup")
            try:
                client.admin.command("ping")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise SystemExit("the database server did not start within 30 s") from None
                time.sleep(0.05)
    finally:
        client.close()


def seed(uri: str, count: int) -> None:
    """Customers as the previous release wrote them: a phone field, no display name."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    try:
        client[DATABASE].customers.insert_many(
            {
                "email": f"customer{i}@example.com",
                "first_name": f"Ada{i}",
                "last_name": "Lovelace",
                "phone": f"+44 20 7946 {i:04d}",
            }
            for i in range(count)
        )
    finally:
        client.close()
    say(f"seeded {count} customers in the shape of the previous release")


def ready(port: int, process: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """Poll a replica's /readyz until it answers 200 (once migrated): which replica it is
    (from /healthz) and what its migration did."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the replica on port {port} exited with {process.returncode}")
        try:  # /readyz answers 503 (an HTTPError, an OSError) until migrated
            readiness = get_json(f"http://127.0.0.1:{port}/readyz")
            return {
                **get_json(f"http://127.0.0.1:{port}/healthz"),
                "migrations": readiness["report"],
            }
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the replica on port {port} was not ready in {timeout} s"
                ) from None
            time.sleep(0.1)


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as reply:
        found: dict[str, Any] = json.load(reply)
        return found


def summarise(reports: list[dict[str, Any]], ports: list[int]) -> int:
    print()
    print(f"{'replica':<10} {'port':>5} {'pid':>7}  {'migrated':<8} {'waited':>7}  versions")
    for port, report in zip(ports, reports, strict=True):
        m = report["migrations"]
        print(
            f"{report['replica']:<10} {port:>5} {report['pid']:>7}  "
            f"{'yes' if m['holder'] else 'no':<8} {m['waited']:>6.2f}s  "
            f"{m['from_version']} -> {m['to_version']}"
            + (f"  applied {m['applied']}" if m["applied"] else "")
        )
    holders = [r for r in reports if r["migrations"]["holder"]]
    versions = {r["migrations"]["to_version"] for r in reports}
    waits = [r["migrations"]["waited"] for r in reports if not r["migrations"]["holder"]]
    print()
    if len(holders) == 1 and len(versions) == 1:
        longest = f"{max(waits):.2f} s" if waits else "n/a"
        print(
            f"summary: exactly one replica ({holders[0]['replica']}) applied the migrations; "
            f"{len(waits)} waited (longest {longest}); all {len(reports)} ready at version "
            f"{versions.pop()}"
        )
        return 0
    print(f"summary: FAILED: {len(holders)} replicas migrated, versions {sorted(versions)}")
    return 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
