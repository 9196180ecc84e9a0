"""`python app.py` as a user runs it: a real subprocess, a real port, real `gradio_client` calls.

Two processes per module run: a plain one (serves /steer, stops cleanly on SIGTERM) and a
"public demo" one with `--share --auth --lock-model --mcp`, checked offline: the share link fails
with one clear log line while the local URL keeps serving, a client without the password is
refused, model switching is refused, and the missing MCP extra is reported plainly.
"""

from __future__ import annotations

import importlib.util
import signal

import httpx
import pytest
from _server import TOKENS, AppProcess, app_env, client
from gradio_client.exceptions import AppError

from steering import catalog

SHARE_LINE = "the share link could not be made: "
GRADIO_HINT = "set `share=True`"  # Gradio's own start-up hint, which contradicts --share


@pytest.fixture(scope="module")
def plain_app(embedded_dir, tmp_path_factory):
    app = AppProcess([], env=app_env(tmp_path_factory.mktemp("plain-app")))
    try:
        app.wait_serving()
        yield app
    finally:
        app.kill()


@pytest.fixture(scope="module")
def public_app(embedded_dir, tmp_path_factory):
    env = app_env(tmp_path_factory.mktemp("public-app"))
    # An unreachable share server: the link fails here even on a machine that is online.
    env["GRADIO_SHARE_SERVER_ADDRESS"] = "127.0.0.1:9"
    app = AppProcess(["--share", "--auth", "alice:s3cret", "--lock-model", "--mcp"], env=env)
    try:
        app.wait_serving()
        yield app
    finally:
        app.kill()


def test_app_serves_steer_and_logs_one_line_per_request(plain_app):
    api = client(plain_app.url)
    result = api.predict(
        "Tell me about your weekend.", [{"text": "dogs", "coeff": 0.0, "layer": 15}], TOKENS, api_name="/steer"
    )
    assert result["model"] == catalog.EMBEDDED_ID
    assert result["steered"] and result["steered"] == result["baseline"]
    assert "request steer " in plain_app.log
    assert "Tell me about your weekend" not in plain_app.log  # prompts are not logged


def test_app_stops_cleanly_on_sigterm(embedded_dir, tmp_path):
    app = AppProcess([], env=app_env(tmp_path))  # its own process: the shared one keeps serving
    try:
        app.wait_serving()
        code, seconds = app.terminate()
    finally:
        app.kill()
    assert code in (0, -signal.SIGTERM), app.log
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    assert "shutting down" in app.log
    with pytest.raises(httpx.TransportError):
        httpx.get(app.url, timeout=2)


def test_sigterm_during_a_long_steer_exits_quickly_and_the_client_hears_why(embedded_dir, tmp_path):
    """A 512-token /steer is cut at its next decoding step: the process exits within seconds,
    not after the generation, and the waiting client gets an error, not a truncated text."""
    import time

    app = AppProcess([], env=app_env(tmp_path))
    try:
        app.wait_serving()
        from gradio_client.utils import Status

        # A strong vector makes the output loop ("dogs dogs dogs ..."), so it never ends early with
        # an end-of-text token: the generation really is 512 tokens long.
        loop = [{"text": "dogs", "coeff": 8.0, "layer": 15}]
        job = client(app.url).submit("Tell me a long story.", loop, 512, api_name="/steer")
        deadline = time.monotonic() + 120
        while job.status().code != Status.PROCESSING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.status().code == Status.PROCESSING, job.status()
        time.sleep(2)  # into the generation (512 tokens take far longer here)
        code, seconds = app.terminate(timeout_s=30)
    finally:
        app.kill()
    assert code in (0, -signal.SIGTERM), app.log
    assert seconds < 15, f"took {seconds:.1f} s to stop"
    try:
        value, error = job.result(timeout=30), None
    except Exception as exc:  # noqa: BLE001 - the client's own error type is what is checked
        value, error = None, str(exc)
    assert error is not None and "server shutting down" in error, (value, error, app.log[-2000:])


