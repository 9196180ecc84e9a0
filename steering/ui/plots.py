"""Pictures drawn as plain SVG/HTML (no plotting library, no gradio): the sweep plot, the
auto-tune grid and the colour scale of the cosine heatmap.

Drawing them ourselves gives what Gradio's LinePlot did not: a marker on every measured point
(hollow where the row is not fluent), a few round ticks, relevance and perplexity each on its
own panel over one coefficient axis (perplexity on a log scale with plain perplexity ticks, so
the table's perplexity column reads straight off it), the fluency boundary on the perplexity
panel, and the recommended row marked.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from steering.vocab import MAX_PERPLEXITY

SERIES = {"relevance": "#1f77b4", "perplexity": "#d62728"}
PROMPTED = "#2ca02c"  # the prompted reference lines (the sweep run with prompted=True)
WIDTH, HEIGHT = 1000, 424  # the sweep plot's viewBox; it is drawn at the column's full width
LEFT, RIGHT = 64, 16  # margins, px
REL_TOP, PPL_TOP, PANEL = 30, 214, 160  # the relevance panel, the perplexity panel below it, their height


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high - low < 1e-9:
        low, high = low - 1, high + 1
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def _covering(ticks: list[float], values: list[float]) -> list[float]:
    """`ticks` extended by one step at either end until they enclose every value (the frame then
    ends at a labelled tick)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    while ticks[0] > min(values) + 1e-9:
        ticks = [round(ticks[0] - step, 10), *ticks]
    while ticks[-1] < max(values) - 1e-9:
        ticks = [*ticks, round(ticks[-1] + step, 10)]
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Round perplexity ticks (1, 2, 5 x 10^k; one per decade when that is too many) from the
    largest at or below `low` to the smallest at or above `high` (both > 0)."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for steps in ((1, 2, 5), (1,)):
        series = [m * 10.0**k for k in range(first, last + 1) for m in steps]
        below = max([v for v in series if v <= low * (1 + 1e-9)], default=series[0])
        above = min([v for v in series if v >= high * (1 - 1e-9)], default=series[-1])
        ticks = [round(v, 10) for v in series if below <= v <= above]
        if len(ticks) <= 7:
            break
    return ticks if len(ticks) > 1 else [ticks[0], ticks[0] * 10]


def _panel(top: float, height: float, ticks, py, tick_class: str, label: str) -> str:
    """One panel's frame, grid lines and left-axis ticks, and its axis title."""
    out = [
        f'<rect class="panel-{tick_class.split("-")[0]}" x="{LEFT}" y="{top}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{height}" fill="none" stroke="#999"/>'
    ]
    for y in ticks:
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
            f'<text class="{tick_class}" x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" '
            f'font-size="12">{_fmt(y)}</text>'
        )
    middle = top + height / 2
    out.append(
        f'<text x="16" y="{middle}" font-size="12" text-anchor="middle" transform="rotate(-90 16 {middle})">'
        f"{html.escape(label)}</text>"
    )
    return "".join(out)


