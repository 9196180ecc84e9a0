"""The page: `build_demo(config) -> gr.Blocks`. A one-line title and the model bar on top, one tab
per module below (each module lays its tab out, holds its handlers and wires them; the prompt
lives in the tabs that use it: Steer, and Sweep's copy of it), the client endpoints, then the
queue.

The UI is a thin layer over `steering/api.py`: every handler converts component values
(steering/ui/views.py does the pure conversions) and calls one api function. No model logic and
no model or tensor in `gr.State`. Sliders and number boxes take their range and default from
`steering/limits.py`. `queue(api_open=False)` closes the REST routes that would skip the queue;
the queue is bounded so a public link cannot pile up work.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from steering import catalog, files
from steering.loader import get_manager
from steering.ui import (
    autotune,
    chat,
    endpoints,
    history,
    memory,
    model,
    recipes,
    serving,
    steer,
    sweep,
    train,
    vectors,
)


@dataclass(frozen=True)
class UIConfig:
    """What `app.py` tells the UI. The model manager itself is configured by `app.py`."""

    lock_model: bool = False
    max_queue: int = 32
    per_client: int = serving.PER_CLIENT  # requests one client may have waiting for the model
    title: str = "Steering Lab"


CACHE_SWEEP = (600, 3600)  # Gradio's delete_cache: every 10 minutes, files older than an hour


# -- layout: one builder per panel -------------------------------------------------------------
# Global CSS, in a <style> element of the page (Gradio 6 takes css only in launch(), which app.py
# and the tests call): the Steer tab's wide-screen grid, tables that scroll within themselves,
# message lines, and the footer's "Use via API" link kept on narrow screens.
LAYOUT_CSS = """
#page-title { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0 12px; }
#page-title h1 { font-size: 1.35rem; font-weight: 700; margin: 0; } #page-title p { margin: 0; font-size: 0.9rem; }
#model-bar { padding: 4px 10px; } #model-bar p { margin: 0; }
@media (max-width: 640px) { .status-more { display: none; } }
@media (min-width: 900px) {
  #steer-layout { display: grid !important; grid-template-columns: minmax(0, 5fr) minmax(0, 7fr);
    grid-template-areas: "form outputs" "table outputs"; align-items: start; }
  #steer-form { grid-area: form; } #steer-table { grid-area: table; }
  #steer-outputs { grid-area: outputs; align-self: start; position: sticky; top: 8px; }
  .toast-wrap { top: auto !important; bottom: var(--size-4) !important; left: var(--size-3) !important;
    right: auto !important; align-items: start !important; }  /* toasts over the form, never the outputs */
}
.scroll-table .table-wrap, .scroll-table .virtual-table-viewport { overflow-x: auto !important; }
.scroll-table table { min-width: 560px; }
#vectors-table { position: relative; z-index: 1000; }  /* its cell menu ("Add row below") over the blocks below */
#sweep-table .header, #history-table .header { white-space: nowrap; word-break: keep-all; }  /* never "se ed" */
.field-message p, .clamp-note { color: #b45309; margin: 0; } .clamp-note { font-size: 0.85rem; }
footer .show-api, footer .api-docs, footer a[href*="view=api"] { display: inline-flex !important; }
"""


def build_demo(config: UIConfig | None = None) -> gr.Blocks:
    """The whole app, queued and ready for `launch()`."""
    config = config or UIConfig()
    manager = get_manager()
    locked = config.lock_model or manager.lock_model
    loaded = manager.current
    n_layers = loaded.n_layers if loaded else catalog.get_spec(catalog.EMBEDDED_ID).n_layers

    # Gradio's cache: its copies of our downloads go with their originals (files.KEEP per kind),
    # and every file it holds (uploads too) is deleted an hour after it was made.
    files.after_prune(serving.prune_cached_downloads)
    with gr.Blocks(title=config.title, delete_cache=CACHE_SWEEP) as demo:
        gr.HTML(
            f"<style>{LAYOUT_CSS}</style><div id='page-title'><h1>{html.escape(config.title)}</h1>"
            "<p>Activation steering (llm-steer): steered, unsteered and prompted output side by side.</p></div>",
            elem_id="layout-css",
            padding=False,
        )
        panel = model.model_panel(loaded, locked)
        with gr.Tabs():
            steering_tab = steer.steer_tab(n_layers)
            chat_tab = chat.chat_tab()
            sweep_tab = sweep.sweep_tab(n_layers)
            train_tab = train.train_tab(n_layers)
            vectors_tab = vectors.vectors_tab()
            memory_tab = memory.memory_tab()
            recipes_tab = recipes.recipes_tab()
            history_tab = history.history_tab()
        endpoints.register(demo)
        form, decoding = steering_tab.form, steering_tab.decoding
        prompt = steering_tab.prompt
        sweep.share_prompt(prompt, sweep_tab.prompt)
        model.wire_model(demo, panel, [form.layer, sweep_tab.layer, train_tab.layer])
        steer.wire_steer(prompt, steering_tab)
        autotune.wire_autotune(prompt, form, decoding)
        chat.wire_chat(chat_tab, form, decoding)
        sweep.wire_sweep(sweep_tab, decoding)
        train.wire_train(train_tab, form)
        vectors.wire_vectors(vectors_tab, form)
        memory.wire_memory(memory_tab)
        recipes.wire_recipes(prompt, steering_tab, recipes_tab)
        history.wire_history(history_tab)

    demo.queue(api_open=False, max_size=config.max_queue, default_concurrency_limit=1)
    serving.readings_never_queue_full(demo, config.per_client)  # readings answer even when the queue is full
    return demo
