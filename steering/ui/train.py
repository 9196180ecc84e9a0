"""The Train tab: a steering vector from examples, and reading texts with a vector.

Train: paste examples (one per line, positives and, optionally, negatives), upload a JSONL/CSV
file of them, or give two words ("happy" / "sad": repeng-style persona pairs); choose the method
and the layer (or let the held-out AUROC choose it). The result shows each layer's held-out
AUROC as a plot and the chosen vector; **Add to table** puts it in the Steer tab's vectors table
(as a raw direction, like an imported one), where Generate, Sweep, Chat, Export and Recipes take
it as they take any row.

Read: texts (one per line) read with the trained vector, or with the Steer table's first enabled
vector: each token highlighted by its projection on the direction, a score per text, and with
texts labelled negative too a histogram of the two groups' scores.

The model work is steering/training.py (`train_vector`, `read_texts`, `parse_examples`); the
same functions are the client endpoints /train_vector and /read.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from steering import limits, training
from steering.ui import views
from steering.ui.common import MODEL, PRIVATE, UI_ONLY, bounded_rows, layer_slider, notices
from steering.ui.steer import append_vectors

PLOT_W, PLOT_H = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 16, 16, 36  # margins, px


def _lines(text) -> list[str]:
    """One example per non-blank line."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise gr.Error("examples: paste text, one example per line")
    return [line.strip() for line in text.splitlines() if line.strip()]


# -- pictures ---------------------------------------------------------------------------------------
def _x(i: int, n: int) -> float:
    return LEFT + (PLOT_W - LEFT - RIGHT) * (i / max(1, n - 1))


def _y(value: float, low: float, high: float) -> float:
    return TOP + (PLOT_H - TOP - BOTTOM) * (1 - (value - low) / max(1e-9, high - low))


def auroc_svg(result: dict) -> str:
    """Held-out AUROC per layer as a line with a marker per layer; the chosen layer ringed, the
    chance level (0.5) dashed."""
    rows = [r for r in result.get("layers") or [] if r.get("auroc") is not None]
    if not rows:
        return ""
    n, chosen = len(rows), result.get("layer")
    points = [(_x(i, n), _y(r["auroc"], 0.0, 1.0)) for i, r in enumerate(rows)]
    parts = [
        f'<svg viewBox="0 0 {PLOT_W} {PLOT_H}" width="100%" style="max-width:{PLOT_W}px" role="img" '
        'aria-label="held-out AUROC per layer">'
    ]
    for tick in (0.0, 0.5, 1.0):
        y = _y(tick, 0.0, 1.0)
        dash = ' stroke-dasharray="4 3"' if tick == 0.5 else ""
        parts.append(f'<line x1="{LEFT}" x2="{PLOT_W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#bbb"{dash}/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:g}</text>')
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>')
    step = max(1, n // 10)
    for i, ((x, y), row) in enumerate(zip(points, rows)):
        ring = ' stroke="#d62728" stroke-width="3"' if row["layer"] == chosen else ""
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if ring else 3}" fill="#1f77b4"{ring}>')
        parts.append(f"<title>layer {row['layer']}: AUROC {row['auroc']:.3f}</title></circle>")
        if i % step == 0 or row["layer"] == chosen:
            below = PLOT_H - BOTTOM + 14
            parts.append(f'<text x="{x:.1f}" y="{below}" font-size="11" text-anchor="middle">{row["layer"]}</text>')
    parts.append(f'<text x="{PLOT_W / 2}" y="{PLOT_H - 4}" font-size="12" text-anchor="middle">layer</text>')
    return "".join(parts) + "</svg>"


def histogram_svg(positive: list[float], negative: list[float], bins: int = 12) -> str:
    """Two overlaid histograms of read scores: texts labelled positive (blue), negative (orange)."""
    values = positive + negative
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = {}
    for name, group in (("positive", positive), ("negative", negative)):
        counts[name] = [0] * bins
        for v in group:
            counts[name][min(bins - 1, int((v - low) / width))] += 1
    top = max(max(c) for c in counts.values()) or 1
    bar = (PLOT_W - LEFT - RIGHT) / bins
    parts = [
        f'<svg viewBox="0 0 {PLOT_W} {PLOT_H}" width="100%" style="max-width:{PLOT_W}px" role="img" '
        'aria-label="scores by label">'
    ]
    for name, colour in (("positive", "#1f77b4"), ("negative", "#ff7f0e")):
        for b, count in enumerate(counts[name]):
            y = _y(count, 0, top)
            x = LEFT + b * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{PLOT_H - BOTTOM - y:.1f}" '
                f'fill="{colour}" fill-opacity="0.5"><title>{name}: {count}</title></rect>'
            )
    for value, anchor in ((low, "start"), (high, "end")):
        x = LEFT if anchor == "start" else PLOT_W - RIGHT
        parts.append(
            f'<text x="{x}" y="{PLOT_H - BOTTOM + 14}" font-size="11" text-anchor="{anchor}">{value:.3g}</text>'
        )
    parts.append(
        f'<text x="{PLOT_W / 2}" y="{PLOT_H - 4}" font-size="12" text-anchor="middle">score '
        '(<tspan fill="#1f77b4">positive</tspan> / <tspan fill="#ff7f0e">negative</tspan>)</text>'
    )
    return "".join(parts) + "</svg>"


