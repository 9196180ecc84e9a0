"""The History tab: the session's results as a table, a JSONL download, and re-running one entry
with the same arguments (steering/history.py keeps them)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from steering import api, chat, files, history
from steering.ui import views
from steering.ui.common import MODEL, PRIVATE, UI_ONLY, notices, session_of

# What re-runs each kind of entry: the api function its `request` holds the arguments of.
RERUN = {"steer": api.steer, "sweep": api.sweep, "autotune": api.autotune, "chat": chat.chat}


def show_history(request: gr.Request = None) -> list[list]:
    """The session's history, newest first."""
    return history.table_rows(session_of(request))


@notices(2, at=1)
def download_history(request: gr.Request = None) -> tuple:
    """The session's history as a JSON Lines file; outputs (file, message)."""
    text = history.to_jsonl(session_of(request))
    if not text:
        raise gr.Error("history: nothing to download yet; every Generate, sweep and auto-tune adds an entry")
    path = files.app_file("history", ".jsonl")
    path.write_text(text, encoding="utf-8")
    return str(path), f"{text.count(chr(10))} entries."


@notices(3, at=2)
def rerun_entry(number, request: gr.Request = None) -> tuple:
    """Run entry `number` (1-based, as the table shows it) again with the same arguments; the new
    result is shown and added to the history. Outputs (table, result, message)."""
    session = session_of(request)
    try:
        entry = history.entry(session, number)
    except ValueError as exc:
        raise gr.Error(f"entry: {exc}") from None
    run = RERUN.get(entry["kind"])
    if run is None:
        raise gr.Error(f"entry: a {entry['kind']} entry cannot be re-run")
    result = run(**entry["request"])
    result.pop("done", None)
    added = history.record(session, entry["kind"], entry["request"], result, context={"rerun_of": int(number)})
    same = _same_output(entry, added)
    note = f"Re-ran entry {int(number)} as entry {len(history.entries(session))}"
    note += "; the output is the same." if same else "; the output differs (model, version or sampling changed)."
    return history.table_rows(session), result, note


def rerun_shown(number, request: gr.Request = None) -> tuple:
    """`rerun_entry` as the tab shows it: the texts in boxes (steered, baseline, prompted when
    there is one; a sweep's rows; an auto-tune's choice), the whole answer folded away below.
    Outputs (table, first box, baseline box, prompted box, answer, message); a refusal changes
    nothing but the message."""
    table, result, message = rerun_entry(number, request)
    if not isinstance(result, dict):
        return table, gr.skip(), gr.skip(), gr.skip(), gr.skip(), message
    label, first, baseline, prompted = views.rerun_texts(result)
    return (
        table,
        gr.update(value=first, label=label),
        gr.update(value=baseline, visible="steered" in result),
        gr.update(value=prompted or "", visible=prompted is not None),
        result,
        message,
    )


def _same_output(old: dict, new: dict) -> bool:
    keys = ("steered", "baseline", "prompted", "rows", "layer", "coeff")
    return all(old["result"].get(k) == new["result"].get(k) for k in keys)


# -- layout and wiring ------------------------------------------------------------------------------
def history_tab() -> SimpleNamespace:
    with gr.Tab("History", elem_id="history-tab") as tab:
        gr.Markdown(
            "Every Generate, sweep and auto-tune of this browser session (the newest "
            f"{history.MAX_ENTRIES}), with model, quantization, capture mode, seed, vectors and versions."
        )
        table = gr.Dataframe(
            headers=list(history.HISTORY_COLUMNS),
            column_widths=["48px", "104px", "80px", "200px", "64px", "96px", "64px", "160px", "220px", "320px"],
            type="array",
            interactive=False,
            wrap=True,
            elem_id="history-table",
            elem_classes=["scroll-table"],
        )
        with gr.Row():
            number = gr.Number(None, precision=0, label="Entry # to re-run", elem_id="history-number")
            rerun_btn = gr.Button("Re-run", elem_id="history-rerun")
            download_btn = gr.Button("Download JSONL", elem_id="history-download")
        message = gr.Markdown("", elem_id="history-message", elem_classes=["field-message"])
        file = gr.File(label="History (JSON Lines)", interactive=False)
        with gr.Row():
            steered = gr.Textbox(label="Steered", lines=6, interactive=False, elem_id="history-steered")
            baseline = gr.Textbox(label="Baseline (unsteered)", lines=6, interactive=False, elem_id="history-baseline")
            prompted = gr.Textbox(
                label="Prompted", lines=6, interactive=False, visible=False, elem_id="history-prompted"
            )
        with gr.Accordion("The whole answer (JSON)", open=False, elem_id="history-answer"):
            result = gr.JSON(label="Re-run result")
    return SimpleNamespace(
        tab=tab, table=table, number=number, rerun_btn=rerun_btn, download_btn=download_btn, message=message,
        file=file, steered=steered, baseline=baseline, prompted=prompted, result=result,
    )  # fmt: skip


def wire_history(past) -> None:
    past.tab.select(show_history, None, past.table, **UI_ONLY)
    past.download_btn.click(download_history, None, [past.file, past.message], **UI_ONLY)
    shown = [past.table, past.steered, past.baseline, past.prompted, past.result, past.message]
    past.rerun_btn.click(rerun_shown, past.number, shown, **PRIVATE, **MODEL)
