"""The process's shutdown flag: set once (SIGTERM, Ctrl-C), watched by every generation.

A generation polls it at every decoding step (beside its own Stop flag) and ends; a request that
has not reached the model yet is refused with `ShuttingDownError`. So `app.py` can free the model
within a couple of seconds of a signal, even in the middle of a 512-token request.
"""

from __future__ import annotations

import threading

from steering.errors import SteeringError

SHUTTING_DOWN = threading.Event()


class ShuttingDownError(SteeringError):
    """The server is shutting down: the request was not run (or was cut short)."""

    def __init__(self) -> None:
        super().__init__("server shutting down: the request was not completed; try again when it is back")


def begin_shutdown() -> None:
    SHUTTING_DOWN.set()


def check_running() -> None:
    """Raise `ShuttingDownError` once shutdown has begun."""
    if SHUTTING_DOWN.is_set():
        raise ShuttingDownError()