def _series(points, px, py, colour: str, name: str, unit: str) -> str:
    """A line through the points and a marker on each: filled where the row is fluent, hollow where not."""
    path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in points)
    out = [f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>']
    out += [
        f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{colour if fluent else "#fff"}" '
        f'stroke="{colour}" stroke-width="2"><title>{html.escape(name)} at coeff {_fmt(x)}: {y:.3g}{unit}'
        f"{'' if fluent else ' (not fluent)'}</title></circle>"
        for x, y, fluent in points
    ]
    return "".join(out)


def sweep_svg(result: dict) -> str:
    """The sweep as two panels over one coefficient axis, full width: relevance (nats/token) on
    top, perplexity below on a log scale with plain perplexity ticks and the fluency boundary
    (perplexity 30) dashed on it. Markers are hollow on rows that are not fluent; the recommended
    coefficient is starred and marked across both panels. With a scored prompted reference row
    (`result["prompted"]`, the sweep run with prompted=True) its relevance and perplexity are
    dashed horizontal lines across their panels, labelled with their values and in the legend:
    what asking achieved, to read each coefficient against. Rows without scores yet (still
    generating) are left out; with none, a one-line placeholder."""
    rows = [r for r in result.get("rows") or [] if r.get("perplexity") is not None]
    if not rows:
        return '<div class="sweep-plot"><p>The plot appears when the rows are scored.</p></div>'
    relevance = sorted(
        (r["coeff"], r["relevance"], bool(r.get("fluent"))) for r in rows if r.get("relevance") is not None
    )
    perplexity = sorted(
        (r["coeff"], r["perplexity"], bool(r.get("fluent")))
        for r in rows if r["perplexity"] > 0 and math.isfinite(r["perplexity"])
    )  # fmt: skip
    reference = result.get("prompted") or {}
    ref_rel = reference.get("relevance")
    ref_rel = ref_rel if isinstance(ref_rel, (int, float)) and math.isfinite(ref_rel) else None
    ref_ppl = reference.get("perplexity")
    ref_ppl = ref_ppl if isinstance(ref_ppl, (int, float)) and 0 < ref_ppl and math.isfinite(ref_ppl) else None
    xs = [r["coeff"] for r in rows]
    x_ticks = nice_ticks(min(xs), max(xs))
    x_low, x_high = min(x_ticks + xs), max(x_ticks + xs)
    x_high = x_high if x_high > x_low else x_low + 1
    rel_values = [y for _, y, _ in relevance] + [0.0] + ([ref_rel] if ref_rel is not None else [])
    rel_ticks = _covering(nice_ticks(min(rel_values), max(rel_values), 4), rel_values)
    rel_low, rel_high = min(rel_ticks + rel_values), max(rel_ticks + rel_values)
    ppl_values = [y for _, y, _ in perplexity] + [MAX_PERPLEXITY] + ([ref_ppl] if ref_ppl is not None else [])
    ppl_ticks = log_ticks(min(ppl_values), max(ppl_values))
    log_low, log_high = math.log(ppl_ticks[0]), math.log(ppl_ticks[-1])

    def px(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)

    def py_rel(y: float) -> float:
        return REL_TOP + PANEL - (y - rel_low) / ((rel_high - rel_low) or 1) * PANEL

    def py_ppl(y: float) -> float:
        return PPL_TOP + PANEL - (math.log(y) - log_low) / ((log_high - log_low) or 1) * PANEL

    parts = [
        _panel(REL_TOP, PANEL, rel_ticks, py_rel, "rel-tick", "relevance (nats/token)"),
        _panel(PPL_TOP, PANEL, ppl_ticks, py_ppl, "ppl-tick", "perplexity (log scale)"),
    ]
    bottom = PPL_TOP + PANEL
    for x in x_ticks:
        parts.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{bottom}" y2="{bottom + 5}" stroke="#999"/>'
            f'<text class="x-tick" x="{px(x):.1f}" y="{bottom + 19}" text-anchor="middle" font-size="12">'
            f"{_fmt(x)}</text>"
        )
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{bottom + 38}" text-anchor="middle" font-size="12">'
        "coefficient</text>"
    )
    line = py_ppl(MAX_PERPLEXITY)
    parts.append(
        f'<line class="boundary" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{line:.1f}" y2="{line:.1f}" '
        'stroke="#555" stroke-dasharray="6 4"/>'
        f'<text x="{LEFT + 6}" y="{line - 5:.1f}" font-size="12" fill="#555">'
        f"fluency boundary (perplexity {MAX_PERPLEXITY:g}): above it, not fluent</text>"
    )
    for cls, value, py, unit in (("rel", ref_rel, py_rel, " nats/token"), ("ppl", ref_ppl, py_ppl, "")):
        if value is None:
            continue
        y = py(value)
        parts.append(
            f'<line class="prompted-{cls}" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{PROMPTED}" stroke-width="2" stroke-dasharray="8 5"><title>prompted (unsteered, asked): '
            f"{value:.3g}{unit}</title></line>"
            f'<text class="prompted-{cls}-label" x="{WIDTH - RIGHT - 6}" y="{y - 5:.1f}" text-anchor="end" '
            f'font-size="12" fill="{PROMPTED}">prompted {value:.3g}</text>'
        )
    best = result.get("recommended")
    star = [(x, y) for x, y, _ in relevance if x == best]
    if star:
        x, y = px(star[0][0]), max(REL_TOP + 16, py_rel(star[0][1]) - 10)  # inside its panel, below the legend
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{REL_TOP}" y2="{bottom}" stroke="#e6a700" stroke-dasharray="2 3"/>'
            f'<text class="recommended" x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="18" '
            'fill="#e6a700">★</text>'
        )
    parts.append(_series(relevance, px, py_rel, SERIES["relevance"], "relevance", " nats/token"))
    parts.append(_series(perplexity, px, py_ppl, SERIES["perplexity"], "perplexity", ""))
    legend = (
        f'<g class="legend" font-size="12"><rect x="{LEFT}" y="6" width="12" height="12" fill="{SERIES["relevance"]}"/>'
        f'<text x="{LEFT + 17}" y="16">relevance</text>'
        f'<rect x="{LEFT + 100}" y="6" width="12" height="12" fill="{SERIES["perplexity"]}"/>'
        f'<text x="{LEFT + 117}" y="16">perplexity</text>'
        f'<circle cx="{LEFT + 212}" cy="12" r="5" fill="#fff" stroke="#555" stroke-width="2"/>'
        f'<text x="{LEFT + 222}" y="16">not fluent</text>'
        f'<text x="{LEFT + 310}" y="16" fill="#e6a700">★ recommended</text>'
        + (
            f'<line class="legend-prompted" x1="{LEFT + 430}" x2="{LEFT + 458}" y1="12" y2="12" stroke="{PROMPTED}" '
            f'stroke-width="2" stroke-dasharray="8 5"/><text x="{LEFT + 464}" y="16">prompted (unsteered, asked)</text>'
            if ref_rel is not None or ref_ppl is not None
            else ""
        )
        + "</g>"
    )
    return (
        f'<div class="sweep-plot" style="overflow-x:auto"><svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'style="min-width:560px;display:block" role="img" aria-label="sweep plot">{legend}{"".join(parts)}</svg></div>'
    )


