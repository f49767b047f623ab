"""The operator CLI as a subprocess, for the CLI and runbook tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Cli:
    """Runs ``python -m bootmigrate`` with ``env``; ``db`` is its database, read synchronously."""

    env: dict[str, str]
    db: Any
    migrations: Path

    @classmethod
    def for_replicas(cls, replicas: Any) -> Cli:
        """The operator's command on the database and migrations of ``replicas``
        (tests/processes.py)."""
        env = {
            **os.environ,
            "MONGODB_URI": replicas.uri,
            "BOOTMIGRATE_DB": replicas.db.name,
            "BOOTMIGRATE_MIGRATIONS": str(replicas.migrations),
            "BOOTMIGRATE_DRIVER": replicas.driver,
        }
        return cls(env, replicas.db, replicas.migrations)

    def __call__(
        self, *args: str, stdin: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bootmigrate", *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=60,
            env={**self.env, **env},
        )

    def json(self, *args: str) -> Any:
        """The command's ``--json`` output, parsed; it must write nothing to stderr."""
        done = self(*args, "--json")
        assert done.stderr == "", done.stderr
        return json.loads(done.stdout)

    def control(self) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = self.db.migrations.find_one({"_id": "control"})
        return doc
