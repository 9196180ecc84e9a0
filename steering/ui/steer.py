"""The Steer tab: the vector form, the vectors table (with its files), the decoding settings,
and Generate -> Stop with steered and baseline output side by side.

Generate is a chain: `begin_run` (instant, no queue: adds a typed-but-unadded vector, disables
Generate, enables Stop) -> `gate` -> `generate_run` (the model queue) -> its buttons back. Stop
sets this run's stop flag (a run in its prefill ends within one layer, a run still queued ends
as soon as it starts, without the model) and writes "stopped after N tokens". Refusals follow
steering/ui/common.py: a notice and the message line, previous results kept.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import gradio as gr

from steering import api, history, limits, vector_io, vocab
from steering.errors import SteeringError
from steering.ui import views
from steering.ui.common import (
    MODEL,
    PRIVATE,
    PROMPT,
    UI_ONLY,
    bounded_rows,
    end_run,
    gate,
    inline,
    layer_slider,
    message_of,
    n_layers_now,
    named_upload,
    notices,
    number_box,
    people_errors,
    refused,
    registry,
    session_of,
    slider,
    user_errors,
    with_buttons,
    with_file_name,
)

logger = logging.getLogger(__name__)
runs = registry()  # each session's Generate runs, from the click on: what Stop reaches


# -- the vectors table ---------------------------------------------------------------------------
def _kept(rows) -> list[list]:
    """The rows that hold a vector."""
    return [r for r in bounded_rows(rows) if views.rows_to_vectors([r], 0)]


def _form_row(rows, text, positive, negative, coeff, layer) -> list[list] | None:
    """The table with the form's vector appended (None when the form is empty)."""
    vector = views.form_vector(text, positive, negative, coeff, layer, n_layers_now())
    if vector is None:
        return None
    kept = _kept(rows)
    if len(kept) >= limits.MAX_VECTORS:
        raise gr.Error(f"vectors: at most {limits.MAX_VECTORS} vectors")
    return kept + [views.vector_row(vector)]


@notices(5, at=4)
def add_vector_row(rows: list, text: str, positive: str, negative: str, coeff: float, layer: int) -> tuple:
    """Append the form's vector to the table and clear the form's texts; outputs
    (table, text, positive, negative, message)."""
    table = _form_row(rows, text, positive, negative, coeff, layer)
    if table is None:
        raise gr.Error("text: type a steering text (or a positive and a negative text) first")
    return table, "", "", "", ""


@notices(2, at=1)
def remove_vector_row(rows: list, row_number: float | None) -> tuple:
    """Remove row `row_number` (1-based); 0 or empty removes the last row. Outputs (table, message)."""
    kept = _kept(rows)
    if not kept:
        return [], ""
    number = 0 if row_number in (None, "") else limits.check_finite(row_number, "row")
    index = len(kept) - 1 if not number else int(number) - 1
    if not 0 <= index < len(kept) or number != int(number):
        raise gr.Error(f"row: give a row number from 1 to {len(kept)} (0 removes the last)")
    del kept[index]
    return kept, ""


def clear_vector_rows() -> tuple:
    """Empty the vectors table (and its message line)."""
    return [], ""


@notices(2, at=1)
def check_table(rows: list, layer: int, message: str = "") -> tuple:
    """After the table changes: new rows get working defaults, bad cells are reset and said so
    (rows counted from 1). Outputs (table or unchanged, message line); the message line is only
    cleared when it showed the table's own earlier problems (other messages stay)."""
    rows = bounded_rows(rows)
    fixed, problems = views.normalize_rows(rows, limits.check_layer(layer, "layer", None), n_layers_now())
    table = fixed if fixed != rows else gr.skip()
    if problems:
        gr.Warning("; ".join(problems))
        return table, inline("; ".join(problems))
    was_ours = isinstance(message, str) and message.startswith(inline("row "))
    return table, "" if was_ours else gr.skip()


