"""The Chat tab: a steered and an unsteered conversation that continue side by side.

`chat_tab()` lays the tab out; `wire_chat(...)` connects it. The vectors are the Steer tab's (its
table, layer slider and imported directions, read when a message is sent) and so are the
decoding settings and the capture mode, so a chat steers exactly as Generate does. Each
conversation's history is a `gr.State` of plain {"role", "content"} messages that its
`gr.Chatbot` shows; the model work is `steering/chat.py`.

Send (or Enter) is a chain like Generate's: `begin_turn` (no queue: Send disabled, Stop
enabled) -> `send_message` (the model queue; both replies stream) -> `end_turn`. Stop sets this
session's stop flag and cancels the event: a turn still queued never starts, a running one ends
within a decoding step (or a layer of its prefill) and keeps the replies it had. A refusal is a
notice and a message line under the box; the conversations stay as they were.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import gradio as gr

from steering import chat, history, limits, views
from steering.errors import SteeringError
from steering.ui_steer import bounded_rows, gate, notices, refused, session_of

# As in steering/ui.py: every handler that runs the model shares one concurrency id, limit 1.
MODEL = {"concurrency_id": "model", "concurrency_limit": 1}
UI_ONLY = {"concurrency_limit": None, "api_visibility": "private"}  # no model, no waiting
PRIVATE = {"api_visibility": "private"}

_stops: dict[str | None, threading.Event] = {}  # the running turn of each session: what Stop sets
_stops_lock = threading.Lock()


# -- handlers ----------------------------------------------------------------------------------
def begin_turn(message) -> tuple:
    """Before a turn: Send disabled, Stop enabled. Outputs (send button, stop button, message
    line, go): an empty message is refused here, and `go` False skips the turn."""
    if not isinstance(message, str) or not message.strip():
        return *refused("message: type a message first", 3, at=2), False
    return gr.Button(interactive=False), gr.Button(interactive=True), "", True


def end_turn() -> tuple:
    """Send enabled again, Stop disabled."""
    return gr.Button(interactive=True), gr.Button(interactive=False)


@notices(7, at=6)
def send_message(
    message,
    history_steered,
    history_baseline,
    rows,
    layer,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    capture_mode,
    directions=None,
    request: gr.Request = None,
):
    """Stream one turn of both conversations. Outputs (steered chat, baseline chat, steered
    history, baseline history, message box, run line, message line); the message box empties
    once the turn runs. Each finished or stopped turn is kept in the session's history."""
    session, stop = session_of(request), threading.Event()
    with _stops_lock:
        _stops[session] = stop
    rows = bounded_rows(rows)
    arguments = dict(
        message=message, history_steered=history_steered, history_baseline=history_baseline,
        vectors=views.rows_to_vectors(rows, limits.check_layer(layer, "layer", None), directions),
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, capture_mode=capture_mode,
    )  # fmt: skip
    started, result = time.perf_counter(), None
    stream = chat.chat_stream(stop=stop, **arguments)
    try:
        for result in _counted_for_people(stream, views.table_row_numbers(rows)):
            done = result["done"]
            elapsed = time.perf_counter() - started if done else 0
            line = views.run_line(result, elapsed_s=elapsed, seed=seed, running=not done, stopped=stop.is_set())
            notice = views.fallback_notice(result.get("fallback"))
            steered, baseline = result["history_steered"], result["history_baseline"]
            yield steered, baseline, steered, baseline, "", line + (f"  \n{notice}" if notice else ""), ""
    finally:
        stopped = not (result or {}).get("done") or stop.is_set()
        stop.set()
        stream.close()
        with _stops_lock:
            if _stops.get(session) is stop:
                del _stops[session]
        if result is not None:
            history.record(session, "chat", arguments, result, context={"stopped": True} if stopped else None)


def _counted_for_people(stream, row_numbers):
    """`stream` with its refusals naming table rows as the table counts them (from 1)."""
    try:
        yield from stream
    except SteeringError as exc:
        raise gr.Error(views.for_people(str(exc), row_numbers)) from None


