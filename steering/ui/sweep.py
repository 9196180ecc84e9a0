"""The Sweep tab: one steering text at several coefficients, all rows of one batch; rows stream
in, then are scored, and Stop ends them. Refusals follow steering/ui/common.py (a notice and a
message line; the previous results stay); every finished (or stopped) sweep goes into the
session's history.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import gradio as gr

from steering import api, history, limits, vocab
from steering.ui import plots, views
from steering.ui.common import (
    MODEL,
    PRIVATE,
    PROMPT,
    UI_ONLY,
    end_run,
    gate,
    layer_slider,
    loaded_quant,
    notices,
    registry,
    session_of,
    slider,
    with_buttons,
)

logger = logging.getLogger(__name__)
sweeps = registry()  # each session's sweeps, from the click on: what Stop reaches


def begin_sweep(request: gr.Request = None) -> tuple:
    """Run disabled, Stop enabled, the message line set; outputs (buttons, info, run id). While
    this session's sweep is still on (the second click of a double-click) nothing is begun: an
    empty run id, and `gate` ends that chain."""
    session = session_of(request)
    current = sweeps.latest(session)
    if current is not None and not current.stop.is_set():
        return gr.skip(), gr.skip(), gr.skip(), ""
    run_id = sweeps.begin(session)
    return gr.Button(interactive=False), gr.Button(interactive=True), "Waiting for the model…", run_id


@notices(3, at=2)
def run_sweep(
    prompt,
    text,
    layer,
    coeffs_text,
    max_new_tokens,
    seed,
    positions="prompt",
    prompted=False,
    run_id=None,
    request: gr.Request = None,
):
    """One row per coefficient, streamed as the tokens arrive, then scored: outputs (table, plot,
    info). The table keeps the previous sweep until this one has its first text. With `prompted`
    the sweep also runs the prompted reference row (unsteered, asked in words): the table's last
    row, a dashed line on the plot, and the info line says which coefficients beat it."""
    session = session_of(request)
    run = sweeps.start(run_id, session)
    if run is None:  # stopped while it waited in the queue
        yield gr.skip(), gr.skip(), gr.skip()
        return
    stop = run.stop
    arguments = dict(
        prompt=prompt, text=text, layer=layer, coeffs=views.parse_coeffs(coeffs_text),
        max_new_tokens=max_new_tokens, seed=seed, positions=positions, prompted=bool(prompted),
    )  # fmt: skip
    result, started = None, time.perf_counter()
    stream = api.sweep_stream(stop=stop, **arguments)
    try:
        for result in stream:
            info = f"{result['model']} · layer {result['layer']} · positions {result['positions']}"
            if not result["done"]:
                tokens = f"{result.get('tokens', 0)} of {int(max_new_tokens)} tokens"
                yield views.sweep_table(result), gr.skip(), f"{info} · generating… ({tokens})"
                continue
            if result.get("stopped"):
                info += " · stopped: the texts so far, unscored"
            else:
                best = result.get("recommended")
                info += f" · recommended coefficient {best:g} (★)" if best is not None else " · no fluent row"
                info += views.sweep_prompted_line(result)
            notice = views.fallback_notice(result.get("fallback"))
            yield views.sweep_table(result), plots.sweep_svg(result), info + (f"  \n{notice}" if notice else "")
    finally:
        stop.set()
        stream.close()
        sweeps.end(run)
        logger.info("request sweep (page) %d rows %.2f s", len(arguments["coeffs"]), time.perf_counter() - started)
        if result is not None:
            stopped = bool(result.get("stopped")) or not result["done"]
            context = {"quant": loaded_quant(), **({"stopped": True} if stopped else {})}
            history.record(session, "sweep", arguments, result, context=context)


def stop_sweep(request: gr.Request = None) -> tuple:
    """Stop this session's sweep; outputs (info, run button, stop button)."""
    run = sweeps.latest(session_of(request))
    if run is not None:
        run.stop.set()
    return "Stopped.", *end_run()


sweep_run = with_buttons(run_sweep, sweeps, 3)  # the Sweep chain's step: outputs + run and stop buttons