def check_edit(rows: list, layer: int, message: str = "", last: dict | None = None) -> tuple:
    """`check_table` for the table's `.change`: outputs (table, message line, last). `last` holds
    the rows of the previous check and the table it wrote back; the `.change` that writing it
    back fires (and a repeat of the same edit, as Enter sends) is ignored, so the sentence that
    said what was reset stays and its notice shows once."""
    try:
        seen = bounded_rows(rows)
    except gr.Error as exc:
        return (*refused(message_of(exc), 2, at=1), None)
    last = last if isinstance(last, dict) else {}
    if seen and seen in (last.get("rows"), last.get("wrote")):
        # the echo of our own reset (then forgotten, so the same bad edit typed again is checked)
        return gr.skip(), gr.skip(), (last if seen == last.get("rows") else None)
    table, line = check_table(rows, layer, message)
    if isinstance(table, list):
        return table, line, {"rows": seen, "wrote": table}
    return table, line, None


# -- Generate and Stop ---------------------------------------------------------------------------
def begin_run(rows, text, positive, negative, coeff, layer, request: gr.Request = None) -> tuple:
    """Before a run: a vector typed into the form but not added is added now (and said so), then
    Generate is disabled and Stop enabled. Outputs (table, text, positive, negative, message,
    generate button, stop button, run line, run id): an empty run id (a refusal) leaves
    everything and skips the run."""
    try:
        table = _form_row(rows, text, positive, negative, coeff, layer)
    except (SteeringError, gr.Error) as exc:
        return refused(message_of(exc), 9, at=4)[:8] + ("",)
    run_id = runs.begin(session_of(request))
    busy = (gr.Button(interactive=False), gr.Button(interactive=True), "Waiting for the model…")
    if table is None:
        return (gr.skip(),) * 4 + ("", *busy, run_id)
    added = table[-1]
    note = f"Added the typed vector to the table (row {len(table)}, coefficient {added[3]:g}, layer {added[4]})."
    return (table, "", "", "", note, *busy, run_id)  # said on the message line: no toast over the outputs


@notices(8, at=2)
def generate_outputs(
    prompt,
    rows,
    layer,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    capture_mode,
    raw_prompt,
    directions=None,
    run_id: str | None = None,
    request: gr.Request = None,
    prompted=False,
):
    """Stream steered and baseline text side by side (both rows of one batch); outputs
    (steered, baseline, run line, prompted, the three rows' score badges, the best-row line).
    With `prompted` the prompted row is a third row of the batch. Stop (or a closed page) sets
    the stop flag: generation ends within one decoding step, or one layer of the prefill, and the
    model lock is released."""
    session = session_of(request)
    run = runs.start(run_id, session)
    if run is None:  # stopped while it waited in the queue: Stop has said so already
        yield (gr.skip(),) * 8
        return
    rows = bounded_rows(rows)
    vectors = views.rows_to_vectors(rows, int(layer), directions)
    arguments = dict(
        prompt=prompt, vectors=vectors, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, capture_mode=capture_mode, raw_prompt=bool(raw_prompt), prompted=bool(prompted),
    )  # fmt: skip
    started = time.perf_counter()
    stream = api.steer_stream(stop=run.stop, compare=True, **arguments)
    try:
        for run.result in people_errors(stream, views.table_row_numbers(rows)):
            stopped = run.stop.is_set()  # Stop has written "stopped after": no "generating…" after it
            line = views.run_line(run.result, elapsed_s=0, seed=seed, running=not (run.result["done"] or stopped))
            if run.result["done"] or stopped:
                line = views.run_line(run.result, elapsed_s=time.perf_counter() - started, seed=seed, stopped=stopped)
                if hint := views.strength_hint(rows, int(layer), run.result):
                    line += f"  \n⚠️ {hint}"
            notice = views.fallback_notice(run.result.get("fallback"))
            if not runs.is_latest(run_id, session):  # a newer run was begun: its line shows
                line, notice = gr.skip(), ""
            line = line if not notice else line + f"  \n{notice}"
            badges = views.steer_scores(run.result)
            yield run.result["steered"], run.result["baseline"], line, run.result["prompted"], *badges
    finally:
        stopped = not (run.result or {}).get("done") or run.stop.is_set()
        run.stop.set()
        stream.close()
        runs.end(run)
        logger.info(
            "request generate (page) %s %.2f s", "stopped" if stopped else "done", time.perf_counter() - started
        )  # one line per request, never the prompt
        if run.result is not None:
            context = {"stopped": True} if stopped else None
            history.record(session, "steer", arguments, run.result, context=context)


