"""What the HTTP server shows and logs, beyond what Gradio does by default.

Gaps in Gradio 6 that a public link makes matter:

- Its queue bound (`queue(max_size=N)`) applies to every event, so 32 generations waiting make
  `/status` and `/plan` answer "queue full" too. `ReadingsFirstQueue` never refuses a reading (the
  "info" concurrency id, limit 4, which never waits behind generation), gives each client a fair
  share of the queue, and refuses an unknown `fn_index` or too few inputs with a sentence.
- With `auth`, the anonymous login page still embeds the whole API description
  (`window.gradio_api_info`), FastAPI's `/openapi.json` answers, `/gradio_api/heartbeat/<id>` and
  the MCP routes hold connections open for anyone, `/gradio_api/cancel` ends anyone's job and
  logins are not rate limited. `AnonymousGuard` (an ASGI middleware) blanks the first, refuses
  the others until the visitor has logged in, and limits failed logins per client.
- Uploads have no size limit, every download is copied into Gradio's cache for good, and every
  session keeps its copy of the page's config (~0.3 MiB) for up to 10,000 sessions:
  `launch_kwargs()` bounds uploads and sessions, `prune_cached_downloads()` the cache.
- Errors outside our handlers (e.g. a request with the wrong number of inputs) print a multi-line
  traceback whose message echoes every input, prompts included. `quiet_tracebacks()` makes Gradio
  log one line naming the exception type and where it was raised, never its message.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import math
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradio import I18n, queueing, route_utils

from steering import files, lifecycle, limits
from steering.ui.common import INFO, MODEL, PAGE_HEAD

logger = logging.getLogger("steering.serving")

READINGS_ID = INFO["concurrency_id"]  # /status, /plan and the Memory tab
MODEL_ID = MODEL["concurrency_id"]  # everything that runs the model: the part of the queue that is shared out
DEBUG_ENV = "STEERING_DEBUG"  # set to 1 for Gradio's full tracebacks in the log


_PUSHING_A_READING = contextvars.ContextVar("pushing_a_reading", default=False)
PER_CLIENT = 8  # requests one client (address) may have waiting for the model: a quarter of the queue
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def client_key(scope) -> str:
    """Who a request comes from: its peer address, or, for a request relayed by a local proxy
    (the share tunnel), the first address of its X-Forwarded-For."""
    peer = (scope.get("client") or ("?", 0))[0]
    if peer in _LOOPBACK:
        for key, value in scope.get("headers", []):
            if key == b"x-forwarded-for" and value:
                return value.split(b",")[0].strip().decode("latin-1")[:64]
    return peer


class ReadingsFirstQueue(queueing.Queue):
    """Gradio's queue, where the `max_size` check never refuses a reading, and where a request is
    refused with a sentence (HTTP 400) before it is queued when it names no endpoint
    (an unknown `fn_index`) or sends too few inputs, and (HTTP 422) when its client already has
    `per_client` requests waiting for the model (a fair share of the queue). Only the size seen by
    the `max_size` check changes (through a context variable local to the pushing request); the
    queue's own processing loop, which also asks for the size, sees the real one."""

    per_client: int = PER_CLIENT

    def __len__(self) -> int:
        return 0 if _PUSHING_A_READING.get() else super().__len__()

    async def push(self, body, request, username):
        if body.fn_index is None:
            return await super().push(body, request, username)
        try:
            fn = route_utils.get_fn(self.blocks, None, body)
        except (KeyError, IndexError, TypeError):
            return False, f"fn_index: no endpoint has index {str(body.fn_index)[:20]}", "error"
        refusal = self._refusal(fn, body, request)
        if refusal is not None:
            return False, refusal[0], refusal[1]
        token = _PUSHING_A_READING.set(getattr(fn, "concurrency_id", None) == READINGS_ID)
        try:
            return await super().push(body, request, username)
        finally:
            _PUSHING_A_READING.reset(token)

    def _refusal(self, fn, body, request) -> tuple[Any, str] | None:
        """(sentence, Gradio's refusal kind) for a request that must not be queued, else None."""
        name = fn.api_name or fn.name or f"fn_index {body.fn_index}"
        data = body.data if isinstance(body.data, list) else []
        if not getattr(body, "batched", False) and len(data) < len(fn.inputs):
            return f"{name}: needs {len(fn.inputs)} input values, got {len(data)}", "error"
        if fn.concurrency_id != MODEL_ID or request is None:  # readings and table edits never wait long
            return None
        client = client_key(request.scope)
        queued = self.event_queue_per_concurrency_id.get(MODEL_ID)
        waiting = sum(1 for event in (queued.queue if queued else []) if client_key(event.request.scope) == client)
        if waiting >= self.per_client:
            sentence = (
                f"this client already has {waiting} requests waiting (at most {self.per_client} per client); "
                "try again when one has finished"
            )
            # In the form of a validation refusal (HTTP 422): gradio_client then raises with the sentence.
            return [{"__type__": "validate", "is_valid": False, "parameter_name": "queue", "message": sentence}], (
                "validator_error"
            )
        return None


