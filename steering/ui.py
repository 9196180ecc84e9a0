"""The Gradio app: `build_demo(config) -> gr.Blocks`. Layout first, event wiring last.

The UI is a thin layer over `steering/api.py`: every handler here converts component values
(`steering/views.py` does the pure conversions) and calls one api function. No model logic and
no model or tensor in `gr.State`. The six client endpoints are the api functions themselves,
registered with `gr.api` so their typed signatures and docstrings make the API page.

Concurrency: Gradio's limits are per handler, so every handler that runs the model shares the
concurrency id "model" with limit 1 (the manager's lock is the backstop). Status and memory
readings share "info" and do not wait behind a generation. `queue(api_open=False)` closes the
REST routes that would skip the queue; the queue is bounded so a public link cannot pile up work.
"""

from __future__ import annotations

import functools
import inspect
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from steering import api, catalog, engine, generate, views
from steering.errors import InputError
from steering.loader import QUANT_CHOICES, get_manager

MODEL = {"concurrency_id": "model", "concurrency_limit": 1}  # everything that runs the model
INFO = {"concurrency_id": "info", "concurrency_limit": 4}  # readings: never wait behind a generation
UI_ONLY = {"concurrency_limit": None, "api_visibility": "private"}  # table edits: no model, no waiting


@dataclass(frozen=True)
class UIConfig:
    """What `app.py` tells the UI. The model manager itself is configured by `app.py`."""

    lock_model: bool = False
    max_queue: int = 32
    title: str = "Steering Lab"


