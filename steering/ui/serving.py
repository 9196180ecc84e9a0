"""What the HTTP server shows and logs, beyond what Gradio does by default.

Three gaps in Gradio 6 that a public link makes matter:

- Its queue bound (`queue(max_size=N)`) applies to every event, so 32 generations waiting make
  `/status` and `/plan` answer "queue full" too. `ReadingsFirstQueue` never refuses a reading (the
  "info" concurrency id, limit 4, which never waits behind generation).
- With `auth`, the anonymous login page still embeds the whole API description
  (`window.gradio_api_info`), FastAPI's `/openapi.json` answers, and `/gradio_api/heartbeat/<id>`
  holds connections open for anyone. `AnonymousGuard` (an ASGI middleware) blanks the first and
  refuses the other two until the visitor has logged in.
- Errors outside our handlers (e.g. a request with the wrong number of inputs) print a multi-line
  traceback whose message echoes every input, prompts included. `quiet_tracebacks()` makes Gradio
  log one line naming the exception type and where it was raised, never its message.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import traceback
from typing import Any

from gradio import queueing, route_utils

from steering.ui.common import INFO

logger = logging.getLogger("steering.serving")

READINGS_ID = INFO["concurrency_id"]  # /status, /plan and the Memory tab
DEBUG_ENV = "STEERING_DEBUG"  # set to 1 for Gradio's full tracebacks in the log


_PUSHING_A_READING = contextvars.ContextVar("pushing_a_reading", default=False)


class ReadingsFirstQueue(queueing.Queue):
    """Gradio's queue, where the `max_size` check never refuses a reading. Only the size seen by
    the check changes (through a context variable local to the pushing request); the queue's own
    processing loop, which also asks for the size, sees the real one."""

    def __len__(self) -> int:
        return 0 if _PUSHING_A_READING.get() else super().__len__()

    async def push(self, body, request, username):
        fn = route_utils.get_fn(self.blocks, None, body) if body.fn_index is not None else None
        token = _PUSHING_A_READING.set(getattr(fn, "concurrency_id", None) == READINGS_ID)
        try:
            return await super().push(body, request, username)
        finally:
            _PUSHING_A_READING.reset(token)


def readings_never_queue_full(demo) -> None:
    """Call after `demo.queue(...)`: the queue it made stops counting readings toward its bound."""
    if type(demo._queue) is not queueing.Queue:  # a Gradio that builds its queue differently: say so
        raise RuntimeError(f"unexpected Gradio queue type {type(demo._queue).__name__}")
    demo._queue.__class__ = ReadingsFirstQueue


# -- before login: no API description, no docs, no heartbeats ------------------------------------
_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.DOTALL)
_HIDDEN_PATHS = ("/openapi.json", "/docs", "/redoc")


def _logged_in(app, scope) -> bool:
    from starlette.requests import Request

    if getattr(app, "auth", None) is None and getattr(app, "auth_dependency", None) is None:
        return True  # no login configured: nothing to hide
    cookies = Request(scope).cookies
    cookie_id = getattr(app, "cookie_id", "")
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and token in getattr(app, "tokens", {})


class AnonymousGuard:
    """ASGI middleware: with a login configured, an anonymous visitor gets the login page without
    the API description, a 401 for the heartbeat route and a 404 for FastAPI's schema and docs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _logged_in(scope.get("app"), scope):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in _HIDDEN_PATHS:
            return await _plain(send, 404, b"Not Found")
        if "/gradio_api/heartbeat/" in path:
            return await _plain(send, 401, b"Not authenticated")
        if scope.get("method") == "GET" and not path.startswith("/gradio_api/"):
            return await self.app(scope, receive, _without_api_info(send))
        return await self.app(scope, receive, send)


async def _plain(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _without_api_info(send):
    """Wrap `send`: an HTML response is buffered and its embedded API description replaced by null."""
    state: dict[str, Any] = {"start": None, "chunks": []}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if not headers.get(b"content-type", b"").startswith(b"text/html"):
                state["start"] = False
                return await send(message)
            state["start"] = message
            return None
        if message["type"] != "http.response.body" or state["start"] is False:
            return await send(message)
        state["chunks"].append(message.get("body", b""))
        if message.get("more_body"):
            return None
        body = _API_INFO.sub(b"window.gradio_api_info = null;</script>", b"".join(state["chunks"]))
        start = state["start"]
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return None

    return wrapped


def app_kwargs() -> dict:
    """`demo.launch(app_kwargs=...)`: the FastAPI app gets `AnonymousGuard`."""
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(AnonymousGuard)]}


# -- one line per error, no inputs -------------------------------------------------------------
class _OneLineTraceback:
    """Stands in for the `traceback` module inside Gradio's request code."""

    def __getattr__(self, name: str):
        return getattr(traceback, name)

    @staticmethod
    def print_exc(*args, **kwargs) -> None:
        exc = sys.exc_info()[1]
        if exc is None:
            return
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
        logger.error(
            "request failed: %s at %s (message withheld: it can contain the request's inputs; %s=1 shows it)",
            type(exc).__name__,
            where,
            DEBUG_ENV,
        )


def quiet_tracebacks() -> None:
    """Gradio's request-error tracebacks become one line without the message (unless STEERING_DEBUG=1)."""
    if os.environ.get(DEBUG_ENV) == "1":
        return
    import gradio.blocks
    import gradio.route_utils
    import gradio.routes
    import gradio.utils

    for module in (queueing, gradio.routes, gradio.route_utils, gradio.utils, gradio.blocks):
        if getattr(module, "traceback", None) is traceback:
            module.traceback = _OneLineTraceback()
