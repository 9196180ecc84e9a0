"""Steering Lab entry point: flags -> model manager -> UI -> launch. Thin on purpose.

    python app.py                                   # local browser on http://127.0.0.1:7860
    python app.py --share --auth alice:secret       # a temporary public link, with a password
    python app.py --model Qwen/Qwen2.5-1.5B-Instruct --quant 4bit --vram-limit 6GiB
    python app.py --simulate-gpu 8GiB --gui-overhead 0.7GiB   # plan as if on the reference card
    python app.py --simulate-gpu 8GiB,8GiB                    # ... or on two such cards

The initial model is loaded before the server starts, so the first request does not pay for it.
SIGTERM (and Ctrl-C) close the server and release the model, then exit with status 0.
"""

# ruff: noqa: E402  (the environment must be set before the imports below)
from __future__ import annotations

import os

# Before gradio is imported anywhere: no usage analytics (a value the user set is respected).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import contextlib
import importlib.util
import io
import logging
import signal
import sys
import threading
import time

import steering  # noqa: F401  (sets the CUDA allocator options before torch is imported)
from steering import gpu, lifecycle
from steering.loader import QUANT_CHOICES, get_manager

logger = logging.getLogger("steering.app")

AUTH_ENV = "STEERING_AUTH"
SHUTDOWN_GRACE_S = 1.0  # after the model is freed: time for refused requests' errors to reach clients


def _size(text: str) -> int:
    try:
        return gpu.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _sizes(text: str) -> list[int]:
    try:
        return gpu.parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password.strip():
        raise argparse.ArgumentTypeError("expected USER:PASS with a non-blank user and password, e.g. alice:s3cret")
    return user, password


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="Steering Lab: activation steering in the browser.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    parser.add_argument("--auth", type=_auth, metavar="USER:PASS", help=f"require a login (or set {AUTH_ENV})")
    parser.add_argument("--model", help="model to load at start (default: the best that fits; on CPU the embedded)")
    parser.add_argument("--quant", default="auto", choices=QUANT_CHOICES, help="quantization for --model")
    parser.add_argument("--vram-limit", type=_size, metavar="SIZE", help="cap on VRAM the app may use, e.g. 6GiB")
    parser.add_argument("--margin", type=_size, metavar="SIZE", help="safety margin the plan keeps free (default 1GiB)")
    parser.add_argument("--context", type=int, metavar="N", help="context tokens per row to plan for (default 2048)")
    parser.add_argument("--fallback-model", metavar="ID", help="model to load when one does not fit or runs out")
    parser.add_argument("--lock-model", action="store_true", help="disable model switching (public demos)")
    parser.add_argument(
        "--models-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose model folders users may load (repeatable; the Hugging Face cache always counts)",
    )
    parser.add_argument("--mcp", action="store_true", help="also serve the endpoints as MCP tools (gradio[mcp])")
    dev = parser.add_argument_group("development and testing")
    dev.add_argument(
        "--simulate-gpu", type=_sizes, metavar="SIZE[,SIZE...]", help="plan as if on cards of these sizes (8GiB,8GiB)"
    )
    dev.add_argument("--gui-overhead", type=_size, metavar="SIZE", help="desktop VRAM on the (first) simulated card")
    args = parser.parse_args(argv)
    if args.auth is None and AUTH_ENV in os.environ:  # set but empty is an error, not "no login"
        try:
            args.auth = _auth(os.environ[AUTH_ENV])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{AUTH_ENV}: {exc}")
    if args.gui_overhead is not None and args.simulate_gpu is None:
        parser.error("--gui-overhead needs --simulate-gpu")
    return args


def startup_warnings(args: argparse.Namespace, *, mcp_installed: bool) -> list[str]:
    """What an operator should know before the server starts."""
    warnings = []
    if args.share and not args.auth:
        warnings.append(f"--share without --auth (or {AUTH_ENV}): anyone with the link can use this app and its model")
    if args.mcp and not mcp_installed:
        warnings.append("--mcp needs the MCP extra: pip install 'gradio[mcp]==6.31.0'. Serving without MCP tools.")
    elif args.mcp and args.auth:
        # Gradio's MCP server calls each tool through a client of its own that does not log in
        # (gradio 6.31, mcp 1.30): every call is refused.
        warnings.append(
            "--mcp with --auth: Gradio's MCP tool calls do not log in, so every call is refused "
            "('credentials were not provided'); for MCP, run a server without --auth on 127.0.0.1."
        )
    return warnings


