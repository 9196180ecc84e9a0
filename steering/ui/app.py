"""The Gradio app: `build_demo(config) -> gr.Blocks`. One builder per panel, event wiring last.

The UI is a thin layer over `steering/api.py`: every handler here converts component values
(`steering/views.py` does the pure conversions) and calls one api function. No model logic and
no model or tensor in `gr.State`. The six client endpoints are the api functions themselves,
registered with `gr.api` so their typed signatures and docstrings make the API page. This is the
edge where the core's `SteeringError`s become `gr.Error`s (and where each request logs one line).

Sliders and number boxes take their range and default from `steering/limits.py`.

Concurrency: Gradio's limits are per handler, so every handler that runs the model shares the
concurrency id "model" with limit 1 (the manager's lock is the backstop). Status and memory
readings share "info" and do not wait behind a generation. `queue(api_open=False)` closes the
REST routes that would skip the queue; the queue is bounded so a public link cannot pile up work.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace

import gradio as gr
from gradio import FileData
from gradio.utils import get_upload_folder, is_in_or_equal

from steering import (
    api,
    catalog,
    chat,
    engine,
    history,
    limits,
    serving,
    ui_chat,
    ui_history,
    ui_recipes,
    ui_steer,
    ui_sweep,
    vector_io,
    views,
)
from steering.errors import InputError, SteeringError
from steering.loader import QUANT_CHOICES, get_manager

logger = logging.getLogger(__name__)

MODEL = {"concurrency_id": "model", "concurrency_limit": 1}  # everything that runs the model
INFO = {"concurrency_id": "info", "concurrency_limit": 4}  # readings: never wait behind a generation
UI_ONLY = {"concurrency_limit": None, "api_visibility": "private"}  # table edits: no model, no waiting
PRIVATE = {"api_visibility": "private"}


def export_vectors(
    vectors: list[dict], format: str = "gguf", capture_mode: str = engine.DEFAULT_CAPTURE_MODE
) -> FileData:
    """Export steering vectors as a llama.cpp control vector (GGUF) or a safetensors file.

    Args:
        vectors: the same vector objects as /steer takes (text, pair or direction; coeff; layer).
            Layers 2 and up: llama.cpp adds direction.N after block N, which is the input of our
            layer N+1, so our layer L is written as direction.{L-1}.
        format: "gguf" (llama.cpp --control-vector) or "safetensors" (the same tensors and metadata).
        capture_mode: how text vectors are captured (contexts, bos-neutral, bos or stock), as in the UI.

    Returns:
        the file. Text and pair vectors become absolute vectors: coefficient x direction x the
        layer's typical hidden-state RMS on neutral text (recorded in the file's metadata), so
        llama.cpp applies them at scale 1; our own /import_vectors restores the exact vectors.
    """
    result = api.export_vectors(vectors, format, capture_mode)
    return FileData(path=result["path"], orig_name=f"steering-vectors.{result['format']}")


def import_vectors(file: FileData) -> dict:
    """Read a control vector file (GGUF or safetensors) into vectors for /steer.

    Args:
        file: the file (with gradio_client: handle_file("vectors.gguf")).

    Returns:
        {"vectors": [...], "metadata": {...}, "model", "fallback"}. A file from /export_vectors
        gives back its original vectors (the same steering, token for token); a foreign control
        vector (llama.cpp, repeng) gives {"direction": [...], "coeff": 1.0, "layer": N+1} per
        direction.N tensor. A wrong hidden size or a layer beyond the model is refused.
    """
    path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
    if not isinstance(path, str) or not is_in_or_equal(path, get_upload_folder()):
        raise InputError("file", "must be a file uploaded with the request (gradio_client: handle_file(path))")
    return api.import_vectors(path)


# The client endpoints: function, name, concurrency group.
ENDPOINTS = (
    (api.steer, "steer", MODEL),
    (chat.chat, "chat", MODEL),
    (api.sweep, "sweep", MODEL),
    (api.similarity, "similarity", MODEL),
    (api.autotune, "autotune", MODEL),
    (export_vectors, "export_vectors", MODEL),
    (import_vectors, "import_vectors", MODEL),
    (api.load_model, "load_model", MODEL),
    (api.status, "status", INFO),
    (api.plan, "plan", INFO),
)


@dataclass(frozen=True)
class UIConfig:
    """What `app.py` tells the UI. The model manager itself is configured by `app.py`."""

    lock_model: bool = False
    max_queue: int = 32
    title: str = "Steering Lab"


# -- the edge: domain errors -> gr.Error, one log line per request ------------------------------
def _user_error(exc: SteeringError) -> gr.Error:
    return gr.Error(str(exc), print_exception=False)


def user_errors(fn):
    """`fn` with the core's errors shown to the user and one log line per call (never a prompt)."""

    def refused(exc: SteeringError) -> gr.Error:
        logger.info("%s refused: %s", fn.__name__, exc)
        return _user_error(exc)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            started = time.perf_counter()
            try:
                yield from fn(*args, **kwargs)
            except SteeringError as exc:
                raise refused(exc) from None
            finally:
                logger.info("request %s %.2f s", fn.__name__, time.perf_counter() - started)

        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except SteeringError as exc:
            raise refused(exc) from None
        finally:
            logger.info("request %s %.2f s", fn.__name__, time.perf_counter() - started)

    return call