def stop_run(request: gr.Request = None) -> tuple:
    """Stop this session's run, wherever it is; outputs (run line, generate button, stop button)."""
    run = runs.latest(session_of(request))
    line = None
    if run is not None:
        run.stop.set()
        result = run.result
        line = views.run_line(result, elapsed_s=0, seed=0, stopped=True) if result else None
    return line or "Stopped before the model started (no tokens generated).", *end_run()


generate_run = with_buttons(generate_outputs, runs, 8)  # the Generate chain's step: outputs + the two buttons


# -- handlers: vector files --------------------------------------------------------------------
@user_errors
def export_table(rows, layer, fmt, capture_mode, directions) -> str:
    """The table's vectors as a GGUF / safetensors file for download."""
    return api.export_vectors(views.rows_to_vectors(rows, int(layer), directions), fmt, capture_mode)["path"]


@notices(2, at=1)
def export_table_shown(rows, layer, fmt, capture_mode, directions) -> tuple:
    """`export_table` for the button: outputs (file, the files' message line); a refusal is a
    notice and that message, the previous file stays."""
    return export_table(rows, layer, fmt, capture_mode, directions), ""


@notices(3, at=2)  # a refused file: a notice and the import line; the table stays
def import_into_table(file_path, rows, directions, layer) -> tuple:
    """Append the vectors of an uploaded control vector file to the table (editable rows); a
    refusal names the file."""
    name = named_upload(file_path, (".gguf", ".safetensors"), "import")
    try:
        result = api.import_vectors(file_path)  # the reader names the format ("not a readable GGUF ...")
    except SteeringError as exc:
        raise with_file_name(name, gr.Error(str(exc))) from None
    table, directions, added = append_vectors(rows, directions, result["vectors"], int(layer))
    meta = result["metadata"]
    source = "a Steering Lab file" if meta["ours"] else f"a foreign control vector (model hint {meta['model_hint']})"
    note = f"Imported {len(added)} vector(s) from {source}." + (f" ⚠️ {meta['warning']}" if meta.get("warning") else "")
    return table, directions, note


def append_vectors(rows, directions, vectors: list[dict], layer: int) -> tuple[list[list], dict, list[list]]:
    """The table's rows that hold a vector plus `vectors` as new rows (raw directions into a copy
    of the direction store), refused beyond the vector limit: (table, directions, added rows)."""
    directions = dict(directions or {})
    kept = [r for r in bounded_rows(rows) if views.rows_to_vectors([r], 0, directions)]
    added = views.vectors_to_rows(vectors, layer, directions)
    limits.check_count("vectors", kept + added, "vectors")
    return kept + added, directions, added


# -- layout ---------------------------------------------------------------------------------------
def vector_form(n_layers: int) -> SimpleNamespace:
    """The prompt, the new-vector form (text and strength side by side, or a pair), its layer,
    Generate and Stop, Add vector and Auto-tune."""
    prompt = gr.Textbox(PROMPT, label="Prompt", lines=2, elem_id="prompt-box")
    with gr.Row(equal_height=True):
        text = gr.Textbox(label="Steering text", placeholder="dogs", elem_id="new-text", min_width=160)
        coeff = slider("coeff", "Strength (× RMS)", elem_id="new-coeff", min_width=160)
    with gr.Row():
        positive = gr.Textbox(label="…or positive", placeholder="happy", elem_id="new-positive", min_width=120)
        negative = gr.Textbox(label="…minus negative", placeholder="sad", elem_id="new-negative", min_width=120)
    layer = layer_slider(n_layers, "Layer (for new vectors and the heatmap)")
    with gr.Row():
        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", min_width=100)
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False, min_width=100)
    with gr.Row():
        add_btn = gr.Button("Add vector", elem_id="add-vector", size="sm", min_width=100)
        autotune_btn = gr.Button("Auto-tune", elem_id="autotune", size="sm", min_width=100)
        autotune_stop = gr.Button(
            "Stop auto-tune", variant="stop", visible=False, elem_id="stop-autotune", size="sm", min_width=100
        )
    message = gr.Markdown("", elem_id="vector-message", elem_classes=["field-message"])
    with gr.Accordion("Auto-tune: the search", open=False, elem_id="autotune-result"):
        autotune_picture = gr.HTML(
            "<p>Auto-tune searches layers × coefficients for the typed vector on the prompt "
            "and fills the layer and coefficient above.</p>",
            elem_id="autotune-picture",
        )
    return SimpleNamespace(
        prompt=prompt,
        generate_btn=generate_btn,
        stop_btn=stop_btn,
        layer=layer,
        text=text,
        positive=positive,
        negative=negative,
        coeff=coeff,
        add_btn=add_btn,
        autotune_btn=autotune_btn,
        autotune_stop=autotune_stop,
        autotune_picture=autotune_picture,
        message=message,
    )