def _endpoint(fn):
    """`fn` with its string annotations evaluated, so `gr.api` sees real types (api.py uses
    `from __future__ import annotations`) and the API page shows `dict` instead of `Any`."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__signature__ = inspect.signature(fn, eval_str=True)
    return call


def _user_error(exc: InputError) -> gr.Error:
    return gr.Error(str(exc), print_exception=False)


# -- handlers: read the model view -------------------------------------------------------------
def _model_view(status: dict) -> tuple:
    """Status line, fallback notice, both layer sliders (range and default follow the model), model."""
    n_layers = status.get("n_layers") or 1
    default = status.get("default_layer") or 0
    event = status["events"][-1] if status.get("events") else None
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


def refresh_model_view() -> tuple:
    """Status line, fallback notice and layer ranges of the loaded model (on page load)."""
    return _model_view(api.status())


def load_selected_model(model: str, quant: str, force: bool, progress=gr.Progress(track_tqdm=True)) -> tuple:
    """Load the chosen model; the layer sliders follow its depth."""
    progress(0, desc=f"Loading {model}")
    return _model_view(api.load_model(model, quant, force))


# -- handlers: the vectors table ---------------------------------------------------------------
def add_vector_row(rows: list, text: str, positive: str, negative: str, coeff: float, layer: int) -> tuple:
    """Append the form's vector to the table and clear the form's texts."""
    if not (text or "").strip() and not (positive or "").strip() and not (negative or "").strip():
        raise gr.Error("text: type a steering text (or a positive and a negative text) first", print_exception=False)
    kept = [list(r) for r in rows or [] if views.rows_to_vectors([r], 0)]
    if len(kept) >= engine.MAX_VECTORS:
        raise gr.Error(f"vectors: at most {engine.MAX_VECTORS} vectors", print_exception=False)
    kept.append([text or "", positive or "", negative or "", coeff, int(layer), True])
    return kept, "", "", ""


def remove_vector_row(rows: list, row_number: float | None) -> list:
    """Remove row `row_number` (1-based); 0 or empty removes the last row."""
    kept = [list(r) for r in rows or [] if views.rows_to_vectors([r], 0)]
    if not kept:
        return []
    index = len(kept) - 1 if not row_number else int(row_number) - 1
    if not 0 <= index < len(kept):
        raise gr.Error(f"row: give a row number from 1 to {len(kept)}", print_exception=False)
    del kept[index]
    return kept


def clear_vector_rows() -> list:
    """Empty the vectors table."""
    return []


# -- handlers: generation ----------------------------------------------------------------------
def generate_outputs(prompt, rows, layer, max_new_tokens, temperature, top_p, seed, capture_mode, raw_prompt):
    """Stream steered and baseline text side by side (both rows of one batch).

    When the Stop button cancels this event, Gradio closes the generator: `finally` sets the stop
    flag, so generation ends within one decoding step and the model lock is released.
    """
    vectors = views.rows_to_vectors(rows, int(layer))
    stop = threading.Event()
    stream = api.steer_stream(
        prompt,
        vectors,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        True,
        stop=stop,
        capture_mode=capture_mode,
        raw_prompt=bool(raw_prompt),
    )
    try:
        for result in stream:
            info = f"{result['model']} ({result['quant']}, {result['device']}) · steered layers {result['layers']}"
            if not result["done"]:
                info += " · generating…"
            notice = views.fallback_notice(result.get("fallback"))
            yield result["steered"], result["baseline"], info + (f"  \n{notice}" if notice else "")
    finally:
        stop.set()
        stream.close()


def run_sweep(prompt, text, layer, coeffs_text, max_new_tokens, seed) -> tuple:
    """One row per coefficient: outputs, effect and perplexity, and their plot."""
    try:
        coeffs = views.parse_coeffs(coeffs_text)
    except InputError as exc:
        raise _user_error(exc) from None
    result = api.sweep(prompt, text, layer, coeffs, max_new_tokens, seed)
    import pandas as pd  # a gradio dependency; LinePlot takes a DataFrame

    points = pd.DataFrame(views.sweep_points(result), columns=["coeff", "value", "metric"])
    return views.sweep_rows(result), points, f"{result['model']} · layer {result['layer']}"


def show_similarity(rows, layer) -> str:
    """The cosine heatmap of the table's (enabled) texts at the layer slider's layer."""
    texts = views.vector_texts(views.rows_to_vectors(rows, int(layer)))
    if len(texts) < 2:
        raise gr.Error("texts: the vectors table needs at least 2 different texts to compare", print_exception=False)
    result = api.similarity(texts[: engine.MAX_VECTORS], int(layer))
    return views.heatmap_html(result["texts"], result["matrix"], result["layer"])


def refresh_memory(context) -> tuple:
    """The card reading, processes, this machine's compatibility matrix and the fallback log."""
    status, plan = api.status(), api.plan(context)
    device = status["memory"]["device"]
    choice = plan["choice"]
    card = (
        views.card_markdown(device)
        + f"  \n**Choice for this machine:** `{choice['id']}` {choice['quant']} — {choice['reason']}"
    )
    return card, views.process_rows(device), views.plan_rows(plan), views.event_rows(status["events"])


# -- handlers: recipes -------------------------------------------------------------------------
def save_recipe(prompt, rows, layer, max_new_tokens, temperature, top_p, seed) -> str:
    """Write the current vectors and settings to a JSON file for download."""
    recipe = views.make_recipe(
        prompt or "",
        views.rows_to_vectors(rows, int(layer)),
        {
            "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p),
            "seed": int(seed),
        },
    )
    folder = Path(tempfile.mkdtemp(prefix="steering-recipe-"))
    path = folder / "steering-recipe.json"
    path.write_text(json.dumps(recipe, indent=2))
    return str(path)


def _apply(recipe: dict, default_layer: int) -> tuple:
    s = recipe["settings"]
    rows = views.vectors_to_rows(recipe["vectors"], default_layer)
    return recipe["prompt"], rows, s["max_new_tokens"], s["temperature"], s["top_p"], s["seed"]