def configure_logging() -> None:
    """One stream, line-buffered, one line per record; called once at start-up."""
    sys.stdout.reconfigure(line_buffering=True)  # Gradio prints its URLs to stdout
    sys.stderr.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "httpcore", "urllib3"):  # a line per HTTP request of Gradio's own
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_initial_model(args: argparse.Namespace) -> None:
    manager = get_manager()
    manager.configure(
        fallback_model=args.fallback_model,
        vram_limit_bytes=args.vram_limit,
        margin_bytes=args.margin,
        context_tokens=args.context,
        lock_model=args.lock_model,
        models_dirs=args.models_dir,
    )
    if args.model:
        # user=False: the start-up choice is the operator's, so --lock-model does not refuse it.
        status = manager.load(args.model, args.quant, user=False)
    else:
        status = manager.load_default()
    logger.info("serving %s (%s) on %s", status["model"], status["quant"], status["device"])


# Gradio's own start-up lines, which app.py replaces with its own: "* Running on local URL", the
# hint "To create a public link, set `share=True`" (wrong for an app whose flag is --share), and
# its share-link messages (their first sentence becomes our reason).
_GRADIO_LINES = ("* Running on", "* To create a public link", "This share link is temporary")
_SHARE_FAILED = "Could not create share link."


def _share_reason(gradio_message: str) -> str:
    """Gradio's share-failure message (after "Could not create share link.") as a short reason."""
    first = gradio_message.split(". ")[0].strip().rstrip(".")
    if first.startswith("Missing file:"):
        program = first.removeprefix("Missing file:").strip()
        return f"Gradio's tunnel program {program} is missing and could not be downloaded"
    if first.startswith("Please check your internet connection"):
        return "the share server could not be reached"
    return first or "Gradio gave no reason"


def startup_lines(printed: str, local_url: str, share: bool, share_url: str | None) -> tuple[list[str], list[str]]:
    """(our start-up lines, what else Gradio printed during launch). `printed`: Gradio's output."""
    reason, in_failure, rest = "", False, []
    for line in printed.splitlines():
        text = line.strip()
        if text.startswith(_SHARE_FAILED):
            reason, in_failure = text.removeprefix(_SHARE_FAILED).strip(), True
        elif text.startswith("🔨"):  # the MCP server's lines come after the share attempt
            in_failure = False
        if text and not in_failure and not text.startswith(_GRADIO_LINES):
            rest.append(line)  # the failure's multi-line help is left out: its reason is in our line
    lines = [f"Steering Lab is serving at {local_url}"]
    if share and share_url:
        lines.append(f"public link (temporary): {share_url}")
    elif share:
        why = _share_reason(reason)
        lines.append(f"the share link could not be made: {why}, serving locally only (offline?)")
    return lines, rest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.simulate_gpu is not None:
        try:
            gpu.use_nvml(gpu.simulate_gpu(args.simulate_gpu, args.gui_overhead or 0))
        except ValueError as exc:
            logger.error("--simulate-gpu: %s", exc)
            return 2
    mcp_installed = importlib.util.find_spec("mcp") is not None  # the gradio[mcp] extra
    for warning in startup_warnings(args, mcp_installed=mcp_installed):
        logger.warning("%s", warning)

    _load_initial_model(args)
    from steering.ui import UIConfig, build_demo, serving  # imports gradio (and torch): after the flags are checked

    serving.quiet_tracebacks()

    demo = build_demo(UIConfig(lock_model=args.lock_model))
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        lifecycle.begin_shutdown()  # running generations end at their next step; waiting ones are refused
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    try:
        printed = io.StringIO()  # Gradio's start-up lines, replaced by ours below
        with contextlib.redirect_stdout(printed):
            demo.launch(
                server_name=args.host,
                server_port=args.port,
                share=args.share,
                auth=args.auth,
                prevent_thread_lock=True,
                quiet=True,
                mcp_server=args.mcp and mcp_installed,
                show_error=not args.share,  # exception texts only where no stranger can read them
                # with --auth nothing about the API before login; uploads and sessions bounded
                **serving.launch_kwargs(),
            )
        lines, rest = startup_lines(printed.getvalue(), demo.local_url, args.share, demo.share_url)
        for line in rest:
            print(line)
        for line in lines:
            (logger.warning if line.startswith("the share link") else logger.info)("%s", line)
        # Wake up regularly: the signal handler runs in this (main) thread between waits.
        while not stop.wait(0.5):
            pass
        logger.info("shutting down")
        # The model lock frees as soon as a running generation sees the shutdown flag (one decoding
        # step); its client is told "server shutting down" while the server still answers.
        get_manager().release()
        time.sleep(SHUTDOWN_GRACE_S)
    finally:
        demo.close()
        get_manager().release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
