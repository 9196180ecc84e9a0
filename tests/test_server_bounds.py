"""What the server bounds for strangers: nothing of MCP, cancel or reset before login, failed
logins rate limited, uploads, Gradio's cache of downloads, each client's share of the queue,
malformed queue requests refused with a sentence, and the state kept per session.

One `python app.py --auth --mcp` process serves the login tests, as a user runs it; the queue
and cache tests launch the app in this process (the queue test holds the model lock, so
generations wait without computing).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from _server import TOKENS, AppProcess, app_env, client, launched

from steering import files
from steering.loader import get_manager
from steering.ui import UIConfig, serving

USER = ("alice", "s3cret")
MCP = importlib.util.find_spec("mcp") is not None


@pytest.fixture(scope="module")
def guarded_app(embedded_dir, tmp_path_factory):
    args = ["--auth", ":".join(USER)] + (["--mcp"] if MCP else [])
    app = AppProcess(args, env=app_env(tmp_path_factory.mktemp("guarded-app")))
    try:
        app.wait_serving()
        yield app
    finally:
        app.kill()


@contextlib.contextmanager
def _logged_in(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as session:
        assert session.post("login", data={"username": USER[0], "password": USER[1]}).status_code == 200
        yield session


@pytest.mark.skipif(not MCP, reason="needs gradio[mcp] (requirements.txt)")
def test_anonymous_visitors_get_no_mcp_schema_tools_or_sessions(guarded_app):
    url = guarded_app.url
    assert httpx.get(url + "gradio_api/mcp/schema", timeout=10).status_code == 401
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"accept": "application/json, text/event-stream"}
    assert httpx.post(url + "gradio_api/mcp/", json=listing, headers=headers, timeout=10).status_code == 401
    started = time.monotonic()
    with httpx.stream("GET", url + "gradio_api/mcp/sse", timeout=10) as sse:  # refused, not held open
        assert sse.status_code == 401
    assert time.monotonic() - started < 5
    with _logged_in(url) as session:  # after login the schema is there
        schema = session.get("gradio_api/mcp/schema")
        assert schema.status_code == 200 and "steer" in schema.text


def test_anonymous_cancel_reset_and_stream_are_refused(guarded_app):
    body = {"session_hash": "someone", "fn_index": 0, "event_id": uuid.uuid4().hex, "data": []}
    for route in ("gradio_api/cancel", "gradio_api/reset", f"gradio_api/stream/{body['event_id']}/close"):
        assert httpx.post(guarded_app.url + route, json=body, timeout=10).status_code == 401, route
    with _logged_in(guarded_app.url) as session:
        assert session.post("gradio_api/cancel", json=body).status_code == 200


def test_failed_logins_are_limited_per_client(guarded_app):
    # Through the local proxy a client is its X-Forwarded-For address; a made-up one keeps the
    # other tests' logins (from 127.0.0.1) unaffected.
    wrong = {"username": USER[0], "password": "guess"}
    with httpx.Client(base_url=guarded_app.url, timeout=10, headers={"x-forwarded-for": "203.0.113.7"}) as bad:
        codes = [bad.post("login", data=wrong).status_code for _ in range(serving.LOGIN_FAILURES)]
        assert codes == [400] * serving.LOGIN_FAILURES
        limited = bad.post("login", data={"username": USER[0], "password": USER[1]})  # even the right one
        assert limited.status_code == 429 and "too many failed logins" in limited.text
        assert 0 < int(limited.headers["retry-after"]) <= serving.LOGIN_WINDOW_S
    with httpx.Client(base_url=guarded_app.url, timeout=10, headers={"x-forwarded-for": "203.0.113.8"}) as other:
        assert other.post("login", data={"username": USER[0], "password": USER[1]}).status_code == 200


def test_uploads_are_bounded(guarded_app):
    with _logged_in(guarded_app.url) as session:
        small = session.post("gradio_api/upload", files={"files": ("v.gguf", b"GGUF" + b"\0" * 100)})
        assert small.status_code == 200
        big = b"\0" * (serving.MAX_UPLOAD_BYTES + 1)
        refused = session.post("gradio_api/upload", files={"files": ("v.gguf", big)})
        assert refused.status_code == 413, refused.text[:200]


def test_malformed_queue_requests_are_refused_with_a_sentence(guarded_app):
    secret = "zebra-violin-7741 is my secret prompt"
    with _logged_in(guarded_app.url) as session:
        config = session.get("config").json()
        steer = next(d for d in config["dependencies"] if d.get("api_name") == "steer")
        before = len(guarded_app.lines)
        join = {"data": [secret], "fn_index": steer["id"], "session_hash": "few-inputs", "event_data": None}
        few = session.post("gradio_api/queue/join", json=join)
        assert few.status_code == 400
        detail = few.json()["detail"]
        assert detail.startswith("steer: needs ") and "got 1" in detail and "object at 0x" not in detail
        unknown = session.post("gradio_api/queue/join", json={**join, "fn_index": 99999, "session_hash": "unknown"})
        assert unknown.status_code == 400 and unknown.json()["detail"] == "fn_index: no endpoint has index 99999"
        time.sleep(1)
        new = guarded_app.lines[before:]
        assert secret not in guarded_app.log
        assert not any("Traceback" in line for line in new), new
    assert client(guarded_app.url, auth=USER).predict(api_name="/status")["model"]  # still serving


def _wait_until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def test_one_client_gets_a_fair_share_of_the_queue():
    args = ("Hello.", [{"text": "dogs", "coeff": 0.5, "layer": 15}], TOKENS)
    with launched(UIConfig(per_client=2)) as url:
        mine, theirs = client(url), client(url, headers={"x-forwarded-for": "198.51.100.4"})
        with get_manager()._lock:  # the model is busy: the first /steer runs and waits, the rest queue
            jobs = [mine.submit(*args, api_name="/steer") for _ in range(3)]
            _wait_until(lambda: sorted(j.status().code.name for j in jobs) == ["IN_QUEUE", "IN_QUEUE", "PROCESSING"])
            with pytest.raises(Exception, match="already has 2 requests waiting"):
                mine.submit(*args, api_name="/steer").result(timeout=60)
            other = theirs.submit(*args, api_name="/steer")  # another client still gets its turn
            _wait_until(lambda: other.status().code.name == "IN_QUEUE")
            assert mine.predict(api_name="/status")["model"]  # readings are not counted
        assert all(j.result(timeout=180)["steered"] for j in [*jobs, other])


def _cached_exports() -> list:
    from pathlib import Path

    from gradio.utils import get_upload_folder

    return [p for p in Path(get_upload_folder()).glob(f"*/{files.PREFIX}vectors-*") if p.is_file()]


def test_exports_copied_into_gradios_cache_are_deleted_with_their_originals(monkeypatch):
    monkeypatch.setattr(files, "KEEP", 3)
    vector = [{"direction": [0.01] * 576, "coeff": 1.0, "layer": 15}]
    with launched() as url:
        api = client(url)
        before = set(_cached_exports())
        for _ in range(8):
            api.predict(vector, "gguf", api_name="/export_vectors")
        new = set(_cached_exports()) - before
    assert 0 < len(new) <= files.KEEP + 1, sorted(p.name for p in new)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _new_sessions(url: str, n: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        status = next(d["id"] for d in http.get("config").json()["dependencies"] if d.get("api_name") == "status")
        for _ in range(n):
            session = uuid.uuid4().hex
            join = {"data": [], "fn_index": status, "session_hash": session, "event_data": None}
            assert http.post("gradio_api/queue/join", json=join).status_code == 200
            with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as events:
                for line in events.iter_lines():
                    if "process_completed" in line:
                        break


def test_state_kept_per_session_is_bounded(embedded_dir, tmp_path):
    app = AppProcess([], env=app_env(tmp_path))
    try:
        app.wait_serving()
        _new_sessions(app.url, 50)  # warm: first-request allocations
        start = _rss_mib(app.proc.pid)
        _new_sessions(app.url, serving.MAX_SESSIONS)
        full = _rss_mib(app.proc.pid)
        _new_sessions(app.url, 2 * serving.MAX_SESSIONS)  # as many again, twice over: old ones dropped
        after = _rss_mib(app.proc.pid)
        n = serving.MAX_SESSIONS
        print(f"RSS {start:.0f} -> {full:.0f} MiB after {n} sessions -> {after:.0f} MiB after {2 * n} more")
        assert after - full < 0.5 * max(full - start, 20), (start, full, after)
    finally:
        app.kill()


# Long runs: 8 rows of 512 tokens, strongly steered (they loop rather than end); 8 texts of 250
# tokens read at the last layer (130 s on 2 loaded CPU cores).
LONG_RUNS = {
    "sweep": ["Tell me a long story about the sea.", "dogs", 15, [8, 10, 12, 14, 16, 18, 19, 20], 512, 0, "all", False],
    "similarity": [[" ".join(f"{(i * 31 + j * 7) % 1000}" for j in range(240))[:250] for i in range(8)], 29],
}


@pytest.mark.parametrize("endpoint", list(LONG_RUNS))
def test_a_client_that_goes_away_mid_run_stops_it(endpoint, caplog):
    caplog.set_level(logging.INFO, logger="steering.serving")
    with launched() as url, httpx.Client(base_url=url, timeout=30) as http:
        fn = next(d["id"] for d in http.get("config").json()["dependencies"] if d.get("api_name") == endpoint)
        session = uuid.uuid4().hex
        join = {"data": LONG_RUNS[endpoint], "fn_index": fn, "session_hash": session, "event_data": None}
        assert http.post("gradio_api/queue/join", json=join).status_code == 200
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if "process_starts" in line:
                    break
            time.sleep(2.0)  # generating now; then the client goes away
        started = time.monotonic()
        result = client(url).predict("Hello.", [], TOKENS, api_name="/steer")  # waits for the model
        waited = time.monotonic() - started
    print(f"the next request took {waited:.1f} s")
    assert result["steered"] and waited < 15, waited
    assert f"{endpoint}: the client went away; its run stops" in caplog.text


def _event(http: httpx.Client, fn: int, data: list) -> dict:
    """One UI event by raw HTTP, as the browser sends it; its process_completed message."""
    session = uuid.uuid4().hex
    join = {"data": data, "fn_index": fn, "session_hash": session, "event_data": None}
    assert http.post("gradio_api/queue/join", json=join).status_code == 200
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            if '"process_completed"' in line:
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("no process_completed")


RECIPE_VALUES = (  # (what the file holds, the field its refusal must name)
    ({"settings": {"temperature": "hot"}}, "recipe.settings.temperature"),
    ({"settings": {"seed": [1, 2]}}, "recipe.settings.seed"),
    ({"settings": {"seed": float("nan")}}, "recipe.settings.seed"),
    ({"settings": {"seed": 1e308}}, "recipe.settings.seed"),
    ({"prompt": {"a": 1}}, "recipe.prompt"),
    ({"vectors": [{"direction": 5, "coeff": 1, "layer": 15}]}, "recipe.vectors[0].direction"),
    ({"vectors": [{"text": "dogs", "coeff": 1, "layer": {"a": 1}}]}, "recipe.vectors[0].layer"),
    ({"vectors": [{"direction": [0.01] * 20_000, "coeff": 1, "layer": 15}]}, "recipe.vectors[0].direction"),
    ({"vectors": [{"text": "dogs", "coeff": 1, "layer": 15, "positions": "evil"}]}, "recipe.vectors[0].positions"),
)


def test_recipe_uploads_with_bad_values_get_a_sentence_naming_the_field(tmp_path):
    from steering.ui import views

    base = {"format": views.RECIPE_FORMAT, "version": 3, "prompt": "Hi", "vectors": [], "settings": {}}
    with launched() as url, httpx.Client(base_url=url, timeout=30) as http:
        config = http.get("config").json()
        fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "load_recipe")  # the upload
        wrong = []
        for values, field in RECIPE_VALUES:
            text = json.dumps({**base, **values})
            (path,) = http.post("gradio_api/upload", files={"files": ("recipe.json", text.encode())}).json()
            done = _event(http, fn, [{"path": path, "meta": {"_type": "gradio.FileData"}}, 15])
            message = done["output"]["data"][-1] if done["success"] else f"failed: {done['output']}"
            if not message.startswith(f"⚠️ {field}: ") or "Error" in message or "object at 0x" in message:
                wrong.append((field, message[:100]))
    assert not wrong, wrong


def test_the_run_registry_forgets_sessions_that_never_came_back():
    from steering.ui import common

    runs = common.Runs()
    for i in range(4 * common.Runs.MAX):  # a run begun in each of many sessions, never ended
        runs.begin(f"session-{i}")
    assert len(runs._runs) <= common.Runs.MAX and len(runs._latest) <= common.Runs.MAX
    assert runs.latest(f"session-{4 * common.Runs.MAX - 1}") is not None  # the newest are kept


def test_the_login_limiter_remembers_a_bounded_number_of_clients():
    limiter = serving.LoginLimiter(failures=2, window_s=60)
    for i in range(serving.LOGIN_CLIENTS + 500):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._seen) == serving.LOGIN_CLIENTS
    newest = f"10.0.{(serving.LOGIN_CLIENTS + 499) // 256}.{(serving.LOGIN_CLIENTS + 499) % 256}"
    limiter.failed(newest)
    assert limiter.wait_s(newest) > 0 and limiter.wait_s("10.0.0.0") == 0  # the oldest forgotten
