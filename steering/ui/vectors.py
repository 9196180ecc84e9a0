"""The Vectors tab: how alike the table's vectors are (cosine heatmap at the layer slider's layer).
Texts whose vectors point the same way steer alike."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from steering import api, limits
from steering.ui import views
from steering.ui.common import MODEL, PRIVATE, bounded_rows, notices


@notices(2, at=1)
def show_similarity(rows, layer) -> tuple:
    """The cosine heatmap of the table's (enabled) texts at the layer slider's layer; outputs
    (heatmap, message): a refusal leaves the previous heatmap."""
    items = views.similarity_items(views.rows_to_vectors(bounded_rows(rows), int(layer)))
    if len(items) < 2:
        raise gr.Error("texts: the vectors table needs at least 2 different vectors to compare", print_exception=False)
    result = api.similarity(items[: int(limits.LIMITS["similarity_texts"].maximum)], int(layer))
    return views.heatmap_html(result["texts"], result["matrix"], result["layer"]), ""


# -- layout and wiring ------------------------------------------------------------------------------
def vectors_tab() -> SimpleNamespace:
    with gr.Tab("Vectors"):
        gr.Markdown("Texts whose vectors point the same way steer alike. Uses the table's texts and the layer slider.")
        show_btn = gr.Button("Show similarity", elem_id="show-similarity")
        message = gr.Markdown("", elem_id="similarity-message", elem_classes=["field-message"])
        heatmap = gr.HTML("", elem_id="heatmap")
    return SimpleNamespace(show_btn=show_btn, message=message, heatmap=heatmap)


def wire_vectors(vectors, form) -> None:
    vectors.show_btn.click(
        show_similarity, [form.table, form.layer], [vectors.heatmap, vectors.message], **PRIVATE, **MODEL
    )
