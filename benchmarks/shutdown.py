"""Seconds from SIGTERM to the exit of a real server process booting with bootmigrate.

    python benchmarks/shutdown.py [--runs 5] [--driver pymongo] [--grace 1.0]

For uvicorn, gunicorn (uvicorn workers, 1 worker) and aiohttp's ``web.run_app``, each serving
tests/served_app.py (the integrations as a user wires them), in two cases:

- waiting: the startup waits on a lock another process holds (``wait_timeout`` 300 s);
- migrating: the startup is inside a migration that does not finish, ``shutdown_grace`` G:
  the exit comes after G, with the migration recorded as interrupted.

The figure is measured from the moment the signal is sent to the moment the process is seen
to have exited (polled every 5 ms), so it includes the interpreter's own exit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import server, table  # noqa: E402
from pymongo import MongoClient  # noqa: E402

from tests.app_processes import SERVERS, start_app  # noqa: E402
from tests.migration_files import recording_migrations  # noqa: E402
from tests.polling import wait_until  # noqa: E402
from tests.processes import Replicas, start_blocked_holder  # noqa: E402


def one_run(uri: str, db: Any, case: str, app_server: str, driver: str, grace: float) -> float:
    """One server booted, signalled and timed; the database's collections dropped after."""
    with tempfile.TemporaryDirectory(prefix="bootmigrate-shutdown-") as tmp:
        migrations = recording_migrations(Path(tmp) / "m", 3)
        holder = None
        env: dict[str, str] = {}
        if case == "waiting":
            holder = start_blocked_holder(Replicas(uri, db, driver, migrations), 2, lease=5)
        else:
            env = {"BM_BLOCK_AT": "2"}
        app = start_app(
            app_server,
            uri=uri,
            db_name=db.name,
            driver=driver,
            migrations=migrations,
            env=env,
            wait_timeout=300,
            lease=30,
            shutdown_grace=grace,
        )
        try:
            if case == "waiting":
                app.wait_for_line("waiting for")
            else:
                wait_until(lambda: db.ran.find_one({"version": 2}), 30, "migration 2 to start")
            return app.exit_seconds(app.signal(), 300)
        finally:
            app.kill()
            if holder is not None:
                holder.kill()
            for name in db.list_collection_names():
                db.drop_collection(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--driver", choices=("pymongo", "motor"), default="pymongo")
    parser.add_argument("--grace", type=float, default=1.0, help="shutdown_grace, seconds")
    args = parser.parse_args()
    rows = []
    with server() as uri:
        client: MongoClient[dict[str, Any]] = MongoClient(uri)
        db = client[f"shutdown_bench_{int(time.time())}"]
        try:
            for case in ("waiting", "migrating"):
                for app_server in SERVERS:
                    times = [
                        one_run(uri, db, case, app_server, args.driver, args.grace)
                        for _ in range(args.runs)
                    ]
                    rows.append(
                        {
                            "server": app_server,
                            "case": case
                            if case == "waiting"
                            else f"migrating, grace {args.grace} s",
                            "runs": len(times),
                            "median s": f"{statistics.median(times):.3f}",
                            "max s": f"{max(times):.3f}",
                        }
                    )
                    print(rows[-1], flush=True)
        finally:
            client.drop_database(db.name)
            client.close()
    print()
    print(f"SIGTERM to exit ({args.driver}, {args.runs} runs each)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