def test_plain_app_says_where_it_serves_in_its_own_words(plain_app):
    line = plain_app.wait_for_line("Steering Lab is serving at ")
    assert line.endswith(f"http://127.0.0.1:{plain_app.port}/")
    assert GRADIO_HINT not in plain_app.log and "Running on local URL" not in plain_app.log
    assert SHARE_LINE not in plain_app.log  # no --share: nothing about a link


def test_offline_share_logs_one_clear_line_and_serves_locally(public_app):
    public_app.wait_for_line(SHARE_LINE)  # the share attempt comes after the local server is up
    lines = [line for line in public_app.lines if SHARE_LINE in line]
    assert len(lines) == 1, public_app.log
    assert lines[0].endswith(", serving locally only (offline?)"), lines[0]
    reason = lines[0].split(SHARE_LINE, 1)[1].removesuffix(", serving locally only (offline?)")
    assert reason and reason != "Gradio gave no reason", lines[0]
    assert f"Steering Lab is serving at http://127.0.0.1:{public_app.port}/" in public_app.log
    assert GRADIO_HINT not in public_app.log and "Could not create share link" not in public_app.log
    assert httpx.get(public_app.url + "gradio_api/info", timeout=10).status_code == 401  # serving, with a login


def test_auth_refuses_a_client_without_credentials(public_app):
    with pytest.raises(Exception) as caught:
        client(public_app.url)
    assert "auth" in str(caught.value).lower() or "login" in str(caught.value).lower(), caught.value
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the point is that it is refused
        client(public_app.url, auth=("alice", "wrong"))
    status = client(public_app.url, auth=("alice", "s3cret")).predict(api_name="/status")
    assert status["model"] == catalog.EMBEDDED_ID and status["locked"] is True


def test_lock_model_refuses_load_model_with_a_clear_error(public_app):
    api = client(public_app.url, auth=("alice", "s3cret"))
    with pytest.raises(AppError, match="--lock-model"):
        api.predict(catalog.EMBEDDED_ID, "auto", False, api_name="/load_model")
    assert api.predict(api_name="/status")["model"] == catalog.EMBEDDED_ID  # still serving the same model


def test_missing_mcp_extra_is_reported_plainly(public_app):
    if importlib.util.find_spec("mcp") is None:
        assert "--mcp needs the MCP extra: pip install 'gradio[mcp]" in public_app.log
    assert "--share without --auth" not in public_app.log  # auth was given
    assert "Traceback" not in public_app.log


def test_flags_auth_env_and_share_warning(monkeypatch):
    import app

    monkeypatch.setenv("STEERING_AUTH", "bob:pw:with:colons")
    args = app.parse_args(["--share", "--vram-limit", "6GiB"])
    assert args.auth == ("bob", "pw:with:colons") and args.vram_limit == 6 * 2**30
    assert app.startup_warnings(args, mcp_installed=True) == []
    monkeypatch.delenv("STEERING_AUTH")
    args = app.parse_args(["--share", "--mcp"])
    warnings = app.startup_warnings(args, mcp_installed=False)
    assert any(w.startswith("--share without --auth") for w in warnings)
    assert any("gradio[mcp]" in w for w in warnings)
    for bad in (["--auth", "nopassword"], ["--auth", " : "], ["--vram-limit", "lots"], ["--gui-overhead", "1GiB"]):
        with pytest.raises(SystemExit) as caught:
            app.parse_args(bad)
        assert caught.value.code == 2
    for blank in (" : ", "", "alice:"):  # set but blank is refused, never read as "no login"
        monkeypatch.setenv("STEERING_AUTH", blank)
        with pytest.raises(SystemExit) as caught:
            app.parse_args([])
        assert caught.value.code == 2


def test_simulate_gpu_takes_several_cards():
    import app

    args = app.parse_args(["--simulate-gpu", "8GiB,8GiB", "--gui-overhead", "0.7GiB"])
    assert args.simulate_gpu == [8 * 2**30, 8 * 2**30] and args.gui_overhead == int(0.7 * 2**30)
    for bad in (["--simulate-gpu", "8GiB,"], ["--simulate-gpu", "8GiB,lots"]):
        with pytest.raises(SystemExit) as caught:
            app.parse_args(bad)
        assert caught.value.code == 2
