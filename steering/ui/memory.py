"""The Memory tab: the card's reading and its processes, this machine's compatibility matrix (what
each model needs, as bars against the headroom) and the log of fallbacks. It fills itself when
opened and never waits behind a generation."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from steering import api
from steering.ui import views
from steering.ui.common import INFO, PRIVATE, notices, number_box


@notices(5, at=0)  # a refusal (a context out of range) shows where the card reading goes
def refresh_memory(context) -> tuple:
    """The card reading, processes, this machine's compatibility matrix and the fallback log."""
    status, plan = api.status(), api.plan(context)
    device = status["memory"]["device"]
    choice = plan["choice"]
    card = views.card_markdown(device) + "  \n" + views.choice_text(choice, device)
    note = views.cpu_note(plan, device)
    card += f"\n\n{note}" if note else ""
    margin = plan["margin_bytes"]
    bars = [
        (f"loaded: {row['id']} {row['quant']}", row)
        for row in plan["models"]
        if (row["id"], row["quant"]) == (status.get("model"), status.get("quant"))
    ] + [(f"{row['id'].rsplit('/', 1)[-1]} {row['quant']}", row) for row in plan["models"]]
    return (
        card,
        views.memory_bars_html(bars, plan["headroom_bytes"], margin),
        gr.update(value=views.process_rows(device), visible=device.get("mode") != "cpu"),  # no card, no processes
        views.plan_rows(plan, margin),
        views.event_rows(status["events"]),
    )


# -- layout and wiring ------------------------------------------------------------------------------
def memory_tab() -> SimpleNamespace:
    with gr.Tab("Memory", elem_id="memory-tab") as tab:
        with gr.Row():
            context = number_box("context", "Context tokens to plan for", elem_id="context")
            refresh_btn = gr.Button("Refresh")
        card = gr.Markdown("", elem_id="memory-card")
        bars = gr.HTML("", elem_id="memory-bars")
        gr.Markdown(views.VERDICTS_LEGEND)
        processes = gr.Dataframe(
            headers=["pid", "name", "memory", "kind", "desktop"],
            type="array",
            interactive=False,
            label="Processes on the card",
        )
        plan = gr.Dataframe(
            headers=list(views.PLAN_COLUMNS),
            type="array",
            interactive=False,
            label="Compatibility on this machine",
            elem_id="memory-plan",
            max_height=1200,  # every row visible: the plan is read as a whole
            wrap=True,  # a long "runs on" wraps inside the page instead of running off its right edge
        )
        events = gr.Dataframe(
            headers=["time", "stage", "asked", "loaded", "reason", "free before", "free after"],
            type="array",
            interactive=False,
            label="Fallback events",
            wrap=True,
        )
    return SimpleNamespace(
        tab=tab,
        context=context,
        refresh_btn=refresh_btn,
        card=card,
        bars=bars,
        processes=processes,
        plan=plan,
        events=events,
    )


def wire_memory(memory) -> None:
    memory_view = [memory.card, memory.bars, memory.processes, memory.plan, memory.events]
    memory.refresh_btn.click(refresh_memory, memory.context, memory_view, **PRIVATE, **INFO)
    memory.tab.select(refresh_memory, memory.context, memory_view, **PRIVATE, **INFO)  # fills itself on open