def _endpoint(fn):
    """An api function as a client endpoint: errors translated, and its string annotations
    evaluated so `gr.api` sees real types (api.py uses `from __future__ import annotations`) and
    the API page shows `dict` instead of `Any`."""
    call = user_errors(fn)
    signature = inspect.signature(fn, eval_str=True)
    # Keyword-only parameters (e.g. autotune's `stop` flag) are for in-process callers such as the
    # UI's handlers, not for clients: the endpoint does not offer them.
    public = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    call.__signature__ = signature.replace(parameters=public)
    return call


# -- handlers: read the model view -------------------------------------------------------------
def _model_view(status: dict) -> tuple:
    """Status line, fallback notice, both layer sliders (range and default follow the model), model."""
    n_layers = status.get("n_layers") or 1
    default = status.get("default_layer") or 0
    downgrades = [e for e in status.get("events") or [] if e.get("recovery") != "rows one at a time"]
    event = downgrades[-1] if downgrades else None
    if event and (event["loaded"]["model"], event["loaded"]["quant"]) != (status.get("model"), status.get("quant")):
        event = None  # an old downgrade that no longer describes what is loaded

    def layer_range() -> gr.Slider:
        return gr.Slider(minimum=0, maximum=n_layers - 1, value=default)

    return (
        views.status_line(status),
        views.fallback_notice(event),
        layer_range(),
        layer_range(),
        gr.Dropdown(value=status.get("model")),
    )


@user_errors
def refresh_model_view() -> tuple:
    """Status line, fallback notice and layer ranges of the loaded model (on page load)."""
    return _model_view(api.status())


def load_selected_model(
    model: str, quant: str, force: bool, allow_offload: bool = False, progress=gr.Progress(track_tqdm=True)
) -> tuple:
    """Load the chosen model; the layer sliders follow its depth. Outputs: the model view and
    the model's message line. A refusal is a notice and a message; the dropdown goes back to the
    model that is still loaded, nothing else changes."""
    progress(0, desc=f"Loading {model}")
    try:
        return (*_model_view(api.load_model(model, quant, force, bool(allow_offload))), "")
    except SteeringError as exc:
        logger.info("load_selected_model refused: %s", exc)
        shown = ui_steer.refused(str(exc), 6, at=5)
        return (*shown[:4], gr.Dropdown(value=get_manager().status().get("model")), shown[5])


def model_advice(model: str, quant: str) -> str:
    """The plan's sentence for the chosen model: an offload row's expected speed (and the
    Allow-offload box), a split across GPUs, or why nothing loads. Empty for a model that simply
    fits, is not in the plan (a local folder) or when no plan can be made."""
    try:
        plan = api.plan()
    except SteeringError:
        return ""
    rows = [r for r in plan.get("models", []) if r.get("id") == model and quant in ("auto", r.get("quant"))]
    if quant == "auto" and any(r.get("verdict") in ("stable", "fragile") for r in rows):
        return ""  # "auto" takes a quantization that fits
    return "  \n".join(text for text in map(views.load_advice, rows) if text)


# -- handlers: the vectors table and generation: steering/ui_steer.py ----------------------------
add_vector_row, remove_vector_row, clear_vector_rows = (
    ui_steer.add_vector_row,
    ui_steer.remove_vector_row,
    ui_steer.clear_vector_rows,
)
generate_outputs = ui_steer.generate_outputs


run_sweep = ui_sweep.run_sweep  # steering/ui_sweep.py: rows stream in, Stop ends them


