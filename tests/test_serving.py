"""What the server shows and logs (issue 12): readings when the queue is full, nothing about the API
before login, one log line (no inputs) for an error outside our handlers.

The queue test holds the model lock from the test, so generations wait without computing; the
login and log tests run `python app.py --auth` as a user does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest
from _server import TOKENS, AppProcess, app_env, client, launched

from steering import catalog
from steering.loader import get_manager
from steering.ui import UIConfig

SECRET_PROMPT = "zebra-violin-7741 is my secret prompt"


def _wait_until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def test_readings_answer_while_generations_fill_the_queue():
    args = ("Hello.", [{"text": "dogs", "coeff": 0.5, "layer": 15}], TOKENS)
    manager = get_manager()
    with launched(UIConfig(max_queue=2)) as url:
        api = client(url)
        with manager._lock:  # the model is busy: the first /steer runs and waits, the rest queue
            jobs = [api.submit(*args, api_name="/steer") for _ in range(3)]
            _wait_until(lambda: sorted(j.status().code.name for j in jobs) == ["IN_QUEUE", "IN_QUEUE", "PROCESSING"])
            refused = api.submit(*args, api_name="/steer")
            with pytest.raises(Exception, match="(?i)queue is full"):
                refused.result(timeout=60)
            status = api.predict(api_name="/status")  # a reading: not refused, not waiting
            plan = api.predict(api_name="/plan")
        assert status["model"] == catalog.EMBEDDED_ID
        assert plan["models"] and "margin_bytes" in plan
        results = [job.result(timeout=120) for job in jobs]  # the lock is free: the queue drains
        assert all(r["steered"] for r in results)


@pytest.fixture(scope="module")
def auth_app(embedded_dir, tmp_path_factory):
    app = AppProcess(["--auth", "alice:s3cret"], env=app_env(tmp_path_factory.mktemp("auth-app")))
    try:
        app.wait_serving()
        yield app
    finally:
        app.kill()


@contextlib.contextmanager
def _logged_in(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as session:
        assert session.post("login", data={"username": "alice", "password": "s3cret"}).status_code == 200
        yield session


def test_nothing_about_the_api_is_visible_before_login(auth_app):
    page = httpx.get(auth_app.url, timeout=10)
    assert page.status_code == 200 and "auth_required" in page.text  # the login page
    assert "window.gradio_api_info = null;" in page.text
    for name in ("/steer", "/load_model", "coefficient", "capture"):
        assert name not in page.text, name
    assert httpx.get(auth_app.url + "openapi.json", timeout=10).status_code == 404
    assert httpx.get(auth_app.url + "gradio_api/info", timeout=10).status_code == 401
    heartbeat = httpx.get(auth_app.url + "gradio_api/heartbeat/anyone", timeout=10)
    assert heartbeat.status_code == 401  # refused at once, not held open

    with _logged_in(auth_app.url) as session:  # after login: the app and its API description
        page = session.get("").text
        assert "window.gradio_api_info = null;" not in page and '"/steer"' in page
        assert session.get("gradio_api/info").status_code == 200


def test_too_few_inputs_are_refused_before_the_queue_without_echoing_them(auth_app):
    with _logged_in(auth_app.url) as session:
        config = session.get("config").json()
        steer = next(d for d in config["dependencies"] if d.get("api_name") == "steer")
        before = len(auth_app.lines)
        body = {"data": [SECRET_PROMPT], "fn_index": steer["id"], "session_hash": "abc123", "event_data": None}
        joined = session.post("gradio_api/queue/join", json=body)
        assert joined.status_code == 400, joined.text
        assert joined.json()["detail"].startswith("steer: needs ") and SECRET_PROMPT not in joined.text
        time.sleep(1)
        new = auth_app.lines[before:]
        assert SECRET_PROMPT not in auth_app.log
        assert not any("Traceback" in line or "Received inputs" in line for line in new), new
    assert client(auth_app.url, auth=("alice", "s3cret")).predict(api_name="/status")["model"]  # still serving
