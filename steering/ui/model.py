"""The model panel: which model is loaded (status line, fallback notice), the plan's word on a
choice before loading, and Load. Every layer slider follows the loaded model's depth (default:
the middle layer).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gradio as gr

from steering import api, catalog
from steering.errors import SteeringError
from steering.loader import QUANT_CHOICES, get_manager
from steering.ui import views
from steering.ui.common import INFO, MODEL, PRIVATE, SAY_CLAMPED, refused, user_errors

logger = logging.getLogger(__name__)


LAYER_SLIDERS = 3  # the Steer form's, the Sweep tab's and the Train tab's (app.py wires them in that order)


def _model_view(status: dict) -> tuple:
    """Status line, fallback notice, every layer slider (range and default follow the model), model."""
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
        *(layer_range() for _ in range(LAYER_SLIDERS)),
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
        n_view = 3 + LAYER_SLIDERS  # status, notice, sliders, dropdown
        shown = refused(str(exc), n_view + 1, at=n_view)
        return (*shown[: n_view - 1], gr.Dropdown(value=get_manager().status().get("model")), shown[n_view])


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


# -- layout and wiring ------------------------------------------------------------------------------
def model_panel(loaded, locked: bool) -> SimpleNamespace:
    """A compact bar: the loaded model's status line (model, quantization, device, layers, memory)
    and a fallback notice, always in view; "Change model" below it opens the Load controls."""
    model_choices = views.model_choices()  # offline, models not in the local cache say so
    with gr.Group(elem_id="model-bar"):
        status_md = gr.Markdown("Loading…", elem_id="status-line")
        fallback_md = gr.Markdown("", elem_id="fallback-notice")
    with gr.Accordion("Change model", open=False, elem_id="model-panel"):
        with gr.Row():
            dropdown = gr.Dropdown(
                model_choices,
                value=loaded.model_id if loaded else catalog.EMBEDDED_ID,
                label="Model",
                info="A matrix model, any cached Hugging Face id, or a folder under the server's --models-dir",
                allow_custom_value=True,
                interactive=not locked,
                scale=3,
                min_width=240,
            )
            quant = gr.Radio(list(QUANT_CHOICES), value="auto", label="Quantization", interactive=not locked, scale=3)
        with gr.Row():
            force = gr.Checkbox(
                False, label="Force", info="skip the memory check", interactive=not locked, min_width=150
            )
            allow_offload = gr.Checkbox(
                False, label="Allow offload", info="layers in CPU RAM: much slower", interactive=not locked,
                min_width=150,
            )  # fmt: skip
            load_btn = gr.Button("Load", variant="secondary", interactive=not locked, min_width=120)
        if locked:
            gr.Markdown("_Model switching is disabled on this server (`--lock-model`)._")
        message = gr.Markdown("", elem_id="model-message", elem_classes=["field-message"])
        advice = gr.Markdown("", elem_id="load-advice")
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


def wire_model(demo: gr.Blocks, model, layer_sliders: list) -> None:
    """On page load: the model view; Load; the plan's advice."""
    model_view = [model.status_md, model.fallback_md, *layer_sliders, model.dropdown]
    demo.load(refresh_model_view, None, model_view, **PRIVATE, **INFO)
    demo.load(None, None, None, js=SAY_CLAMPED)  # a slider never clamps silently
    model.load_btn.click(
        load_selected_model,
        [model.dropdown, model.quant, model.force, model.allow_offload],
        [*model_view, model.message],
        **PRIVATE,
        **MODEL,
    )
    for chosen in (model.dropdown, model.quant):  # the plan's word on the choice, before loading
        chosen.change(model_advice, [model.dropdown, model.quant], model.advice, **PRIVATE, **INFO)
