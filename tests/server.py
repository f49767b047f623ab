"""The test server: SecantusDB in a process of its own, and free ports to put it on."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from tests.polling import wait_until


def free_port() -> int:
    """A local TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SecantusDaemon:
    """A SecantusDB server in its own process, so tests can kill and restart it."""

    def __init__(self, storage: Path, port: int | None = None, *extra: str) -> None:
        self.storage = storage
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self, wait: bool = True) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--storage-path",
                str(self.storage),
                "--log-level",
                "WARNING",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri, serverSelectionTimeoutMS=200)
        try:

            def ready() -> bool:
                assert self.process is not None and self.process.poll() is None, "server exited"
                try:
                    client.admin.command("ping")
                    return True
                except Exception:
                    return False

            wait_until(ready, timeout, "the test server to accept connections", every=0.05)
        finally:
            client.close()

    def __enter__(self) -> SecantusDaemon:
        """Start the server and wait until it accepts connections."""
        try:
            self.start()
        except BaseException:
            self.stop()  # one that never came up must not outlive the test
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