@ui_steer.notices(2, at=1)
def show_similarity(rows, layer) -> tuple:
    """The cosine heatmap of the table's (enabled) texts at the layer slider's layer; outputs
    (heatmap, message): a refusal leaves the previous heatmap."""
    items = views.similarity_items(views.rows_to_vectors(ui_steer.bounded_rows(rows), int(layer)))
    if len(items) < 2:
        raise gr.Error("texts: the vectors table needs at least 2 different vectors to compare", print_exception=False)
    result = api.similarity(items[: int(limits.LIMITS["similarity_texts"].maximum)], int(layer))
    return views.heatmap_html(result["texts"], result["matrix"], result["layer"]), ""


@ui_steer.notices(5, at=0)  # a refusal (a context out of range) shows where the card reading goes
def refresh_memory(context) -> tuple:
    """The card reading, processes, this machine's compatibility matrix and the fallback log."""
    status, plan = api.status(), api.plan(context)
    device = status["memory"]["device"]
    choice = plan["choice"]
    card = (
        views.card_markdown(device)
        + f"  \n**Choice for this machine:** `{choice['id']}` {choice['quant']} — {choice['reason']}"
    )
    margin = plan["margin_bytes"]
    bars = [
        (f"loaded: {row['id']} {row['quant']}", row)
        for row in plan["models"]
        if (row["id"], row["quant"]) == (status.get("model"), status.get("quant"))
    ] + [(f"{row['id'].rsplit('/', 1)[-1]} {row['quant']}", row) for row in plan["models"]]
    return (
        card,
        views.memory_bars_html(bars, plan["headroom_bytes"], margin),
        views.process_rows(device),
        views.plan_rows(plan, margin),
        views.event_rows(status["events"]),
    )


# -- handlers: vector files --------------------------------------------------------------------
@user_errors
def export_table(rows, layer, fmt, capture_mode, directions) -> str:
    """The table's vectors as a GGUF / safetensors file for download."""
    return api.export_vectors(views.rows_to_vectors(rows, int(layer), directions), fmt, capture_mode)["path"]


@ui_steer.notices(2, at=1)
def export_table_shown(rows, layer, fmt, capture_mode, directions) -> tuple:
    """`export_table` for the button: outputs (file, the files' message line); a refusal is a
    notice and that message, the previous file stays."""
    return export_table(rows, layer, fmt, capture_mode, directions), ""


@ui_steer.notices(3, at=2)  # a refused file: a notice and the import line; the table stays
def import_into_table(file_path, rows, directions, layer) -> tuple:
    """Append the vectors of an uploaded control vector file to the table (editable rows)."""
    result = api.import_vectors(file_path)
    directions = dict(directions or {})
    kept = [list(r) for r in rows or [] if views.rows_to_vectors([r], 0, directions)]
    added = views.vectors_to_rows(result["vectors"], int(layer), directions)
    limits.check_count("vectors", kept + added, "vectors")
    meta = result["metadata"]
    source = "a Steering Lab file" if meta["ours"] else f"a foreign control vector (model hint {meta['model_hint']})"
    note = f"Imported {len(added)} vector(s) from {source}." + (f" ⚠️ {meta['warning']}" if meta.get("warning") else "")
    return kept + added, directions, note


# -- handlers: recipes: steering/ui_recipes.py -------------------------------------------------
save_recipe, load_recipe, apply_example = ui_recipes.save_recipe, ui_recipes.load_recipe, ui_recipes.apply_example


# -- controls bound to a declared limit --------------------------------------------------------
def _limited(name: str) -> dict:
    """Range, default and the `limit-NAME` class of a control for the limit `name`."""
    limit = limits.LIMITS[name]
    step = 1 if limit.integer else 0.05
    low = limit.minimum + step if limit.min_exclusive else limit.minimum
    kwargs = {"minimum": low, "maximum": limit.maximum, "value": limit.default, "elem_classes": [f"limit-{name}"]}
    return {**kwargs, "precision": 0} if limit.integer else kwargs


def _number_box(name: str, label: str, **kwargs) -> gr.Number:
    """A number box for the limit `name` whose range is checked by the handler, not by Gradio:
    an out-of-range number then gets the field's message beside it instead of an "Error" badge
    over the handler's outputs."""
    limit = limits.LIMITS[name]
    kwargs = {"value": limit.default, "elem_classes": [f"limit-{name}"], "info": limit.range_text(), **kwargs}
    return gr.Number(label=label, **({"precision": 0} if limit.integer else {}), **kwargs)