def _summary(result: dict) -> str:
    split = result.get("split") or {}
    test = split.get("test")
    held = f" on {test['positives']} + {test['negatives']} held-out examples" if test else " (on the fitted examples)"
    auroc = result.get("auroc")
    return (
        f"**{result['vector'].get('name') or 'trained vector'}** · {result['method']} · pooling {result['pooling']} · "
        f"layer {result['layer']} · AUROC {auroc:.3f}{held} · {result['n_pos']} positives, "
        f"{result['n_neg']} negatives ({result['negatives']}) · suggested coefficient {result['coeff']:g}. "
        "**Add to table** puts it in the Steer tab."
    )


# -- handlers ---------------------------------------------------------------------------------------
@notices(4, at=3)
def train_from_form(
    positives, negatives, word_positive, word_negative, method, auto_layer, layer, pooling, name,
    progress=gr.Progress(),
):  # fmt: skip
    """Train from the form; outputs (trained state, summary, AUROC plot, message)."""
    words = (word_positive or "").strip() or (word_negative or "").strip()
    examples = {} if words else {"positives": _lines(positives), "negatives": _lines(negatives)}
    if not words and not examples["positives"]:
        raise gr.Error("positives: paste example texts, one per line (or give two words)")
    given = {"positive": word_positive or "", "negative": word_negative or ""} if words else examples

    def report(fraction, text="") -> None:
        if progress is not None:  # None for callers by name outside a request
            progress(fraction, desc=text or "Training")

    result = training.train_vector(
        **given, method=method, layer=None if auto_layer else int(layer), pooling=pooling, name=name or "",
        progress=report,
    )  # fmt: skip
    return result, _summary(result), auroc_svg(result), ""


@notices(3, at=2)
def load_examples(file_path, positives_box, negatives_box) -> tuple:
    """Fill the example boxes from an uploaded JSONL/CSV file; outputs (positives, negatives, message)."""
    path = Path(file_path or "")
    if not path.is_file():
        raise gr.Error("file: upload a JSONL or CSV file")
    if path.stat().st_size > limits.MAX_UPLOAD_BYTES:
        raise gr.Error(f"file: is {path.stat().st_size} bytes; the limit is {limits.MAX_UPLOAD_BYTES}")
    parsed = training.parse_examples(path.read_bytes(), path.name)
    note = f"Read {len(parsed['positives'])} positives and {len(parsed['negatives'])} negatives ({parsed['format']})."
    return "\n".join(parsed["positives"]), "\n".join(parsed["negatives"]), note


@notices(3, at=2)
def add_trained(trained, rows, directions) -> tuple:
    """Append the trained vector to the Steer tab's table; outputs (table, directions, message)."""
    if not isinstance(trained, dict) or "vector" not in trained:
        raise gr.Error("vector: train a vector first")
    table, directions, added = append_vectors(rows, directions, [trained["vector"]], int(trained["layer"]))
    label = added[0][0]
    return (
        table,
        directions,
        f"Added “{trained['vector'].get('name') or label}” as {label} (row {len(table)}).",
    )


def _vector_to_read(source, trained, rows, directions, layer) -> tuple[dict, str]:
    if source == "trained vector":
        if not isinstance(trained, dict) or "vector" not in trained:
            raise gr.Error("vector: train a vector first (or read with the table's first vector)")
        return trained["vector"], trained.get("pooling", training.DEFAULT_POOLING)
    vectors = [v for v in views.rows_to_vectors(bounded_rows(rows), int(layer), directions) if v.get("enabled", True)]
    if not vectors:
        raise gr.Error("vector: the Steer tab's table has no enabled vector to read with")
    return vectors[0], training.DEFAULT_POOLING


def _highlighted(result: dict) -> list[tuple[str, float | None]]:
    """Every text's tokens with their projection scaled into [-1, 1] (one scale for all texts),
    texts separated by a line break."""
    largest = max((abs(p) for text in result["tokens"] for _, p in text), default=0.0) or 1.0
    out: list[tuple[str, float | None]] = []
    for i, tokens in enumerate(result["tokens"]):
        if i:
            out.append(("\n", None))
        out.extend((token, round(p / largest, 3)) for token, p in tokens)
    return out


@notices(4, at=3)
def read_from_form(texts, negatives, source, trained, rows, directions, layer) -> tuple:
    """Read texts with a vector; outputs (highlighted tokens, scores table, histogram, message)."""
    positives, labelled_negative = _lines(texts), _lines(negatives)
    if not positives:
        raise gr.Error("texts: paste the texts to read, one per line")
    vector, pooling = _vector_to_read(source, trained, rows, directions, layer)
    result = training.read_texts(positives + labelled_negative, vector, pooling)
    scores = result["scores"]
    labels = ["positive" if labelled_negative else ""] * len(positives) + ["negative"] * len(labelled_negative)
    table = [[round(s, 4), label, t[:200]] for s, label, t in zip(scores, labels, positives + labelled_negative)]
    picture = histogram_svg(scores[: len(positives)], scores[len(positives) :]) if labelled_negative else ""
    note = f"Read {len(scores)} texts at layer {result['layer']} (pooling {result['pooling']})."
    return _highlighted(result), table, picture, note