def _score_colour(value: float | None, top: float) -> str:
    """White at 0, green towards the best score; grey for "not fluent" (no score)."""
    if value is None:
        return "#d9d9d9"
    share = max(0.0, min(1.0, value / top)) if top > 0 else 0.0
    fade = int(255 - share * 175)
    return f"rgb({fade},{min(255, fade + 60)},{fade})"


def autotune_html(result: dict) -> str:
    """The auto-tune search as a layer x coefficient grid coloured by score (the relevance of a
    fluent row); grey cells were not fluent, the chosen cell is outlined, and a scale explains
    the colours."""
    rows = result.get("rows") or []
    if not rows:
        return f"<p>{html.escape(str(result.get('reason') or 'No candidates were generated.'))}</p>"
    layers = sorted({r["layer"] for r in rows})
    coeffs = sorted({r["coeff"] for r in rows})
    cells = {(r["layer"], r["coeff"]): r for r in rows}
    top = max([r["score"] for r in rows if r.get("score") is not None] + [0.0])
    head = "".join(f"<th>{_fmt(c)}</th>" for c in coeffs)
    body = []
    for layer in layers:
        tds = []
        for coeff in coeffs:
            row = cells.get((layer, coeff))
            if row is None:
                tds.append("<td></td>")
                continue
            chosen = (layer, coeff) == (result.get("layer"), result.get("coeff"))
            score = row.get("score")
            label = "not fluent" if score is None else f"{score:.3f}"
            border = "3px solid #000" if chosen else "1px solid #fff"
            tds.append(
                f'<td class="{"chosen" if chosen else "cell"}" title="{html.escape(row.get("text", "")[:200])}" '
                f'style="background:{_score_colour(score, top)};border:{border};text-align:center;'
                f'padding:4px 8px;color:#000">{label}</td>'
            )
        body.append(f"<tr><th style='text-align:right'>layer {layer}</th>{''.join(tds)}</tr>")
    scale = colour_scale(
        [(_score_colour(top * i / 4, top), _fmt(round(top * i / 4, 3))) for i in range(5)]
        + [("#d9d9d9", "not fluent")],
        "score (relevance of a fluent row, nats/token)",
    )
    what = f"per coefficient at layer {layers[0]}" if len(layers) == 1 else "per layer × coefficient"
    title = f"Score {what} on your prompt (the outlined cell: the setting chosen)"
    corner = "layer \\ coeff" if len(layers) > 1 else "coeff"
    reason = str(result.get("reason") or "").strip()
    return (
        f'<div class="autotune-grid"><p class="autotune-title"><b>{html.escape(title)}</b></p>'
        f'<table style="border-collapse:collapse"><tr><th>{corner}</th>'
        f"{head}</tr>{''.join(body)}</table>{scale}"
        f"<p style='font-size:12px'>{html.escape(reason[:1].upper() + reason[1:])}</p></div>"
    )


def colour_scale(stops: Sequence[tuple[str, str]], title: str) -> str:
    """A row of colour swatches with their values: the legend of a heatmap."""
    swatches = "".join(
        f'<span style="display:inline-block;text-align:center;font-size:11px;margin-right:2px">'
        f'<span style="display:block;width:44px;height:12px;background:{colour};border:1px solid #ccc"></span>'
        f"{html.escape(label)}</span>"
        for colour, label in stops
    )
    caption = f'<div style="font-size:12px">{html.escape(title)}</div>'
    return f'<div class="colour-scale" style="margin-top:6px">{caption}{swatches}</div>'