def load_recipe(file_path, layer) -> tuple:
    """Fill the prompt, vectors table and settings from an uploaded recipe."""
    try:
        recipe = views.parse_recipe(Path(file_path).read_text(encoding="utf-8"))
    except InputError as exc:
        raise _user_error(exc) from None
    except (OSError, UnicodeDecodeError, TypeError) as exc:
        raise gr.Error(f"recipe: cannot read the uploaded file ({exc})", print_exception=False) from None
    return _apply(recipe, int(layer))


def apply_example(name: str) -> tuple:
    """A built-in recipe, its layers set to the loaded model's middle layer."""
    if name not in views.EXAMPLES:
        raise gr.Error(f"example: choose one of {', '.join(views.EXAMPLES)}", print_exception=False)
    example = views.EXAMPLES[name]
    recipe = views.make_recipe(example["prompt"], example["vectors"], {})
    return _apply(recipe, api.status()["default_layer"])


# -- layout ------------------------------------------------------------------------------------
def build_demo(config: UIConfig | None = None) -> gr.Blocks:
    """The whole app, queued and ready for `launch()`."""
    config = config or UIConfig()
    manager = get_manager()
    locked = config.lock_model or manager.locked
    loaded = manager.current
    n_layers = loaded.n_layers if loaded else catalog.get_spec(catalog.EMBEDDED_ID).n_layers
    default_layer = n_layers // 2
    model_choices = [(spec.short_name, spec.id) for spec in catalog.CATALOG]

    with gr.Blocks(title=config.title) as demo:
        gr.Markdown(
            f"# {config.title}\nActivation steering (llm-steer) with steered and unsteered output side by side."
        )
        with gr.Accordion("Model", open=True):
            with gr.Row():
                model_dropdown = gr.Dropdown(
                    model_choices,
                    value=loaded.model_id if loaded else catalog.EMBEDDED_ID,
                    label="Model",
                    info="A matrix model, any cached Hugging Face id, or a local folder",
                    allow_custom_value=True,
                    interactive=not locked,
                    scale=3,
                )
                quant_radio = gr.Radio(
                    list(QUANT_CHOICES), value="auto", label="Quantization", interactive=not locked, scale=3
                )
                force_checkbox = gr.Checkbox(
                    False, label="Force (skip the memory check)", interactive=not locked, scale=1
                )
                load_btn = gr.Button("Load", variant="secondary", interactive=not locked, scale=1)
            if locked:
                gr.Markdown("_Model switching is disabled on this server (`--lock-model`)._")
            status_md = gr.Markdown("Loading…", elem_id="status-line")
            fallback_md = gr.Markdown("", elem_id="fallback-notice")
        prompt_box = gr.Textbox("Tell me about your weekend.", label="Prompt", lines=2, elem_id="prompt-box")

        with gr.Tabs():
            with gr.Tab("Steer"):
                with gr.Row():
                    with gr.Column(scale=1):
                        layer_slider = gr.Slider(
                            0,
                            n_layers - 1,
                            value=default_layer,
                            step=1,
                            precision=0,
                            label="Layer (for new vectors and the heatmap)",
                        )
                        with gr.Row():
                            new_text_box = gr.Textbox(label="Steering text", placeholder="dogs", elem_id="new-text")
                            new_positive_box = gr.Textbox(label="…or positive", placeholder="happy")
                            new_negative_box = gr.Textbox(label="…minus negative", placeholder="sad")
                        with gr.Row():
                            new_coeff_number = gr.Number(
                                0.5,  # fluent but clearly steered on the embedded model
                                label=f"Coefficient (|c| ≤ {engine.COEFF_CAP:g})",
                                minimum=-engine.COEFF_CAP,
                                maximum=engine.COEFF_CAP,
                                elem_id="new-coeff",
                            )
                            add_vector_btn = gr.Button("Add vector", elem_id="add-vector")
                        vectors_table = gr.Dataframe(
                            value=[],
                            headers=list(views.VECTOR_COLUMNS),
                            datatype=["str", "str", "str", "number", "number", "bool"],
                            type="array",
                            column_count=len(views.VECTOR_COLUMNS),
                            interactive=True,
                            label="Vectors",
                            elem_id="vectors-table",
                        )
                        with gr.Row():
                            remove_row_number = gr.Number(
                                0, precision=0, minimum=0, label="Row to remove (0: the last)"
                            )
                            remove_row_btn = gr.Button("Remove row")
                            clear_rows_btn = gr.Button("Clear")
                        with gr.Accordion("Decoding", open=False, elem_id="decoding"):
                            max_tokens_slider = gr.Slider(
                                1,
                                generate.MAX_NEW_TOKENS,
                                value=64,
                                step=1,
                                precision=0,
                                label="Max new tokens",
                                elem_id="max-tokens",
                            )
                            temperature_slider = gr.Slider(
                                0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)"
                            )
                            top_p_slider = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                            seed_number = gr.Number(0, precision=0, minimum=0, maximum=generate.MAX_SEED, label="Seed")
                            capture_radio = gr.Radio(
                                list(engine.CAPTURE_MODES),
                                value=engine.DEFAULT_CAPTURE_MODE,
                                label="Capture mode (stock = llm-steer's own)",
                            )
                            raw_prompt_checkbox = gr.Checkbox(False, label="Raw prompt (skip the chat template)")
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    with gr.Column(scale=1):
                        with gr.Row():
                            steered_box = gr.Textbox(
                                label="Steered", lines=12, interactive=False, elem_id="steered-output"
                            )
                            baseline_box = gr.Textbox(
                                label="Baseline (unsteered)", lines=12, interactive=False, elem_id="baseline-output"
                            )
                        run_info_md = gr.Markdown("", elem_id="run-info")
            with gr.Tab("Sweep"):
                gr.Markdown(
                    "One steering text at several coefficients, all rows of one batch. **effect**: how much more "
                    "likely the model finds the text (nats/token); **perplexity**: fluency of the output."
                )
                with gr.Row():
                    sweep_text_box = gr.Textbox("dogs", label="Steering text")
                    sweep_layer_slider = gr.Slider(
                        0, n_layers - 1, value=default_layer, step=1, precision=0, label="Layer"
                    )
                    sweep_coeffs_box = gr.Textbox("0, 0.5, 1, 2", label="Coefficients (up to 8)")
                    sweep_tokens_slider = gr.Slider(
                        1, generate.MAX_NEW_TOKENS, value=32, step=1, precision=0, label="Max new tokens"
                    )
                sweep_btn = gr.Button("Run sweep", variant="primary")
                sweep_info_md = gr.Markdown("")
                sweep_table = gr.Dataframe(
                    headers=list(views.SWEEP_COLUMNS), type="array", interactive=False, wrap=True
                )
                sweep_plot = gr.LinePlot(
                    x="coeff",
                    y="value",
                    color="metric",
                    title="Effect and ln(perplexity) vs coefficient",
                    x_title="coefficient",
                    y_title="nats per token",
                )
            with gr.Tab("Vectors"):
                gr.Markdown(
                    "Texts whose vectors point the same way steer alike. Uses the table's texts and the layer slider."
                )
                similarity_btn = gr.Button("Show similarity")
                heatmap_html = gr.HTML("")
            with gr.Tab("Memory"):
                with gr.Row():
                    context_number = gr.Number(
                        2048, precision=0, minimum=128, maximum=32768, label="Context tokens to plan for"
                    )
                    refresh_memory_btn = gr.Button("Refresh")
                card_md = gr.Markdown("")
                processes_table = gr.Dataframe(
                    headers=["pid", "name", "memory", "kind", "desktop"],
                    type="array",
                    interactive=False,
                    label="Processes on the card",
                )
                plan_table = gr.Dataframe(
                    headers=["model", "quant", "need", "verdict", "largest terms"],
                    type="array",
                    interactive=False,
                    label="Compatibility on this machine",
                )
                events_table = gr.Dataframe(
                    headers=["time", "stage", "asked", "loaded", "reason", "free before", "free after"],
                    type="array",
                    interactive=False,
                    label="Fallback events",
                    wrap=True,
                )
            with gr.Tab("Recipes"):
                with gr.Row():
                    example_dropdown = gr.Dropdown(
                        list(views.EXAMPLES), value=next(iter(views.EXAMPLES)), label="Built-in example"
                    )
                    use_example_btn = gr.Button("Use example", elem_id="use-example")
                with gr.Row():
                    save_recipe_btn = gr.Button("Save recipe (JSON)")
                    recipe_upload_btn = gr.UploadButton("Load recipe", file_types=[".json"], type="filepath")
                recipe_file = gr.File(label="Recipe download", interactive=False)

        # -- client API: the api functions themselves, typed, with their docstrings --------------
        for fn, name in (
            (api.steer, "steer"),
            (api.sweep, "sweep"),
            (api.similarity, "similarity"),
            (api.load_model, "load_model"),
        ):
            gr.api(_endpoint(fn), api_name=name, **MODEL)
        for fn, name in ((api.status, "status"), (api.plan, "plan")):
            gr.api(_endpoint(fn), api_name=name, **INFO)

        # -- event wiring (UI-only handlers are private: not client endpoints) -----------------
        model_view = [status_md, fallback_md, layer_slider, sweep_layer_slider, model_dropdown]
        demo.load(refresh_model_view, None, model_view, api_visibility="private", **INFO)
        load_btn.click(
            load_selected_model,
            [model_dropdown, quant_radio, force_checkbox],
            model_view,
            api_visibility="private",
            **MODEL,
        )
        add_vector_btn.click(
            add_vector_row,
            [vectors_table, new_text_box, new_positive_box, new_negative_box, new_coeff_number, layer_slider],
            [vectors_table, new_text_box, new_positive_box, new_negative_box],
            **UI_ONLY,
        )
        remove_row_btn.click(remove_vector_row, [vectors_table, remove_row_number], vectors_table, **UI_ONLY)
        clear_rows_btn.click(clear_vector_rows, None, vectors_table, **UI_ONLY)
        settings = [max_tokens_slider, temperature_slider, top_p_slider, seed_number]
        generation = generate_btn.click(
            generate_outputs,
            [prompt_box, vectors_table, layer_slider, *settings, capture_radio, raw_prompt_checkbox],
            [steered_box, baseline_box, run_info_md],
            api_visibility="private",
            **MODEL,
        )
        stop_btn.click(None, None, None, cancels=[generation], api_visibility="private")
        sweep_btn.click(
            run_sweep,
            [prompt_box, sweep_text_box, sweep_layer_slider, sweep_coeffs_box, sweep_tokens_slider, seed_number],
            [sweep_table, sweep_plot, sweep_info_md],
            api_visibility="private",
            **MODEL,
        )
        similarity_btn.click(
            show_similarity, [vectors_table, layer_slider], heatmap_html, api_visibility="private", **MODEL
        )
        refresh_memory_btn.click(
            refresh_memory,
            context_number,
            [card_md, processes_table, plan_table, events_table],
            api_visibility="private",
            **INFO,
        )
        recipe_fields = [prompt_box, vectors_table, *settings]
        save_recipe_btn.click(save_recipe, [prompt_box, vectors_table, layer_slider, *settings], recipe_file, **UI_ONLY)
        recipe_upload_btn.upload(load_recipe, [recipe_upload_btn, layer_slider], recipe_fields, **UI_ONLY)
        use_example_btn.click(apply_example, example_dropdown, recipe_fields, api_visibility="private", **INFO)

    demo.queue(api_open=False, max_size=config.max_queue, default_concurrency_limit=1)
    return demo
