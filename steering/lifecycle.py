"""The process's shutdown flag: set once (SIGTERM, Ctrl-C), watched by every generation.

A generation polls it at every decoding step (beside its own Stop flag) and ends; a request that
has not reached the model yet is refused with `ShuttingDownError`. So `app.py` can free the model
within a couple of seconds of a signal, even in the middle of a 512-token request.

A request's own stop flag comes from its caller (the UI's Stop) or, for a client endpoint, from
its edge: `request_stop(flag)` makes `flag` the stop flag of every generation the block starts
without one of its own, so a client that goes away ends its run (steering/ui/serving.py sets
the flag when Gradio drops the client's connection).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

from steering.errors import SteeringError

SHUTTING_DOWN = threading.Event()
_REQUEST_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("request_stop", default=None)


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


@contextlib.contextmanager
def request_stop(flag: threading.Event) -> Iterator[threading.Event]:
    """For the block (in this thread and context): `flag` is the stop flag of generations begun without one."""
    token = _REQUEST_STOP.set(flag)
    try:
        yield flag
    finally:
        _REQUEST_STOP.reset(token)


def stop_flag(stop: threading.Event | None = None) -> threading.Event:
    """A generation's stop flag: the caller's `stop`, else the request's (`request_stop`), else a new one."""
    return stop or _REQUEST_STOP.get() or threading.Event()


def request_stopped() -> bool:
    """Whether the request's own flag (`request_stop`) is set: its client has gone."""
    flag = _REQUEST_STOP.get()
    return flag is not None and flag.is_set()
