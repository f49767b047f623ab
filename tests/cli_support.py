"""The operator CLI as a subprocess, for the CLI and runbook tests."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP = """
async def up(db):
    await db.items.insert_one({{"v": {v}}})

async def down(db):
    await db.items.delete_one({{"v": {v}}})
"""
BROKEN = "async def up(db):\n    raise RuntimeError('index build failed: duplicate key')\n"


@dataclass
class Cli:
    env: dict[str, str]
    db: Any
    migrations: Path

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
        done = self(*args, "--json")
        assert done.stderr == "", done.stderr
        return json.loads(done.stdout)

    def control(self) -> dict[str, Any] | None:
        doc: dict[str, Any] | None = self.db.migrations.find_one({"_id": "control"})
        return doc