# -- layout and wiring --------------------------------------------------------------------------------
def train_tab(n_layers: int) -> SimpleNamespace:
    with gr.Tab("Train", elem_id="train-tab"):
        gr.Markdown(
            "A vector from **examples**: texts of the concept (positives) against contrasting texts "
            "(negatives; leave empty to contrast with built-in neutral sentences), or two words. "
            "Read checks that the direction means what you think before you steer with it."
        )
        with gr.Row():
            positives = gr.Textbox(label="Positives (one per line)", lines=6, elem_id="train-positives")
            negatives = gr.Textbox(label="Negatives (one per line, optional)", lines=6, elem_id="train-negatives")
        with gr.Row():
            upload = gr.UploadButton(
                "Load examples (JSONL / CSV)", file_types=[".jsonl", ".json", ".csv"], type="filepath",
                elem_id="train-upload",
            )  # fmt: skip
            word_positive = gr.Textbox(label="…or a word", placeholder="happy", elem_id="train-word-positive")
            word_negative = gr.Textbox(label="…against a word", placeholder="sad", elem_id="train-word-negative")
        with gr.Row():
            method = gr.Radio(list(training.METHODS), value="mean_diff", label="Method", elem_id="train-method")
            pooling = gr.Radio(list(training.POOLINGS), value=training.DEFAULT_POOLING, label="Pooling")
            auto_layer = gr.Checkbox(True, label="Choose the layer by held-out AUROC", elem_id="train-auto-layer")
            layer = layer_slider(n_layers, "Layer (when not chosen)")
            name = gr.Textbox(label="Name", placeholder="made from the examples", elem_id="train-name")
        with gr.Row():
            train_btn = gr.Button("Train", variant="primary", elem_id="train")
            add_btn = gr.Button("Add to table", elem_id="train-add")
        message = gr.Markdown("", elem_id="train-message", elem_classes=["field-message"])
        summary = gr.Markdown("", elem_id="train-summary")
        plot = gr.HTML("", elem_id="train-plot")
        trained = gr.State(None)
        with gr.Accordion("Read: project texts onto a vector", open=True, elem_id="read-panel"):
            with gr.Row():
                texts = gr.Textbox(label="Texts to read (one per line)", lines=5, elem_id="read-texts")
                read_negatives = gr.Textbox(
                    label="…and texts labelled negative (optional: a histogram of both)", lines=5,
                    elem_id="read-negatives",
                )  # fmt: skip
            source = gr.Radio(
                ["trained vector", "table's first vector"], value="trained vector", label="Read with",
                elem_id="read-source",
            )  # fmt: skip
            read_btn = gr.Button("Read", elem_id="read")
            read_message = gr.Markdown("", elem_id="read-message", elem_classes=["field-message"])
            highlighted = gr.HighlightedText(
                label="Tokens by projection (red: along the direction, blue: against)", elem_id="read-tokens",
                combine_adjacent=False, show_legend=False,
            )  # fmt: skip
            histogram = gr.HTML("", elem_id="read-histogram")
            scores = gr.Dataframe(headers=["score", "label", "text"], type="array", interactive=False, wrap=True)
    return SimpleNamespace(
        positives=positives, negatives=negatives, upload=upload, word_positive=word_positive,
        word_negative=word_negative, method=method, pooling=pooling, auto_layer=auto_layer, layer=layer, name=name,
        train_btn=train_btn, add_btn=add_btn, message=message, summary=summary, plot=plot, trained=trained,
        texts=texts, read_negatives=read_negatives, source=source, read_btn=read_btn, read_message=read_message,
        highlighted=highlighted, histogram=histogram, scores=scores,
    )  # fmt: skip


def wire_train(tab: SimpleNamespace, form: SimpleNamespace) -> None:
    tab.upload.upload(
        load_examples, [tab.upload, tab.positives, tab.negatives], [tab.positives, tab.negatives, tab.message],
        **UI_ONLY,
    )  # fmt: skip
    tab.train_btn.click(
        train_from_form,
        [tab.positives, tab.negatives, tab.word_positive, tab.word_negative, tab.method, tab.auto_layer, tab.layer,
         tab.pooling, tab.name],
        [tab.trained, tab.summary, tab.plot, tab.message],
        **PRIVATE, **MODEL,
    )  # fmt: skip
    tab.add_btn.click(
        add_trained, [tab.trained, form.table, form.directions], [form.table, form.directions, tab.message], **UI_ONLY
    )
    tab.read_btn.click(
        read_from_form,
        [tab.texts, tab.read_negatives, tab.source, tab.trained, form.table, form.directions, form.layer],
        [tab.highlighted, tab.scores, tab.histogram, tab.read_message],
        **PRIVATE, **MODEL,
    )  # fmt: skip
