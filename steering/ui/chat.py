"""The Chat tab: a steered and an unsteered conversation that continue side by side.

`chat_tab()` lays the tab out; `wire_chat(...)` connects it. The vectors are the Steer tab's (its
table, layer slider and imported directions, read when a message is sent) and so are the
decoding settings and the capture mode, so a chat steers exactly as Generate does. Each
conversation's history is a `gr.State` of plain {"role", "content"} messages that its
`gr.Chatbot` shows; the model work is `steering/chat.py`.

Send (or Enter) is a chain like Generate's (steering/ui/steer.py; `Runs` in steering/ui/common.py):
`begin_turn` (no queue: the turn is registered, Send disabled, Stop enabled) -> `send_turn` (the
model queue; both replies stream; Send and Stop are restored at its end). Stop sets the turn's flag wherever it is,
without Gradio's `cancels` (which could leave the model's queue slot taken, measured on Generate):
a turn still queued starts and ends at once without touching the model, a running one ends within
a decoding step (or a layer of its prefill) and keeps the replies it had. A refusal is a notice
and a message line under the box; the conversations stay as they were.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr

from steering import chat, history, limits
from steering.ui import views
from steering.ui.common import (
    MODEL,
    PRIVATE,
    UI_ONLY,
    bounded_rows,
    end_run,
    gate,
    notices,
    people_errors,
    refused,
    registry,
    session_of,
    with_buttons,
)

turns = registry()  # each session's turns, from the Send click on: what Stop reaches


# -- handlers ----------------------------------------------------------------------------------
def begin_turn(message, request: gr.Request = None) -> tuple:
    """Before a turn: it is registered, Send disabled, Stop enabled. Outputs (send button, stop
    button, message line, run id): an empty message is refused here, and an empty run id skips the turn."""
    if not isinstance(message, str) or not message.strip():
        return *refused("message: type a message first", 3, at=2), ""
    return gr.Button(interactive=False), gr.Button(interactive=True), "", turns.begin(session_of(request))


end_turn = end_run  # Send enabled again, Stop disabled


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
    run_id: str | None = None,
    request: gr.Request = None,
):
    """Stream one turn of both conversations. Outputs (steered chat, baseline chat, steered
    history, baseline history, message box, run line, message line); the message box empties
    once the turn runs. Each finished or stopped turn is kept in the session's history."""
    session = session_of(request)
    run = turns.start(run_id, session)
    if run is None:  # stopped while it waited in the queue: nothing to do
        yield (gr.skip(),) * 7
        return
    stop = run.stop
    rows = bounded_rows(rows)
    arguments = dict(
        message=message, history_steered=history_steered, history_baseline=history_baseline,
        vectors=views.rows_to_vectors(rows, limits.check_layer(layer, "layer", None), directions),
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, capture_mode=capture_mode,
    )  # fmt: skip
    started, result = time.perf_counter(), None
    stream = chat.chat_stream(stop=stop, **arguments)
    try:
        for result in people_errors(stream, views.table_row_numbers(rows)):
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
        turns.end(run)
        if result is not None:
            history.record(session, "chat", arguments, result, context={"stopped": True} if stopped else None)


def stop_turn(request: gr.Request = None) -> tuple:
    """Stop this session's turn, wherever it is. Outputs (send button, stop button)."""
    run = turns.latest(session_of(request))
    if run is not None:
        run.stop.set()
    return end_turn()


send_turn = with_buttons(send_message, turns, 7)  # the Send chain's step: outputs + Send and Stop


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
    run_id = gr.State("")
    begun = gr.on(
        [tab.send_btn.click, tab.message.submit],
        begin_turn,
        tab.message,
        [*buttons, tab.message_line, run_id],
        show_progress="hidden",
        **UI_ONLY,
    )
    settings = [decoding.max_tokens, decoding.temperature, decoding.top_p, decoding.seed, decoding.capture]
    histories = [tab.steered_history, tab.baseline_history]
    # trigger_mode "multiple": a turn sent while a stopped one is still ending waits its turn
    # instead of being dropped (Gradio drops a second trigger of a pending event by default).
    begun.then(gate, run_id, None, show_progress="hidden", **UI_ONLY).success(
        send_turn,
        [tab.message, *histories, form.table, form.layer, *settings, form.directions, run_id],
        [tab.steered, tab.baseline, *histories, tab.message, tab.run_info, tab.message_line, *buttons],
        show_progress="minimal",
        trigger_mode="multiple",
        **PRIVATE,
        **MODEL,
    )
    tab.stop_btn.click(stop_turn, None, buttons, **UI_ONLY)  # no cancels: see the module docstring
    gr.on(  # Clear, or either chat's own trash button: both conversations start afresh
        [tab.clear_btn.click, tab.steered.clear, tab.baseline.clear],
        clear_chat,
        None,
        [tab.steered, tab.baseline, *histories, tab.run_info, tab.message_line, *buttons],
        **UI_ONLY,
    )
