"""The README's demo: one replica migrates, the others wait, nothing is left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.polling import wait_until

pytestmark = pytest.mark.multiprocess

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def started_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"demo: started \S+ \(pid (\d+)\)", output)]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_shows_exactly_one_replica_migrating() -> None:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--replicas", "3", "--customers", "600"],
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert re.search(
        r"summary: exactly one replica \(replica-\d\) applied the migrations; "
        r"2 waited .*all 3 ready at version 4",
        out,
    ), out[-2000:]
    assert len(re.findall(r"took the migration lock", out)) == 1
    assert len(re.findall(r"waiting for .* which holds the migration lock", out)) == 2
    assert len(re.findall(r"applied migration 000\d", out)) == 4
    pids = started_pids(out)
    assert len(pids) == 4  # the server and three replicas
    assert all(gone(pid) for pid in pids)


def test_demo_interrupted_stops_everything_it_started() -> None:
    demo = subprocess.Popen(
        [sys.executable, str(DEMO), "--replicas", "3", "--customers", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert demo.stdout is not None

        def replicas_booting() -> bool:
            line = demo.stdout.readline()  # type: ignore[union-attr]
            lines.append(line)
            return not line or "started replica-3" in line

        wait_until(replicas_booting, 60, "the demo to start its replicas", every=0)
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    output = "".join(lines) + rest

    assert demo.returncode == 130, output[-2000:]
    assert "interrupted: stopping everything the demo started" in output
    pids = started_pids(output)
    assert len(pids) == 4
    assert all(gone(pid) for pid in pids)