def readings_never_queue_full(demo, per_client: int = PER_CLIENT) -> None:
    """Call after `demo.queue(...)`: the queue it made stops counting readings toward its bound,
    refuses malformed requests before queueing them and gives each client at most `per_client`
    waiting requests."""
    if type(demo._queue) is not queueing.Queue:  # a Gradio that builds its queue differently: say so
        raise RuntimeError(f"unexpected Gradio queue type {type(demo._queue).__name__}")
    demo._queue.__class__ = ReadingsFirstQueue
    demo._queue.per_client = per_client


# -- a client that goes away stops its run ------------------------------------------------------
CLIENT_POLL_S = 0.25  # how often a running client endpoint looks for its client


def _events_of(request, api_name: str) -> list:
    """The queue's running events of this request's session and endpoint (empty outside the queue)."""
    app = getattr(getattr(request, "request", None), "app", None)
    session = getattr(request, "session_hash", None)
    queue = getattr(getattr(app, "get_blocks", lambda: None)(), "_queue", None)
    if queue is None or session is None:
        return []
    running = [event for job in list(queue.active_jobs) if job for event in job]
    return [e for e in running if e.session_hash == session and getattr(e.fn, "api_name", None) == api_name]


def _still_wanted(queue_jobs, events) -> bool:
    running = {id(event) for job in list(queue_jobs) if job for event in job}
    return any(event.alive and id(event) in running for event in events)


@contextlib.contextmanager
def stop_when_client_leaves(request, api_name: str) -> Iterator[threading.Event]:
    """For the block: the request's stop flag (`lifecycle.request_stop`), set when Gradio drops
    its client (the client's event stream closed: Gradio marks its events not alive) or cancels
    its event. A plain handler runs in a thread Gradio cannot interrupt; without this its run
    would hold the model to the end."""
    flag = threading.Event()
    events = _events_of(request, api_name)
    if not events:
        with lifecycle.request_stop(flag):
            yield flag
        return
    queue = request.request.app.get_blocks()._queue
    done = threading.Event()

    def watch() -> None:
        while not done.wait(CLIENT_POLL_S):
            if not _still_wanted(queue.active_jobs, events):
                logger.info("%s: the client went away; its run stops", api_name)
                flag.set()
                return

    watcher = threading.Thread(target=watch, name="client-watch", daemon=True)
    watcher.start()
    try:
        with lifecycle.request_stop(flag):
            yield flag
    finally:
        done.set()
        watcher.join()


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


# Gradio routes without its own login check: refused (401) to anyone not logged in.
_REFUSED_PREFIXES = (
    "/gradio_api/mcp",  # the MCP schema, tools and SSE sessions
    "/gradio_api/cancel",  # ends an event by id
    "/gradio_api/reset",
    "/gradio_api/heartbeat/",  # holds a connection open
    "/gradio_api/stream/",  # feeds or closes a streaming event by id
    "/gradio_api/run-history/",
    "/gradio_api/runs",
)
LOGIN_FAILURES = 10  # wrong passwords one client may send per LOGIN_WINDOW_S; then 429 until the window passes
LOGIN_WINDOW_S = 60.0
LOGIN_CLIENTS = 4096  # clients whose failures are remembered (the oldest forgotten first): bounded memory


