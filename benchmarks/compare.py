"""The same workloads 1-2 with the tools a user would pick instead, installed on first use
into benchmarks/.cache (not committed): migrate-mongo from npm, mongodb-migrations from PyPI.
Each runs through its own API on the same server as bootmigrate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MIGRATE_MONGO = "migrate-mongo@14.0.7"
MONGODB_NODE = "mongodb@7"
MONGODB_MIGRATIONS = "mongodb-migrations==1.3.1"


def _migrate_mongo() -> Path | None:
    node = CACHE / "node"
    if not (node / "node_modules" / "migrate-mongo").exists():
        if shutil.which("npm") is None:
            return None
        node.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--silent", "--prefix", str(node), MIGRATE_MONGO, MONGODB_NODE],
            check=True,
            capture_output=True,
        )
    script = node / "migrate_mongo_bench.mjs"
    shutil.copy(HERE / "compare" / "migrate_mongo_bench.mjs", script)  # resolves from there
    return script


def _mongodb_migrations() -> Path:
    env = CACHE / "venv-mongodb-migrations"
    python = env / "bin" / "python"
    if not python.exists():
        venv.create(env, with_pip=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", MONGODB_MIGRATIONS],
            check=True,
            capture_output=True,
        )
    return python


def run(uri: str) -> dict[str, dict[str, Any]]:
    """Figures per tool; a tool that cannot be installed here is left out, with the reason."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bootmigrate-compare-") as scratch:
        try:
            script = _migrate_mongo()
            if script is None:
                raise RuntimeError("npm is not installed")
            out = subprocess.run(
                ["node", str(script), uri, scratch], check=True, capture_output=True, text=True
            ).stdout
            results["migrate-mongo 14.0.7 (node)"] = json.loads(out.strip().splitlines()[-1])
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"migrate-mongo left out: {exc}", file=sys.stderr)
        try:
            python = _mongodb_migrations()
            db_uri = uri.replace("/?", "/compare_mm?") if "/?" in uri else uri + "/compare_mm"
            out = subprocess.run(
                [
                    str(python),
                    str(HERE / "compare" / "mongodb_migrations_bench.py"),
                    db_uri,
                    scratch,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results["mongodb-migrations 1.3.1 (sync)"] = json.loads(out.strip().splitlines()[-1])
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"mongodb-migrations left out: {exc}", file=sys.stderr)
    return results