def vector_table() -> SimpleNamespace:
    """The vectors table (it scrolls within itself on a phone), its row buttons and vector files."""
    table = gr.Dataframe(
        value=[],
        headers=list(views.VECTOR_COLUMNS),
        datatype=["str", "str", "str", "number", "number", "bool", "str"],
        type="array",
        column_count=(len(views.VECTOR_COLUMNS), "fixed"),  # rows may be added, columns not (common.PAGE_HEAD)
        interactive=True,
        label="Vectors",
        elem_id="vectors-table",
        elem_classes=["scroll-table"],
    )
    gr.Markdown(
        "`positions`: **prompt** (the default) steers the prompt only, as ActAdd does; **all** also every "
        "generated token, as llm-steer does (about half the strength: 0.45 for 1).",
        elem_id="positions-help",
    )
    with gr.Row():
        remove_number = gr.Number(
            0, precision=0, label="Row to remove (1 = first row, 0 = the last)", elem_id="remove-number"
        )
        remove_btn = gr.Button("Remove row", elem_id="remove-row")
        clear_btn = gr.Button("Clear", elem_id="clear-rows")
    with gr.Accordion("Export / import (llama.cpp control vectors)", open=False, elem_id="vector-files"):
        with gr.Row():
            export_format = gr.Radio(list(vector_io.FORMATS), value="gguf", label="Format", scale=2)
            export_btn = gr.Button("Export table", elem_id="export-vectors", scale=1)
            import_btn = gr.UploadButton(
                "Import file (.gguf, .safetensors)", type="filepath", elem_id="import-vectors", scale=1
            )
        export_file = gr.File(label="Exported vectors", interactive=False)
        import_info = gr.Markdown("", elem_id="import-info")
    directions = gr.State({})  # imported raw directions, keyed by the label their row shows
    return SimpleNamespace(
        export_format=export_format,
        export_btn=export_btn,
        import_btn=import_btn,
        export_file=export_file,
        import_info=import_info,
        directions=directions,
        table=table,
        remove_number=remove_number,
        remove_btn=remove_btn,
        clear_btn=clear_btn,
    )


def decoding_panel() -> SimpleNamespace:
    with gr.Accordion("Decoding", open=False, elem_id="decoding"):
        max_tokens = slider("max_new_tokens", "Max new tokens", elem_id="max-tokens")
        temperature = slider("temperature", "Temperature (0 = greedy)")
        top_p = slider("top_p", "Top-p")
        seed = number_box("seed", "Seed", elem_id="seed")
        capture = gr.Radio(
            list(vocab.CAPTURE_MODES),
            value=vocab.DEFAULT_CAPTURE_MODE,
            label="Capture mode (stock: comparison only — llm-steer's own capture, "
            "which does not carry the text's meaning)",
            elem_id="capture-mode",
        )
        raw_prompt = gr.Checkbox(False, label="Raw prompt (skip the chat template)", elem_id="raw-prompt")
    return SimpleNamespace(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, capture=capture, raw_prompt=raw_prompt
    )


