"""Real server processes (uvicorn, gunicorn with uvicorn workers, aiohttp's ``web.run_app``)
serving tests/served_app.py, driven by the shutdown tests: started, probed over HTTP, sent
real signals, timed, and killed as an orchestrator would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.polling import wait_until
from tests.server import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("uvicorn", "gunicorn", "aiohttp")


def command(server: str, port: int, workers: int = 1) -> list[str]:
    """How each server is started, as a user would start it. ``workers`` > 1: a supervisor
    with that many worker processes (uvicorn's ``--workers``, gunicorn's ``-w``)."""
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "--factory", "tests.served_app:starlette_app"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *(("--workers", str(workers)) if workers > 1 else ()),
        ]
    if server == "gunicorn":
        return [
            *(sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker"),
            *("-w", str(workers), "-b", f"127.0.0.1:{port}", "--no-control-socket"),
            "tests.served_app:starlette_app()",
        ]
    if server == "aiohttp" and workers == 1:
        return [sys.executable, str(ROOT / "tests" / "served_app.py"), str(port)]
    raise ValueError(f"{server} with {workers} workers")


@dataclass
class AppProcess:
    """One server process; its output (stdout and stderr) collected line by line."""

    server: str
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, fragment: str, timeout: float = 30.0) -> str:
        """The first output line containing ``fragment``, once it is there."""

        def found() -> str | None:
            for line in self.lines:
                if fragment in line:
                    return line
            assert self.process.poll() is None or fragment in self.output, (
                f"{self.server} exited ({self.process.returncode}) before printing "
                f"{fragment!r}:\n{self.output[-3000:]}"
            )
            return None

        result: str = wait_until(found, timeout, f"{fragment!r} from {self.server}")
        return result

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """A real HTTP GET: its status and JSON body (status 0: nothing answered)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status, json.load(reply)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)
        except OSError:
            return 0, {}

    def wait_for_status(self, path: str, status: int, timeout: float = 30.0) -> dict[str, Any]:
        """Poll ``path`` until it answers ``status``; its body."""

        def answered() -> dict[str, Any] | None:
            assert self.process.poll() is None, f"{self.server} exited:\n{self.output[-3000:]}"
            code, body = self.get(path)
            return body if code == status else None

        result: dict[str, Any] = wait_until(answered, timeout, f"{path} to answer {status}")
        return result

    def signal(self, signum: int = signal.SIGTERM) -> float:
        """Send ``signum`` to the server's main process, as Kubernetes does to PID 1; the
        moment it was sent (monotonic)."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        return sent

    def exit_seconds(self, since: float, within: float) -> float:
        """Seconds from ``since`` (a signal's :meth:`signal` time) until the process exited,
        failing if it still runs ``within`` seconds after that."""
        wait_until(
            lambda: self.process.poll() is not None,
            max(0.0, since + within - time.monotonic()),
            f"{self.server} to exit\n{self.output[-3000:]}",
            every=0.005,
        )
        return time.monotonic() - since

    def kubernetes_stop(self, grace_period: float) -> bool:
        """SIGTERM, then SIGKILL to every process of the pod (the process group) if it still
        runs after ``grace_period``. Whether the SIGKILL was needed."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_period
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            time.sleep(0.01)
        self.kill()
        return True

    def kill(self) -> None:
        """SIGKILL the whole process group (gunicorn's workers too), and reap it."""
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def start_app(
    server: str,
    *,
    uri: str,
    db_name: str,
    driver: str,
    migrations: Path,
    env: dict[str, str] | None = None,
    workers: int = 1,
    **options: Any,
) -> AppProcess:
    """A server process serving tests/served_app.py, whose integration is given ``options``
    (``migrate()``'s, plus ``serve_while_migrating`` and ``exit_on_failure``)."""
    port = free_port()
    process = subprocess.Popen(
        command(server, port, workers),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so kill() reaches the workers
        env={
            **os.environ,
            "BM_URI": uri,
            "BM_DB": db_name,
            "BM_DRIVER": driver,
            "BM_MIGRATIONS": str(migrations),
            "BM_OPTIONS": json.dumps(options),
            **(env or {}),
        },
    )
    return AppProcess(server, process, port)
