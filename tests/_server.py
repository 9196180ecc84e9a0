"""Helpers for the tests that talk to a real server: free ports, an in-process launched app,
a `python app.py` subprocess with its log captured, and clients that send no analytics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The converted embedded model and the tiny test models, shared by every test and test server.
MODEL_CACHE = Path(os.environ.get("STEERING_TEST_MODELS", ROOT / ".pytest-models"))
TOKENS = 8  # new tokens per generation in these tests: enough to tell outputs apart, cheap on CPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client(url: str, **kwargs):
    """A gradio_client Client that sends no telemetry (it ignores GRADIO_ANALYTICS_ENABLED)."""
    from gradio_client import Client

    kwargs.setdefault("download_files", False)
    return Client(url, analytics_enabled=False, verbose=False, **kwargs)


def ensure_embedded_loaded() -> None:
    """Serve the embedded SmolLM2, unlocked, whatever earlier test modules did to the manager."""
    from steering import catalog
    from steering.loader import get_manager

    manager = get_manager()
    manager.configure(lock_model=False)
    if manager.current is None or manager.current.model_id != catalog.EMBEDDED_ID:
        manager.load(catalog.EMBEDDED_ID, "auto", user=False)


@contextlib.contextmanager
def launched(config=None) -> Iterator[str]:
    """`build_demo(config)` launched in this process on a free port; yields its URL."""
    from steering.ui import build_demo, serving

    ensure_embedded_loaded()
    demo = build_demo(config)
    demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
        **serving.launch_kwargs(),
    )  # fmt: skip
    try:
        yield demo.local_url
    finally:
        demo.close()


class AppProcess:
    """`python app.py ...` in a subprocess; its combined output is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout_s: float = 180.0) -> None:
        """Until the server answers HTTP (any status: with --auth the page itself is a 401)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log}")
            try:
                httpx.get(self.url, timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.5)
        raise TimeoutError(f"app.py did not serve within {timeout_s} s:\n{self.log}")

    def wait_for_line(self, text: str, timeout_s: float = 60.0) -> str:
        """The first log line containing `text`, waiting for it to appear."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise TimeoutError(f"no log line with {text!r} within {timeout_s} s:\n{self.log}")

    def terminate(self, timeout_s: float = 20.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def app_env(tmp_dir: Path) -> dict[str, str]:
    """Environment for an app subprocess: offline, user state in `tmp_dir`, the shared model cache."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "XDG_CACHE_HOME": str(tmp_dir / "xdg-cache"),
        "HF_HOME": str(tmp_dir / "hf-home"),
        "GRADIO_TEMP_DIR": str(tmp_dir / "gradio"),
        "STEERING_CACHE_DIR": str(MODEL_CACHE),  # the converted embedded model, shared
        "OMP_NUM_THREADS": "2",
        "TOKENIZERS_PARALLELISM": "false",
    }