def steer_tab(n_layers: int) -> SimpleNamespace:
    """Three columns: the prompt, the form and Generate; the outputs; the table and settings. A
    wide screen shows them as form | outputs over table | outputs, the outputs the larger column
    and kept in view while the left one scrolls (CSS grid, see app.py's `LAYOUT_CSS`); a phone
    stacks them in that order, so the outputs come right after the controls that produce them."""
    with gr.Tab("Steer"), gr.Row(elem_id="steer-layout"):
        with gr.Column(scale=1, elem_id="steer-form"):
            new_vector = vector_form(n_layers)
        with gr.Column(scale=1, elem_id="steer-outputs"):
            prompted = gr.Checkbox(
                False,
                label="Prompted: also ask in words (a third, unsteered row; scores every row)",
                elem_id="prompted",
            )
            with gr.Row():
                with gr.Column(min_width=160):
                    steered = gr.Textbox(label="Steered", lines=14, interactive=False, elem_id="steered-output")
                    steered_scores = gr.HTML("", elem_id="steered-scores", padding=False)
                with gr.Column(min_width=160):
                    baseline = gr.Textbox(
                        label="Baseline (unsteered)", lines=14, interactive=False, elem_id="baseline-output"
                    )
                    baseline_scores = gr.HTML("", elem_id="baseline-scores", padding=False)
                with gr.Column(min_width=160, visible=False, elem_id="prompted-column") as prompted_column:
                    prompted_out = gr.Textbox(
                        label="Prompted (unsteered, asked in words)", lines=14, interactive=False,
                        elem_id="prompted-output",
                    )  # fmt: skip
                    prompted_scores = gr.HTML("", elem_id="prompted-scores", padding=False)
            best = gr.Markdown("", elem_id="best-row")
            run_info = gr.Markdown("", elem_id="run-info")
        with gr.Column(scale=1, elem_id="steer-table"):
            rows = vector_table()
            decoding = decoding_panel()
    form = SimpleNamespace(**vars(new_vector), **vars(rows))
    return SimpleNamespace(
        form=form,
        decoding=decoding,
        prompt=new_vector.prompt,
        generate_btn=new_vector.generate_btn,
        stop_btn=new_vector.stop_btn,
        steered=steered,
        baseline=baseline,
        run_info=run_info,
        prompted=prompted,
        prompted_column=prompted_column,
        prompted_out=prompted_out,
        scores=[steered_scores, baseline_scores, prompted_scores, best],
    )


# -- wiring ---------------------------------------------------------------------------------------
def wire_steer(prompt: gr.Textbox, steer) -> None:
    """The vector form, the table's own edits and files, and the Generate -> Stop chain."""
    form, decoding = steer.form, steer.decoding
    typed = [form.text, form.positive, form.negative]
    form.add_btn.click(
        add_vector_row,
        [form.table, *typed, form.coeff, form.layer],
        [form.table, *typed, form.message],
        **UI_ONLY,
    )
    form.remove_btn.click(remove_vector_row, [form.table, form.remove_number], [form.table, form.message], **UI_ONLY)
    form.clear_btn.click(clear_vector_rows, None, [form.table, form.message], **UI_ONLY)
    last_check = gr.State(None)  # what `check_edit` saw and wrote back: its own echo is ignored
    form.table.change(
        check_edit,
        [form.table, form.layer, form.message, last_check],
        [form.table, form.message, last_check],
        show_progress="hidden",
        **UI_ONLY,
    )
    form.export_btn.click(
        export_table_shown,
        [form.table, form.layer, form.export_format, decoding.capture, form.directions],
        [form.export_file, form.import_info],
        **PRIVATE,
        **MODEL,
    )
    form.import_btn.upload(
        import_into_table,
        [form.import_btn, form.table, form.directions, form.layer],
        [form.table, form.directions, form.import_info],
        **PRIVATE,
        **MODEL,
    )
    run_id = gr.State("")
    buttons = [steer.generate_btn, steer.stop_btn]
    settings = [decoding.max_tokens, decoding.temperature, decoding.top_p, decoding.seed]
    begun = steer.generate_btn.click(
        begin_run,
        [form.table, *typed, form.coeff, form.layer],
        [form.table, *typed, form.message, *buttons, steer.run_info, run_id],
        show_progress="hidden",
        **UI_ONLY,
    )
    # trigger_mode "multiple": a run begun while a stopped one is still ending waits its turn
    # instead of being dropped (Gradio drops a second trigger of a pending event by default).
    begun.then(gate, run_id, None, show_progress="hidden", **UI_ONLY).success(
        generate_run,
        [prompt, form.table, form.layer, *settings, decoding.capture, decoding.raw_prompt, form.directions, run_id]
        + [steer.prompted],
        [steer.steered, steer.baseline, steer.run_info, steer.prompted_out, *steer.scores, *buttons],
        show_progress="minimal",
        trigger_mode="multiple",
        **PRIVATE,
        **MODEL,
    )
    steer.stop_btn.click(stop_run, None, [steer.run_info, *buttons], **UI_ONLY)  # no cancels: see Runs
    steer.prompted.change(show_prompted, steer.prompted, steer.prompted_column, **UI_ONLY)


def show_prompted(on) -> gr.Column:
    """The Prompted box (and its scores) beside Steered and Baseline while the option is on."""
    return gr.Column(visible=bool(on))
