"""The Recipes tab: save the form as a recipe, load one back, use a built-in example.

A recipe holds everything that shapes a result (prompt, vectors, decoding, capture mode, raw
prompt, and the model and quantization it was made with). Loading one says what it set, and
warns when it was made with another model than the one loaded. An example replaces the form at
once when the table is empty, and asks first when it would overwrite vectors.

The recipe fields, in this order, are the outputs of `load_recipe`, `use_example` and
`confirm_example`: prompt, table, max new tokens, temperature, top-p, seed, capture mode,
raw prompt, prompted, direction store.
"""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import gradio as gr

from steering import api, files, generate, limits
from steering.errors import SteeringError
from steering.loader import get_manager
from steering.ui import views
from steering.ui.common import INFO, PRIVATE, UI_ONLY, bounded_rows, inline, named_upload, notices, with_file_name

N_FIELDS = 10  # the recipe fields above


def _loaded() -> dict | None:
    current = get_manager().current
    return None if current is None else {"model": current.model_id, "quant": current.quant}


@notices(2, at=1)
def save_recipe(
    prompt,
    rows,
    layer,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    capture_mode=views.CAPTURE_MODES[0],
    raw_prompt=False,
    prompted=False,
    directions=None,
) -> tuple:
    """Write the form (vectors, decoding, capture mode, raw prompt) and the loaded model to a JSON
    file for download, checked like /steer's own arguments (this handler can be called by name).
    Outputs (file, message)."""
    sampling = generate.check_sampling(max_new_tokens, temperature, top_p, seed)
    vectors = views.rows_to_vectors(bounded_rows(rows), limits.check_layer(layer, "layer", None), directions)
    settings = {**asdict(sampling), "capture_mode": capture_mode, "raw_prompt": raw_prompt, "prompted": bool(prompted)}
    loaded = _loaded()
    model = None if loaded is None else {"id": loaded["model"], "quant": loaded["quant"]}
    recipe = views.make_recipe(prompt or "", vectors, settings, model)
    path = files.app_file("recipe", ".json")
    path.write_text(views.recipe_json(recipe), encoding="utf-8")
    made = f" with {model['id']} ({model['quant']})" if model else ""
    return str(path), f"Saved {len(vectors)} vector(s), the prompt and the settings{made}."


def _fields(recipe: dict, default_layer: int) -> tuple:
    """The recipe fields of a recipe (see the module docstring)."""
    s = recipe["settings"]
    directions: dict[str, list] = {}
    rows = views.vectors_to_rows(recipe["vectors"], default_layer, directions)
    return (
        recipe["prompt"],
        rows,
        s["max_new_tokens"],
        s["temperature"],
        s["top_p"],
        s["seed"],
        s["capture_mode"],
        s["raw_prompt"],
        s["prompted"],
        directions,
    )


@notices(N_FIELDS + 1, at=N_FIELDS)
def load_recipe(file_path, layer) -> tuple:
    """Fill the form from an uploaded recipe; outputs the recipe fields and a message that says
    what was set (and warns when the recipe was made with another model)."""
    name = named_upload(file_path, (".json",), "Load recipe")
    try:
        with open(file_path, encoding="utf-8") as handle:
            text = handle.read(views.MAX_RECIPE_BYTES + 1)  # never more than the limit into memory
    except (OSError, UnicodeDecodeError, TypeError) as exc:
        raise gr.Error(f"recipe: cannot read {name} ({type(exc).__name__})") from None
    try:
        recipe = views.parse_recipe(text)
    except SteeringError as exc:
        raise with_file_name(name, exc) from None
    fields = _fields(recipe, limits.check_layer(layer, "layer", None))
    summary = views.recipe_summary(recipe, _loaded())
    (gr.Warning if "⚠️" in summary else gr.Info)(summary)
    return (*fields, summary)


def _example(name: str) -> tuple:
    if name not in views.EXAMPLES:
        raise gr.Error(f"example: choose one of {', '.join(views.EXAMPLES)}")
    example = views.EXAMPLES[name]
    recipe = views.make_recipe(example["prompt"], example["vectors"], {})
    return _fields(recipe, api.status()["default_layer"])


@notices(N_FIELDS + 2, at=N_FIELDS + 1)
def use_example(name: str, rows) -> tuple:
    """A built-in example (its layers at the loaded model's middle layer). Into an empty table it
    opens at once; over vectors it asks first. Outputs the recipe fields, the confirmation row
    and a message."""
    kept = [r for r in bounded_rows(rows) if views.rows_to_vectors([r], 0)]
    if kept:
        question = (
            f"Use the example “{name}”? It replaces the prompt, the {len(kept)} vector(s) in the table and the "
            "decoding settings."
        )
        return (*([gr.skip()] * N_FIELDS), gr.Row(visible=True), question)
    return (*_example(name), gr.Row(visible=False), f"Opened the example “{name}”.")


@notices(N_FIELDS + 2, at=N_FIELDS + 1)
def confirm_example(name: str) -> tuple:
    """The example after "Replace" was confirmed."""
    return (*_example(name), gr.Row(visible=False), f"Opened the example “{name}”; the previous form was replaced.")


def cancel_example() -> tuple:
    return gr.Row(visible=False), inline("")


# -- layout and wiring ------------------------------------------------------------------------------
def recipes_tab() -> SimpleNamespace:
    with gr.Tab("Recipes"):
        with gr.Row():
            example = gr.Dropdown(list(views.EXAMPLES), value=next(iter(views.EXAMPLES)), label="Built-in example")
            use_example_btn = gr.Button("Use example", elem_id="use-example")
        # The example's question and answer right under its button, above Replace / Cancel.
        example_message = gr.Markdown("", elem_id="example-message", elem_classes=["field-message"])
        with gr.Row(visible=False, elem_id="example-confirm") as confirm_row:
            confirm_btn = gr.Button("Replace", variant="stop", elem_id="example-replace")
            cancel_btn = gr.Button("Cancel", elem_id="example-cancel")
        with gr.Row():
            save_btn = gr.Button("Save recipe (JSON)", elem_id="save-recipe")
            upload_btn = gr.UploadButton("Load recipe (.json)", type="filepath", elem_id="load-recipe")
        message = gr.Markdown("", elem_id="recipe-message", elem_classes=["field-message"])
        file = gr.File(label="Recipe download", interactive=False, elem_id="recipe-file")
    return SimpleNamespace(
        example=example,
        use_example_btn=use_example_btn,
        example_message=example_message,
        confirm_row=confirm_row,
        confirm_btn=confirm_btn,
        cancel_btn=cancel_btn,
        save_btn=save_btn,
        upload_btn=upload_btn,
        message=message,
        file=file,
    )


def wire_recipes(prompt: gr.Textbox, steer, recipes) -> None:
    form, decoding = steer.form, steer.decoding
    form_fields = [decoding.max_tokens, decoding.temperature, decoding.top_p, decoding.seed]
    form_fields += [decoding.capture, decoding.raw_prompt, steer.prompted]
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
    example_outputs = [*recipe_fields, recipes.confirm_row, recipes.example_message]
    recipes.use_example_btn.click(use_example, [recipes.example, form.table], example_outputs, **PRIVATE, **INFO)
    recipes.confirm_btn.click(confirm_example, recipes.example, example_outputs, **PRIVATE, **INFO)
    recipes.cancel_btn.click(cancel_example, None, [recipes.confirm_row, recipes.example_message], **UI_ONLY)