class LoginLimiter:
    """Failed logins per client (`client_key`) in a sliding window, for at most `LOGIN_CLIENTS` clients."""

    def __init__(self, failures: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S) -> None:
        self.failures, self.window_s = failures, window_s
        self._seen: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def _recent(self, client: str, now: float) -> collections.deque:
        times = self._seen.get(client)
        if times is None:
            return collections.deque()
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def wait_s(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic()
        times = self._recent(client, now)
        return self.window_s - (now - times[0]) if len(times) >= self.failures else 0.0

    def failed(self, client: str) -> None:
        now = time.monotonic()
        times = self._recent(client, now)
        times.append(now)
        self._seen[client] = times
        self._seen.move_to_end(client)
        while len(self._seen) > LOGIN_CLIENTS:
            self._seen.popitem(last=False)


class AnonymousGuard:
    """ASGI middleware: with a login configured, an anonymous visitor gets the login page without
    the API description; a 401 for the heartbeat, MCP (schema, tools, SSE sessions), cancel,
    reset and stream routes; a 404 for FastAPI's schema and docs; and after `LOGIN_FAILURES` wrong passwords
    within `LOGIN_WINDOW_S` a 429 for further logins."""

    def __init__(self, app):
        self.app = app
        self.logins = LoginLimiter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if scope.get("method") == "POST" and path.rstrip("/") == "/login" and _auth_configured(scope.get("app")):
            return await self._login(scope, receive, send)
        if _logged_in(scope.get("app"), scope):
            return await self.app(scope, receive, send)
        if path in _HIDDEN_PATHS:
            return await _plain(send, 404, b"Not Found")
        if path.startswith(_REFUSED_PREFIXES):
            return await _plain(send, 401, b"Not authenticated")
        if scope.get("method") == "GET" and not path.startswith("/gradio_api/"):
            return await self.app(scope, receive, _without_api_info(send))
        return await self.app(scope, receive, send)

    async def _login(self, scope, receive, send):
        client = client_key(scope)
        wait_s = self.logins.wait_s(client)
        if wait_s > 0:
            logger.info("login refused: too many failed logins from one client")
            body = f"too many failed logins: try again in {math.ceil(wait_s)} s".encode()
            return await _plain(send, 429, body, [(b"retry-after", str(math.ceil(wait_s)).encode())])

        async def watched(message):
            if message["type"] == "http.response.start" and message.get("status") == 400:
                self.logins.failed(client)
            await send(message)

        return await self.app(scope, receive, watched)


def _auth_configured(app) -> bool:
    return getattr(app, "auth", None) is not None


async def _plain(send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    headers += extra or []
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


MAX_UPLOAD_BYTES = limits.VECTOR_FILE_BYTES  # the largest file the app reads (a vector file); recipes are smaller
MAX_SESSIONS = 256  # sessions whose state Gradio keeps (~0.3 MiB each; the least recently used dropped first)


def app_kwargs() -> dict:
    """`demo.launch(app_kwargs=...)`: the FastAPI app gets `AnonymousGuard`."""
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(AnonymousGuard)]}


# Words Gradio 6.31's frontend asks its i18n for but its English strings lack, so the page shows
# the key itself: the status tracker announces every finished event as "common.complete" (a
# live region read by screen readers, and in the page's text).
MISSING_TRANSLATIONS = {"en": {"common": {"complete": "Complete"}}}


def launch_kwargs() -> dict:
    """What `demo.launch(...)` takes from here: the guard, the upload bound, the session bound
    the translations Gradio lacks and the page's style and scripts (steering/ui/common.py)."""
    return {
        "app_kwargs": app_kwargs(),
        "max_file_size": MAX_UPLOAD_BYTES,
        "state_session_capacity": MAX_SESSIONS,
        "i18n": I18n(**MISSING_TRANSLATIONS),
        "head": PAGE_HEAD,
    }


# -- downloads: Gradio's cached copies go when the app's own file goes --------------------------
def prune_cached_downloads() -> int:
    """Delete Gradio's cached copies of the app's download files (steering/files.py) whose
    original has been deleted, so the cache holds no more of them than the app's folders
    (files.KEEP per kind). Returns how many were deleted."""
    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder())
    deleted = 0
    for copy in cache.glob(f"*/{files.PREFIX}*"):
        if copy.is_file() and not files.still_kept(copy.name):
            copy.unlink(missing_ok=True)
            deleted += 1
            with contextlib.suppress(OSError):
                copy.parent.rmdir()  # its hash folder, when it is empty
    return deleted


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