def _slider(name: str, label: str, **kwargs) -> gr.Slider:
    limit = limits.LIMITS[name]
    return gr.Slider(step=1 if limit.integer else 0.05, label=label, **_limited(name), **kwargs)


def _layer_slider(n_layers: int, label: str) -> gr.Slider:
    return gr.Slider(0, n_layers - 1, value=n_layers // 2, step=1, precision=0, label=label)


# -- layout: one builder per panel -------------------------------------------------------------
# Global CSS, in a <style> element of the page (Gradio 6 takes css only in launch(), which app.py
# and the tests call): the Steer tab's wide-screen grid, tables that scroll within themselves,
# message lines, and the footer's "Use via API" link kept on narrow screens.
LAYOUT_CSS = """
@media (min-width: 900px) {
  #steer-layout { display: grid !important; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr);
    grid-template-areas: "form outputs" "table outputs"; align-items: start; }
  #steer-form { grid-area: form; } #steer-outputs { grid-area: outputs; } #steer-table { grid-area: table; }
}
.scroll-table .table-wrap, .scroll-table .virtual-table-viewport { overflow-x: auto !important; }
.scroll-table table { min-width: 560px; }
#vectors-table { position: relative; z-index: 1000; }  /* its cell menu ("Add row below") over the blocks below */
.field-message p { color: #b45309; margin: 0; }
footer .show-api, footer .api-docs, footer a[href*="view=api"] { display: inline-flex !important; }
"""


def _model_panel(loaded, locked: bool) -> SimpleNamespace:
    model_choices = [(spec.short_name, spec.id) for spec in catalog.CATALOG]
    with gr.Accordion("Model", open=True, elem_id="model-panel"):
        with gr.Row():
            dropdown = gr.Dropdown(
                model_choices,
                value=loaded.model_id if loaded else catalog.EMBEDDED_ID,
                label="Model",
                info="A matrix model, any cached Hugging Face id, or a folder under the server's --models-dir",
                allow_custom_value=True,
                interactive=not locked,
                scale=3,
            )
            quant = gr.Radio(list(QUANT_CHOICES), value="auto", label="Quantization", interactive=not locked, scale=3)
            force = gr.Checkbox(False, label="Force (skip the memory check)", interactive=not locked, scale=1)
            allow_offload = gr.Checkbox(
                False, label="Allow offload (layers in CPU RAM: much slower)", interactive=not locked, scale=1
            )
            load_btn = gr.Button("Load", variant="secondary", interactive=not locked, scale=1)
        if locked:
            gr.Markdown("_Model switching is disabled on this server (`--lock-model`)._")
        message = gr.Markdown("", elem_id="model-message", elem_classes=["field-message"])
        advice = gr.Markdown("", elem_id="load-advice")
        status_md = gr.Markdown("Loading…", elem_id="status-line")
        fallback_md = gr.Markdown("", elem_id="fallback-notice")
    return SimpleNamespace(
        dropdown=dropdown,
        quant=quant,
        force=force,
        allow_offload=allow_offload,
        advice=advice,
        load_btn=load_btn,
        message=message,
        status_md=status_md,
        fallback_md=fallback_md,
    )


def _vector_form(n_layers: int) -> SimpleNamespace:
    """Layer slider, the new-vector form and its Auto-tune."""
    layer = _layer_slider(n_layers, "Layer (for new vectors and the heatmap)")
    with gr.Row():
        text = gr.Textbox(label="Steering text", placeholder="dogs", elem_id="new-text")
        positive = gr.Textbox(label="…or positive", placeholder="happy", elem_id="new-positive")
        negative = gr.Textbox(label="…minus negative", placeholder="sad", elem_id="new-negative")
    with gr.Row():
        coeff = _number_box("coeff", "Coefficient (× the hidden state's RMS)", elem_id="new-coeff")
        add_btn = gr.Button("Add vector", elem_id="add-vector")
        autotune_btn = gr.Button("Auto-tune", elem_id="autotune")
        autotune_stop = gr.Button("Stop auto-tune", variant="stop", visible=False, elem_id="stop-autotune")
    message = gr.Markdown("", elem_id="vector-message", elem_classes=["field-message"])
    with gr.Accordion("Auto-tune: score per layer × coefficient", open=False, elem_id="autotune-result"):
        autotune_picture = gr.HTML(
            "<p>Auto-tune searches layers × coefficients for the typed vector on the prompt "
            "and fills the layer and coefficient above.</p>",
            elem_id="autotune-picture",
        )
    return SimpleNamespace(
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


def _vector_table() -> SimpleNamespace:
    """The vectors table (it scrolls within itself on a phone), its row buttons and vector files."""
    table = gr.Dataframe(
        value=[],
        headers=list(views.VECTOR_COLUMNS),
        datatype=["str", "str", "str", "number", "number", "bool", "str"],
        type="array",
        column_count=len(views.VECTOR_COLUMNS),
        column_limits=(len(views.VECTOR_COLUMNS), len(views.VECTOR_COLUMNS)),  # rows may be added, columns not
        interactive=True,
        label="Vectors",
        elem_id="vectors-table",
        elem_classes=["scroll-table"],
    )
    gr.Markdown(
        "`positions`: **prompt** (the default) adds a vector to the prompt's positions only, as ActAdd "
        "does, and the reply is written by unsteered layers reading the steered prompt; **all** also adds "
        "it at every generated token, as llm-steer does, and needs about half the coefficient (0.45 "
        "where prompt takes 1).",
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
                "Import file", file_types=[".gguf", ".safetensors"], type="filepath", elem_id="import-vectors", scale=1
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


def _decoding_panel() -> SimpleNamespace:
    with gr.Accordion("Decoding", open=False, elem_id="decoding"):
        max_tokens = _slider("max_new_tokens", "Max new tokens", elem_id="max-tokens")
        temperature = _slider("temperature", "Temperature (0 = greedy)")
        top_p = _slider("top_p", "Top-p")
        seed = _number_box("seed", "Seed", elem_id="seed")
        capture = gr.Radio(
            list(engine.CAPTURE_MODES),
            value=engine.DEFAULT_CAPTURE_MODE,
            label="Capture mode (stock: comparison only — llm-steer's own capture, "
            "which does not carry the text's meaning)",
            elem_id="capture-mode",
        )
        raw_prompt = gr.Checkbox(False, label="Raw prompt (skip the chat template)", elem_id="raw-prompt")
    return SimpleNamespace(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, capture=capture, raw_prompt=raw_prompt
    )


def _steer_tab(n_layers: int) -> SimpleNamespace:
    """Three columns: the form and Generate, the outputs, the table and settings. A wide screen
    shows them as form | outputs over table | outputs (CSS grid, see `LAYOUT_CSS`); a phone stacks
    them in that order, so the outputs come right after the controls that produce them."""
    with gr.Tab("Steer"), gr.Row(elem_id="steer-layout"):
        with gr.Column(scale=1, elem_id="steer-form"):
            new_vector = _vector_form(n_layers)
            with gr.Row():
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False)
        with gr.Column(scale=1, elem_id="steer-outputs"):
            with gr.Row():
                steered = gr.Textbox(label="Steered", lines=12, interactive=False, elem_id="steered-output")
                baseline = gr.Textbox(
                    label="Baseline (unsteered)", lines=12, interactive=False, elem_id="baseline-output"
                )
            run_info = gr.Markdown("", elem_id="run-info")
        with gr.Column(scale=1, elem_id="steer-table"):
            rows = _vector_table()
            decoding = _decoding_panel()
    form = SimpleNamespace(**vars(new_vector), **vars(rows))
    return SimpleNamespace(
        form=form,
        decoding=decoding,
        generate_btn=generate_btn,
        stop_btn=stop_btn,
        steered=steered,
        baseline=baseline,
        run_info=run_info,
    )


def _sweep_tab(n_layers: int) -> SimpleNamespace:
    with gr.Tab("Sweep"):
        gr.Markdown(
            "One steering text at several coefficients, all rows of one batch. Pick by **relevance** among "
            "**fluent** rows (★): relevance is how much more likely the unsteered model finds the steering "
            "text after the output than after the baseline's (nats/token); fluent means perplexity ≤ 30, "
            "repetition (1 − distinct-2) ≤ 0.2 and at least 8 tokens. `effect` keeps rising where the text "
            "has degenerated: do not pick by it."
        )
        with gr.Row():
            text = gr.Textbox("dogs", label="Steering text", elem_id="sweep-text")
            layer = _layer_slider(n_layers, "Layer")
            coeffs = gr.Textbox(
                "0, 0.5, 1, 1.5", label=f"Coefficients (up to {limits.MAX_SWEEP_ROWS})", elem_id="sweep-coeffs"
            )
            tokens = _slider("sweep_max_new_tokens", "Max new tokens", elem_id="sweep-tokens")
            positions = gr.Radio(
                list(views.POSITIONS),
                value=views.POSITIONS[0],
                label="Positions (see the Vectors table)",
                elem_id="sweep-positions",
            )
        with gr.Row():
            run_btn = gr.Button("Run sweep", variant="primary", elem_id="run-sweep")
            stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop-sweep")
        info = gr.Markdown("", elem_id="sweep-info", elem_classes=["field-message"])
        table = gr.Dataframe(
            headers=list(views.SWEEP_COLUMNS),
            type="array",
            interactive=False,
            wrap=True,
            elem_id="sweep-table",
            elem_classes=["scroll-table"],
        )
        plot = gr.HTML("", elem_id="sweep-plot")
    return SimpleNamespace(
        text=text,
        layer=layer,
        coeffs=coeffs,
        tokens=tokens,
        positions=positions,
        run_btn=run_btn,
        stop_btn=stop_btn,
        info=info,
        table=table,
        plot=plot,
    )


def _vectors_tab() -> SimpleNamespace:
    with gr.Tab("Vectors"):
        gr.Markdown("Texts whose vectors point the same way steer alike. Uses the table's texts and the layer slider.")
        show_btn = gr.Button("Show similarity", elem_id="show-similarity")
        message = gr.Markdown("", elem_id="similarity-message", elem_classes=["field-message"])
        heatmap = gr.HTML("", elem_id="heatmap")
    return SimpleNamespace(show_btn=show_btn, message=message, heatmap=heatmap)


def _memory_tab() -> SimpleNamespace:
    with gr.Tab("Memory", elem_id="memory-tab") as tab:
        with gr.Row():
            context = _number_box("context", "Context tokens to plan for", elem_id="context")
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
            max_height=1200,  # every row visible: the plan is read as a whole
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


def _recipes_tab() -> SimpleNamespace:
    with gr.Tab("Recipes"):
        with gr.Row():
            example = gr.Dropdown(list(views.EXAMPLES), value=next(iter(views.EXAMPLES)), label="Built-in example")
            use_example_btn = gr.Button("Use example", elem_id="use-example")
        with gr.Row(visible=False, elem_id="example-confirm") as confirm_row:
            confirm_btn = gr.Button("Replace", variant="stop", elem_id="example-replace")
            cancel_btn = gr.Button("Cancel", elem_id="example-cancel")
        with gr.Row():
            save_btn = gr.Button("Save recipe (JSON)", elem_id="save-recipe")
            upload_btn = gr.UploadButton("Load recipe", file_types=[".json"], type="filepath", elem_id="load-recipe")
        message = gr.Markdown("", elem_id="recipe-message", elem_classes=["field-message"])
        file = gr.File(label="Recipe download", interactive=False, elem_id="recipe-file")
    return SimpleNamespace(
        example=example,
        use_example_btn=use_example_btn,
        confirm_row=confirm_row,
        confirm_btn=confirm_btn,
        cancel_btn=cancel_btn,
        save_btn=save_btn,
        upload_btn=upload_btn,
        message=message,
        file=file,
    )


def _history_tab() -> SimpleNamespace:
    with gr.Tab("History", elem_id="history-tab") as tab:
        gr.Markdown(
            "Every Generate, sweep and auto-tune of this browser session (the newest "
            f"{history.MAX_ENTRIES}), with model, quantization, capture mode, seed, vectors and versions."
        )
        table = gr.Dataframe(
            headers=list(history.HISTORY_COLUMNS),
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
        result = gr.JSON(label="Re-run result")
    return SimpleNamespace(
        tab=tab, table=table, number=number, rerun_btn=rerun_btn, download_btn=download_btn, message=message,
        file=file, result=result,
    )  # fmt: skip


def _document_parameters(demo: gr.Blocks, name: str, fn) -> None:
    """Give each parameter of a `gr.api` endpoint its name and its docstring line on the API page
    ("Use via API"); Gradio labels them '1st', '2nd', ... and leaves the description empty."""
    from gradio.utils import get_function_description

    _, described, _ = get_function_description(fn)
    block_fn = next(f for f in demo.fns.values() if f.name == name)
    for component, parameter in zip(block_fn.inputs, inspect.signature(fn).parameters):
        component.label = parameter
        if described.get(parameter):
            component._api_info = {**component._api_info, "additional_description": described[parameter]}


# -- wiring ------------------------------------------------------------------------------------
def _wire_history(past) -> None:
    past.tab.select(ui_history.show_history, None, past.table, **UI_ONLY)
    past.download_btn.click(ui_history.download_history, None, [past.file, past.message], **UI_ONLY)
    past.rerun_btn.click(
        ui_history.rerun_entry, past.number, [past.table, past.result, past.message], **PRIVATE, **MODEL
    )


def _wire_sweep(prompt: gr.Textbox, sweep, decoding) -> None:
    buttons = [sweep.run_btn, sweep.stop_btn]
    run_id = gr.State("")
    begun = sweep.run_btn.click(
        ui_sweep.begin_sweep, None, [*buttons, sweep.info, run_id], show_progress="hidden", **UI_ONLY
    )
    begun.then(
        ui_sweep.sweep_run,
        [prompt, sweep.text, sweep.layer, sweep.coeffs, sweep.tokens, decoding.seed, sweep.positions, run_id],
        [sweep.table, sweep.plot, sweep.info, *buttons],
        show_progress="minimal",
        trigger_mode="multiple",  # see _wire_steer
        **PRIVATE,
        **MODEL,
    )
    sweep.stop_btn.click(ui_sweep.stop_sweep, None, [sweep.info, *buttons], **UI_ONLY)


def _wire_autotune(prompt: gr.Textbox, form, decoding) -> None:
    """Auto-tune fills the form's layer and coefficient; Stop ends (or unqueues) the search."""
    buttons = [form.autotune_btn, form.autotune_stop]
    run_id = gr.State("")
    begun = form.autotune_btn.click(
        ui_steer.begin_search, None, [*buttons, form.message, run_id], show_progress="hidden", **UI_ONLY
    )
    begun.then(
        ui_sweep.autotune_run,
        [prompt, form.text, form.positive, form.negative, decoding.seed, run_id],
        [form.layer, form.coeff, form.autotune_picture, form.message, *buttons],
        trigger_mode="multiple",  # see _wire_steer
        **PRIVATE,
        **MODEL,
    )
    form.autotune_stop.click(ui_sweep.stop_autotune, None, [form.message, *buttons], **UI_ONLY)


def _wire_recipes(prompt: gr.Textbox, steer, recipes) -> None:
    form, decoding = steer.form, steer.decoding
    form_fields = [decoding.max_tokens, decoding.temperature, decoding.top_p, decoding.seed]
    form_fields += [decoding.capture, decoding.raw_prompt]
    recipe_fields = [prompt, form.table, *form_fields, form.directions]
    recipes.save_btn.click(
        save_recipe,
        [prompt, form.table, form.layer, *form_fields, form.directions],
        [recipes.file, recipes.message],
        **UI_ONLY,
    )
    recipes.upload_btn.upload(
        load_recipe, [recipes.upload_btn, form.layer], [*recipe_fields, recipes.message], **UI_ONLY
    )
    example_outputs = [*recipe_fields, recipes.confirm_row, recipes.message]
    recipes.use_example_btn.click(
        ui_recipes.use_example, [recipes.example, form.table], example_outputs, **PRIVATE, **INFO
    )
    recipes.confirm_btn.click(ui_recipes.confirm_example, recipes.example, example_outputs, **PRIVATE, **INFO)
    recipes.cancel_btn.click(ui_recipes.cancel_example, None, [recipes.confirm_row, recipes.message], **UI_ONLY)


def _wire_steer(prompt: gr.Textbox, steer) -> None:
    """The vector form, the table's own edits, and the Generate -> Stop chain (see ui_steer)."""
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
    form.table.change(
        ui_steer.check_table, [form.table, form.layer, form.message], [form.table, form.message], **UI_ONLY
    )
    _wire_autotune(prompt, form, decoding)
    run_id = gr.State("")
    buttons = [steer.generate_btn, steer.stop_btn]
    settings = [decoding.max_tokens, decoding.temperature, decoding.top_p, decoding.seed]
    begun = steer.generate_btn.click(
        ui_steer.begin_run,
        [form.table, *typed, form.coeff, form.layer],
        [form.table, *typed, form.message, *buttons, steer.run_info, run_id],
        show_progress="hidden",
        **UI_ONLY,
    )
    # trigger_mode "multiple": a run begun while a stopped one is still ending waits its turn
    # instead of being dropped (Gradio drops a second trigger of a pending event by default).
    begun.then(ui_steer.gate, run_id, None, show_progress="hidden", **UI_ONLY).success(
        ui_steer.generate_run,
        [prompt, form.table, form.layer, *settings, decoding.capture, decoding.raw_prompt, form.directions, run_id],
        [steer.steered, steer.baseline, steer.run_info, *buttons],
        show_progress="minimal",
        trigger_mode="multiple",
        **PRIVATE,
        **MODEL,
    )
    steer.stop_btn.click(ui_steer.stop_run, None, [steer.run_info, *buttons], **UI_ONLY)  # no cancels: see Runs


# On a phone the model panel starts folded (its status line stays in the page title's place when
# opened), so the prompt, the vector form and Generate with its outputs come first.
FOLD_MODEL_PANEL_ON_PHONES = """() => {
    if (window.innerWidth >= 640) return;
    const toggle = document.querySelector('#model-panel .label-wrap');
    if (toggle && toggle.classList.contains('open')) toggle.click();
}"""


def _wire(demo: gr.Blocks, prompt: gr.Textbox, model, steer, sweep, vectors, memory, recipes) -> None:
    form, decoding = steer.form, steer.decoding
    model_view = [model.status_md, model.fallback_md, form.layer, sweep.layer, model.dropdown]
    demo.load(refresh_model_view, None, model_view, **PRIVATE, **INFO)
    demo.load(None, None, None, js=FOLD_MODEL_PANEL_ON_PHONES)
    model.load_btn.click(
        load_selected_model,
        [model.dropdown, model.quant, model.force, model.allow_offload],
        [*model_view, model.message],
        **PRIVATE,
        **MODEL,
    )
    for chosen in (model.dropdown, model.quant):  # the plan's word on the choice, before loading
        chosen.change(model_advice, [model.dropdown, model.quant], model.advice, **PRIVATE, **INFO)
    _wire_steer(prompt, steer)
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
    _wire_sweep(prompt, sweep, decoding)
    vectors.show_btn.click(
        show_similarity, [form.table, form.layer], [vectors.heatmap, vectors.message], **PRIVATE, **MODEL
    )
    memory_view = [memory.card, memory.bars, memory.processes, memory.plan, memory.events]
    memory.refresh_btn.click(refresh_memory, memory.context, memory_view, **PRIVATE, **INFO)
    memory.tab.select(refresh_memory, memory.context, memory_view, **PRIVATE, **INFO)  # fills itself on open
    _wire_recipes(prompt, steer, recipes)


def build_demo(config: UIConfig | None = None) -> gr.Blocks:
    """The whole app, queued and ready for `launch()`."""
    config = config or UIConfig()
    manager = get_manager()
    locked = config.lock_model or manager.locked
    loaded = manager.current
    n_layers = loaded.n_layers if loaded else catalog.get_spec(catalog.EMBEDDED_ID).n_layers

    with gr.Blocks(title=config.title) as demo:
        gr.Markdown(
            f"# {config.title}\nActivation steering (llm-steer) with steered and unsteered output side by side."
        )
        model = _model_panel(loaded, locked)
        gr.HTML(f"<style>{LAYOUT_CSS}</style>", elem_id="layout-css", padding=False)
        prompt = gr.Textbox("Tell me about your weekend.", label="Prompt", lines=2, elem_id="prompt-box")
        with gr.Tabs():
            steer = _steer_tab(n_layers)
            chat_tab = ui_chat.chat_tab()
            sweep = _sweep_tab(n_layers)
            vectors = _vectors_tab()
            memory = _memory_tab()
            recipes = _recipes_tab()
            past = _history_tab()
        # The client API: the api functions themselves, typed, with their docstrings.
        for fn, name, group in ENDPOINTS:
            gr.api(_endpoint(fn), api_name=name, **group)
            _document_parameters(demo, name, fn)
        _wire(demo, prompt, model, steer, sweep, vectors, memory, recipes)
        _wire_history(past)
        ui_chat.wire_chat(chat_tab, steer.form, steer.decoding)

    demo.queue(api_open=False, max_size=config.max_queue, default_concurrency_limit=1)
    serving.readings_never_queue_full(demo)  # /status and /plan answer even when generation fills it
    return demo
