"""Benchmark 5: what `import bootmigrate` costs a booting service, and what it pulls in."""

from __future__ import annotations

import statistics
import subprocess
import sys
from typing import Any

PROBE = """
import sys, time
started = time.perf_counter()
import {module}
print(time.perf_counter() - started)
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""

# Modules a boot path should not pay for unless it uses them.
HEAVY = {"motor", "rich", "click", "fastapi", "starlette", "aiohttp", "bootmigrate.cli"}


def measure(module: str, runs: int = 15) -> tuple[float, str]:
    samples, loaded = [], ""
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY | {"bootmigrate"})],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        samples.append(float(out[0]))
        loaded = out[1] if len(out) > 1 else ""
    return statistics.median(samples), loaded


def run() -> list[dict[str, Any]]:
    rows = []
    for module in ("pymongo", "bootmigrate"):
        seconds, loaded = measure(module)
        heavy = sorted(
            {m for m in loaded.split(",") if m and m.split(".")[0] in HEAVY}
            | {m for m in loaded.split(",") if m == "bootmigrate.cli"}
        )
        rows.append(
            {
                "import": module,
                "ms (median of 15)": f"{seconds * 1000:.1f}",
                "heavy modules loaded": ", ".join(heavy) or "none",
            }
        )
    return rows
