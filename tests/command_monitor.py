"""Counting the commands a client sends, seen from the client (PyMongo's command monitoring):
legitimate observation of what bootmigrate asks of the server, on any server."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from pymongo import monitoring


class CommandLog(monitoring.CommandListener):
    """Every command a client sends, with when it was sent; give it to the client as
    ``event_listeners=[log]``. The driver's own server monitoring is not included."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: list[tuple[float, str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self._lock:
            self._sent.append((time.monotonic(), event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def clear(self) -> None:
        """Forget what was sent so far (a test's own setup, say)."""
        with self._lock:
            self._sent.clear()

    def counts(self) -> Counter[str]:
        """How many of each command were sent."""
        return Counter(self.names())

    def names(self) -> list[str]:
        """The names of the commands sent, in order."""
        with self._lock:
            return [name for _, name, _ in self._sent]

    def on(self, collection: str) -> list[tuple[str, dict[str, Any]]]:
        """The commands sent on ``collection`` (name and command document, as sent)."""
        with self._lock:
            return [(name, cmd) for _, name, cmd in self._sent if cmd.get(name) == collection]

    def total(self) -> int:
        """How many commands were sent."""
        with self._lock:
            return len(self._sent)

    def most_in_one_second(self) -> int:
        """The most commands sent within any one second: the peak rate."""
        with self._lock:
            times = [at for at, _, _ in self._sent]
        most, first = 0, 0
        for last, at in enumerate(times):
            while at - times[first] >= 1.0:
                first += 1
            most = max(most, last - first + 1)
        return most
