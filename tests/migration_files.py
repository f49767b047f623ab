"""Migration modules written to disk, for the loader, the CLI and worker processes."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    """Write migration modules (file name -> source) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (directory / name).write_text(textwrap.dedent(source))
    return directory


# A migration for process tests: records which process ran it and what the control document
# said at that moment; blocks when BM_BLOCK_AT names its version (to be killed, paused or
# signalled), until the file BM_RELEASE_FILE names exists (forever without one).
RECORDING_MIGRATION = """
import asyncio, os

idempotent = {idempotent}

async def up(db):
    control = await db.migrations.find_one({{"_id": "control"}})
    await db.ran.insert_one({{"version": {version}, "pid": os.getpid(), "control": control}})
    if os.environ.get("BM_BLOCK_AT") == "{version}":
        release = os.environ.get("BM_RELEASE_FILE")
        while not (release and os.path.exists(release)):
            await asyncio.sleep(0.05)
    await asyncio.sleep({seconds})
"""


def recording_migrations(
    directory: Path, count: int, seconds: float | list[float] = 0.0, idempotent: bool = False
) -> Path:
    """``count`` recording migrations; ``seconds`` is each one's duration (or one for all)."""
    durations = seconds if isinstance(seconds, list) else [seconds] * count
    return write_migrations(
        directory,
        {
            f"{v:04d}_step_{v}.py": RECORDING_MIGRATION.format(
                version=v, seconds=durations[v - 1], idempotent=idempotent
            )
            for v in range(1, count + 1)
        },
    )


# The CLI's migrations: each step adds (and its down removes) one item, so a test can read
# which steps are applied from db.items. BROKEN replaces one to make it fail.
STEP = """
async def up(db):
    await db.items.insert_one({{"v": {v}}})

async def down(db):
    await db.items.delete_one({{"v": {v}}})
"""
BROKEN = "async def up(db):\n    raise RuntimeError('index build failed: duplicate key')\n"