# -- layout and wiring ------------------------------------------------------------------------------
def sweep_tab(n_layers: int) -> SimpleNamespace:
    with gr.Tab("Sweep"):
        gr.Markdown(
            "One steering text at several coefficients, all rows of one batch; ★ marks the most relevant "
            "fluent row. *What the columns mean* (under the table) says how each number is measured."
        )
        prompt = gr.Textbox(
            PROMPT, label="Prompt", lines=2, info="the same prompt as the Steer tab's", elem_id="sweep-prompt"
        )
        with gr.Row():
            text = gr.Textbox("dogs", label="Steering text", elem_id="sweep-text")
            layer = layer_slider(n_layers, "Layer")
            coeffs = gr.Textbox(
                "0, 0.5, 1, 1.5", label=f"Coefficients (up to {limits.MAX_SWEEP_ROWS})", elem_id="sweep-coeffs"
            )
            tokens = slider("sweep_max_new_tokens", "Max new tokens", elem_id="sweep-tokens")
            positions = gr.Radio(
                list(vocab.POSITIONS),
                value=vocab.DEFAULT_POSITIONS,
                label="Positions (see the Vectors table)",
                elem_id="sweep-positions",
            )
            prompted = gr.Checkbox(
                False,
                label="Prompted: also ask in words (an unsteered reference row, a dashed line on the plot)",
                elem_id="sweep-prompted",
            )
        with gr.Row():
            run_btn = gr.Button("Run sweep", variant="primary", elem_id="run-sweep")
            stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop-sweep")
        info = gr.Markdown("", elem_id="sweep-info", elem_classes=["field-message"])
        table = gr.Dataframe(
            headers=list(views.SWEEP_COLUMNS),
            column_widths=list(views.SWEEP_WIDTHS),
            type="array",
            interactive=False,
            wrap=True,
            elem_id="sweep-table",
            elem_classes=["scroll-table"],
        )
        plot = gr.HTML("", elem_id="sweep-plot")
        with gr.Accordion("What the columns mean", open=False, elem_id="sweep-help"):
            gr.Markdown(
                "**relevance**: how much more likely the unsteered model finds the steering text after the "
                "output than after the baseline's (nats/token). **fluent**: perplexity ≤ "
                f"{vocab.MAX_PERPLEXITY:g}, repetition (1 − distinct-2) ≤ {vocab.MAX_REPETITION:g} and at "
                f"least {vocab.MIN_TOKENS} tokens. Pick by relevance among fluent rows: **effect** keeps "
                "rising where the text has degenerated, so do not pick by it."
            )
    return SimpleNamespace(
        prompt=prompt,
        text=text,
        layer=layer,
        coeffs=coeffs,
        tokens=tokens,
        positions=positions,
        prompted=prompted,
        run_btn=run_btn,
        stop_btn=stop_btn,
        info=info,
        table=table,
        plot=plot,
    )


def share_prompt(steer_prompt: gr.Textbox, sweep_prompt: gr.Textbox) -> None:
    """One prompt in two boxes, copied both ways in the page itself (no server round trip that
    could bring back an older text while someone types). A copy of an equal text is no change, so
    the two never echo each other; a recipe that sets the Steer tab's prompt sets both."""
    same = "(text) => text"
    steer_prompt.change(None, steer_prompt, sweep_prompt, js=same, show_progress="hidden", **UI_ONLY)
    sweep_prompt.change(None, sweep_prompt, steer_prompt, js=same, show_progress="hidden", **UI_ONLY)


def wire_sweep(sweep, decoding) -> None:
    buttons = [sweep.run_btn, sweep.stop_btn]
    run_id = gr.State("")
    begun = sweep.run_btn.click(begin_sweep, None, [*buttons, sweep.info, run_id], show_progress="hidden", **UI_ONLY)
    begun.then(gate, run_id, None, show_progress="hidden", **UI_ONLY).success(
        sweep_run,
        [sweep.prompt, sweep.text, sweep.layer, sweep.coeffs, sweep.tokens, decoding.seed, sweep.positions]
        + [sweep.prompted, run_id],
        [sweep.table, sweep.plot, sweep.info, *buttons],
        show_progress="minimal",
        trigger_mode="multiple",  # see steer.wire_steer
        **PRIVATE,
        **MODEL,
    )
    sweep.stop_btn.click(stop_sweep, None, [sweep.info, *buttons], **UI_ONLY)