def stop_turn(request: gr.Request = None) -> tuple:
    """Stop this session's turn, wherever it is. Outputs (send button, stop button)."""
    with _stops_lock:
        stop = _stops.get(session_of(request))
    if stop is not None:
        stop.set()
    return end_turn()


def clear_chat(request: gr.Request = None) -> tuple:
    """Stop any turn and start both conversations afresh. Outputs (steered chat, baseline chat,
    steered history, baseline history, run line, message line, send button, stop button)."""
    return [], [], [], [], "", "", *stop_turn(request)


# -- layout and wiring -------------------------------------------------------------------------
def chat_tab() -> SimpleNamespace:
    """The Chat tab's components (call inside `gr.Tabs()`)."""
    with gr.Tab("Chat", elem_id="chat-tab"):
        gr.Markdown(
            "Two conversations continue side by side with every message you send: one steered by the "
            "**Steer** tab's vectors (and its decoding settings), one unsteered. Each keeps its own "
            "replies; **Clear** starts both afresh."
        )
        with gr.Row():
            steered = gr.Chatbot(label="Steered", elem_id="chat-steered", height=420)
            baseline = gr.Chatbot(label="Baseline (unsteered)", elem_id="chat-baseline", height=420)
        run_info = gr.Markdown("", elem_id="chat-run-info")
        message = gr.Textbox(
            label="Message (Enter sends)", placeholder="Say something…", lines=1, max_lines=6, elem_id="chat-message"
        )
        message_line = gr.Markdown("", elem_id="chat-message-line", elem_classes=["field-message"])
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary", elem_id="chat-send")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="chat-stop", interactive=False)
            clear_btn = gr.Button("Clear", elem_id="chat-clear")
        steered_history, baseline_history = gr.State([]), gr.State([])  # what the two chats show
    return SimpleNamespace(
        steered=steered,
        baseline=baseline,
        steered_history=steered_history,
        baseline_history=baseline_history,
        run_info=run_info,
        message=message,
        message_line=message_line,
        send_btn=send_btn,
        stop_btn=stop_btn,
        clear_btn=clear_btn,
    )


def wire_chat(tab: SimpleNamespace, form: SimpleNamespace, decoding: SimpleNamespace) -> None:
    """Send / Enter -> one turn, Stop, Clear. `form` and `decoding` are the Steer tab's vector
    form (table, layer slider, imported directions) and decoding panel."""
    buttons = [tab.send_btn, tab.stop_btn]
    go = gr.State(False)
    begun = gr.on(
        [tab.send_btn.click, tab.message.submit],
        begin_turn,
        tab.message,
        [*buttons, tab.message_line, go],
        show_progress="hidden",
        **UI_ONLY,
    )
    settings = [decoding.max_tokens, decoding.temperature, decoding.top_p, decoding.seed, decoding.capture]
    histories = [tab.steered_history, tab.baseline_history]
    turn = begun.then(gate, go, None, show_progress="hidden", **UI_ONLY).success(
        send_message,
        [tab.message, *histories, form.table, form.layer, *settings, form.directions],
        [tab.steered, tab.baseline, *histories, tab.message, tab.run_info, tab.message_line],
        show_progress="minimal",
        **PRIVATE,
        **MODEL,
    )
    turn.then(end_turn, None, buttons, show_progress="hidden", **UI_ONLY)
    tab.stop_btn.click(stop_turn, None, buttons, cancels=[turn], **UI_ONLY)
    gr.on(  # Clear, or either chat's own trash button: both conversations start afresh
        [tab.clear_btn.click, tab.steered.clear, tab.baseline.clear],
        clear_chat,
        None,
        [tab.steered, tab.baseline, *histories, tab.run_info, tab.message_line, *buttons],
        cancels=[turn],
        **UI_ONLY,
    )
