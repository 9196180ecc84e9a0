"""The downgrade event log: what was asked, what was loaded instead, and why.

Bounded (the newest `keep` events), with a counter that only grows, so a request can ask "which
events were recorded since I started?" without racing other requests: `since(mark)`.
"""

from __future__ import annotations

import threading
import time


class EventLog:
    """Downgrade events, newest last. Thread-safe; readers get copies."""

    def __init__(self, keep: int = 50):
        self._keep = keep
        self._events: list[dict] = []
        self._count = 0
        self._lock = threading.Lock()

    def record(self, *, stage: str, asked: tuple[str, str], loaded: dict, reason: str, **extra) -> dict:
        """Append one event and return it (the caller attaches it to its request's answer)."""
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
            "asked": {"model": asked[0], "quant": asked[1]},
            "loaded": loaded,
            "reason": reason,
            **extra,
        }
        with self._lock:
            self._events.append(event)
            self._count += 1
            del self._events[: -self._keep]
        return event

    @property
    def count(self) -> int:
        """How many events were ever recorded (a mark for `since`)."""
        return self._count

    def since(self, mark: int) -> list[dict]:
        """The events recorded after `count` was `mark` (those still kept), oldest first."""
        with self._lock:
            new = self._count - mark
            return list(self._events[-new:]) if new > 0 else []

    def all(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
